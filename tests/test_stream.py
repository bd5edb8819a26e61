"""The streaming input pipeline (data.pipeline=stream) at the batch level: what it reads, in which order,
whatever the number of workers or processes, and where a resumed stream continues."""

import time

import numpy as np
import pytest

from cnncli.data import pipeline
from cnncli.data.pipeline import load_data, load_splits
from cnncli.data.sources import load_dataset
from cnncli.data.stream import TRAIN, Stream, StreamSplits
from cnncli.errors import UserError
from cnncli.recipe import DataConfig, RandomResizedCropConfig
from tests.helpers import image_folder
from tests.test_records import truncated_jpeg

BATCH = 8


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """30 lossless 20x24 images in 3 classes, 2 test images per class."""
    return image_folder(tmp_path_factory.mktemp("stream") / "pngs", per_class=10, test_per_class=2, size=(20, 24),
                        fmt="PNG")


def stream_data(root, **options) -> StreamSplits:
    config = {"source": f"folder:{root}", "pipeline": "stream", "workers": 0, "val_fraction": 0.2,
              "preprocess": "scale", "image_size": (20, 24)} | options
    return load_data(DataConfig(**config), seed=3)


def take(splits: StreamSplits, n: int, *, rows=(0, BATCH), epochs=2, state=None, eval_batch=BATCH):
    stream = splits.train_stream(epochs=epochs, batch=BATCH, eval_batch=eval_batch, rows=rows, eval_rows=rows, seed=3,
                                 to_device=lambda element: None, state=state)
    try:
        return [stream.next()[0] for _ in range(n)], stream.state(), stream
    finally:
        stream.close()


def test_batches_hold_the_decoded_images_of_a_shuffled_epoch(pngs):
    splits = stream_data(pngs)
    memory = load_dataset(f"folder:{pngs}")
    assert splits.sizes == (24, 6, 6) and splits.image_shape == (20, 24, 3)
    elements, _, _ = take(splits, 2 * (3 + 1))  # per epoch: 24 // 8 = 3 training batches, then 1 val batch
    kinds = [int(e["kind"]) for e in elements]
    assert kinds == [TRAIN] * 3 + [1] + [TRAIN] * 3 + [1]
    epochs = [np.concatenate([e["id"] for e in elements[i:i + 3]]) for i in (0, 4)]
    for ids in epochs:
        assert sorted(ids.tolist()) == sorted(splits.train_ids.tolist())  # every training image once
    assert epochs[0].tolist() != epochs[1].tolist()  # each epoch its own order
    for e in elements:
        valid = e["mask"] > 0
        np.testing.assert_array_equal(e["image"][valid], memory.train_x[e["id"][valid]])  # as the folder decodes
        np.testing.assert_array_equal(e["label"][valid], memory.train_y[e["id"][valid]])
    val = elements[3]
    assert sorted(val["id"][val["mask"] > 0].tolist()) == sorted(splits.val_ids.tolist())
    # the same hold-out as the in-memory path of the same recipe
    in_memory = load_splits(DataConfig(source=f"folder:{pngs}", val_fraction=0.2, preprocess="scale"), seed=3)
    assert splits.sizes == (len(in_memory.train_x), len(in_memory.val_x), len(in_memory.test_x))
    np.testing.assert_array_equal(in_memory.val_x, memory.train_x[splits.val_ids])


def test_statistics_and_eval_padding(pngs):
    splits = stream_data(pngs, preprocess="standardize")
    memory = load_splits(DataConfig(source=f"folder:{pngs}", val_fraction=0.2), seed=3)
    np.testing.assert_allclose(splits.mean, memory.mean, rtol=1e-6)  # every image is in the sample here
    np.testing.assert_allclose(splits.std, memory.std, rtol=1e-6)
    stream = splits.eval_stream("test", batch=4, rows=(0, 4), seed=3, to_device=lambda e: None)
    batches = [stream.next()[0] for _ in range(2)]
    stream.close()
    assert [float(b["mask"].sum()) for b in batches] == [4.0, 2.0]  # 6 test images, padded to 8
    np.testing.assert_array_equal(batches[1]["image"][2:], 0)


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_channel_statistics_in_chunks_equal_numpy_on_all_pixels(monkeypatch, chunk):
    monkeypatch.setattr(pipeline, "STATS_CHUNK", chunk)  # 7 pixels: chunks that do not divide the images
    x = np.random.default_rng(0).integers(0, 256, (5, 9, 11, 3), dtype=np.uint8)
    x[..., 2] //= 4  # channels of different spread
    pixels = x.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = pipeline.channel_stats(x, "standardize")
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-12)
    assert pipeline.channel_stats(x, "center") == (mean, (1.0, 1.0, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("crop", [None, RandomResizedCropConfig()])
def test_same_batches_whatever_the_workers_and_processes(pngs, crop):
    """0 or 2 worker processes, 1 process or 2 reading half of each global batch: the same batches."""
    options = {"image_size": (16, 16), "random_resized_crop": crop}
    one, _, _ = take(stream_data(pngs, **options), 6)
    two_workers, _, _ = take(stream_data(pngs, workers=2, **options), 6)
    halves = [take(stream_data(pngs, **options), 6, rows=rows)[0] for rows in ((0, 4), (4, 8))]
    for i, element in enumerate(one):
        for key in ("image", "label", "id", "mask"):
            np.testing.assert_array_equal(element[key], two_workers[i][key])
            np.testing.assert_array_equal(element[key], np.concatenate([halves[0][i][key], halves[1][i][key]]))
    assert sum(int(np.count_nonzero(h[i]["mask"])) for h in halves for i in range(6)) == \
        sum(int(np.count_nonzero(e["mask"])) for e in one)  # each process read only its rows


@pytest.mark.slow
def test_a_stream_resumes_from_its_state(pngs):
    splits = stream_data(pngs, workers=1, image_size=(16, 16), random_resized_crop=RandomResizedCropConfig())
    straight, _, _ = take(splits, 7)
    first, state, _ = take(splits, 2)
    resumed, _, _ = take(splits, 5, state=state)
    for a, b in zip(straight, first + resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["id"], b["id"])


def test_corrupt_images_stop_the_stream_or_are_counted(tmp_path):
    root = image_folder(tmp_path / "pets", per_class=8, size=(20, 24))
    bad = root / "dog" / "dog_0003.jpg"
    bad.write_bytes(truncated_jpeg(bad.read_bytes()))
    with pytest.raises(UserError, match=r"^cannot decode .*dog/dog_0003.jpg: image file is truncated .*"
                                        r"data.skip_corrupt=true"):
        take(stream_data(root, val_fraction=0.0), 6)
    elements, _, stream = take(stream_data(root, val_fraction=0.0, skip_corrupt=True), 6)
    assert stream.skipped == 2  # once per epoch; the next image stood in
    assert all(e["mask"].all() for e in elements)
    # asking to skip makes `auto` stream even a small folder (the in-memory path cannot skip)
    assert isinstance(load_data(DataConfig(source=f"folder:{root}", skip_corrupt=True, image_size=(20, 24)), seed=0),
                      StreamSplits)
    with pytest.raises(UserError, match=r"^streaming \(data.skip_corrupt\) reads the images .* set data.image_size"):
        load_data(DataConfig(source=f"folder:{root}", skip_corrupt=True), seed=0)
    with pytest.raises(UserError, match=r"^data.skip_corrupt needs data.pipeline=stream \(the in-memory path"):
        load_data(DataConfig(source=f"folder:{root}", skip_corrupt=True, pipeline="memory"), seed=0)


def test_a_stream_reads_only_a_few_batches_ahead():
    """Each element is a whole batch: Grain's default read-ahead (500 elements) held gigabytes of them."""
    made = []

    def batch(k):
        made.append(k)
        return {"mask": np.ones(4, np.float32), "skipped": np.int32(0)}

    stream = Stream(batch, 1000, workers=0, prefetch=2, to_device=lambda element: element)
    try:
        stream.next()
        time.sleep(1.0)  # time enough to read far ahead, if it would
        assert len(made) <= 1 + 3 * 2 + 2  # the one taken, `prefetch` per buffer (3), and one in flight each
    finally:
        stream.close()


def test_stream_needs_an_image_size_and_a_streaming_source(tmp_path):
    root = image_folder(tmp_path / "photos", per_class=2, vary=True)
    with pytest.raises(UserError, match=r"may differ in size: set data.image_size"):
        load_data(DataConfig(source=f"folder:{root}", pipeline="stream"), seed=0)
    with pytest.raises(UserError, match=r"'digits' loads as arrays; convert it first: `cnncli data convert digits "):
        load_data(DataConfig(source="digits", pipeline="stream"), seed=0)
    with pytest.raises(UserError, match=r"data.eval_crop needs data.pipeline=stream"):
        load_data(DataConfig(source="digits", pipeline="memory", eval_crop=0.875), seed=0)
    with pytest.raises(UserError, match=r"data.balanced_sampling is not available with data.pipeline=stream"):
        load_data(DataConfig(source=f"folder:{root}", pipeline="stream", image_size=(8, 8), balanced_sampling=True),
                  seed=0)
