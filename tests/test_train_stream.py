"""Training on the streaming path (data.pipeline=stream) through the CLI: the same run whatever the
number of workers, exact resume after Ctrl-C or kill -9, evaluation, and corrupt images."""

import json
import signal

import pytest

from cnncli.data.convert import convert
from tests.helpers import SMALL_LENET, cli, cli_process, image_folder, metric_rows
from tests.test_records import truncated_jpeg
from tests.test_train_cli import _wait_for_checkpoint


@pytest.fixture(scope="session")
def fashion_records(tmp_path_factory, fashion):
    """Fashion-MNIST converted to ArrayRecord shards (raw pixels)."""
    out = tmp_path_factory.mktemp("records") / "fashion_mnist"
    convert("fashion_mnist", out, per_shard=4096)
    return out


def stream_args(records, workers=1):
    return [*SMALL_LENET, "--set", f"data.source=arrayrecord:{records}", "--set", "data.pipeline=stream",
            "--set", f"data.workers={workers}"]


@pytest.mark.slow
def test_a_streamed_run_is_the_same_whatever_the_workers(fashion_records, tmp_path):
    runs = {}
    for workers in (0, 2):
        runs[workers] = tmp_path / f"w{workers}"
        result = cli("train", "lenet5_fashion_mnist", "--run-dir", runs[workers],
                     *stream_args(fashion_records, workers))
        assert result.exit_code == 0, result.output
    assert metric_rows(runs[0], drop=("seconds", "img_per_s", "input_wait_s")) == \
        metric_rows(runs[2], drop=("seconds", "img_per_s", "input_wait_s"))
    summary = json.loads((runs[2] / "summary.json").read_text())
    assert summary["test"]["n"] == 10000 and summary["test"]["top1"] > 0.65  # it learns
    # 2 epochs of 2,700 // 64 = 42 steps of 64, and 300 validation images after each
    assert summary["stream"]["records_read"] == [2 * (42 * 64 + 300)]
    assert json.loads((runs[2] / "data.json").read_text())["pipeline"] == "stream"
    # the run's evaluation streams too, and counts what training reported
    result = cli("eval", runs[2], "--json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["n"] == 10000 and evaluated["top1"] == summary["test"]["top1"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_streamed_run_resumes_exactly(fashion_records, tmp_path, sig):
    """Killed during epoch 2 (SIGINT checkpoints mid-epoch, with the stream's position; SIGKILL leaves the
    end of epoch 1), then resumed: the metrics of the uninterrupted run."""
    args = [*stream_args(fashion_records), "--set", "train.epochs=3"]
    reference = tmp_path / "reference"
    assert cli("train", "lenet5_fashion_mnist", "--run-dir", reference, *args).exit_code == 0

    run_dir = tmp_path / "interrupted"
    proc = cli_process("train", "lenet5_fashion_mnist", "--run-dir", run_dir, *args)
    _wait_for_checkpoint(run_dir, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), stderr
    assert len(metric_rows(run_dir)) in (1, 2)

    result = cli("train", "--resume", "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    drop = ("seconds", "img_per_s", "input_wait_s")
    assert metric_rows(run_dir, drop=drop) == metric_rows(reference, drop=drop)
    a = json.loads((run_dir / "summary.json").read_text())["test"]
    b = json.loads((reference / "summary.json").read_text())["test"]
    assert a["top1"] == b["top1"] and a["loss"] == b["loss"]


@pytest.mark.slow
def test_corrupt_image_in_a_streamed_run(tmp_path):
    root = image_folder(tmp_path / "pets", per_class=12, size=(20, 24))
    bad = root / "fox" / "fox_0005.jpg"
    bad.write_bytes(truncated_jpeg(bad.read_bytes()))
    convert(f"folder:{root}", tmp_path / "records", per_shard=10)
    args = ["lenet5_fashion_mnist", "--set", f"data.source=arrayrecord:{tmp_path / 'records'}",
            "--set", "data.pipeline=stream", "--set", "data.image_size=[28,28]", "--set", "data.channels=1",
            "--set", "data.workers=1", "--set", "train.batch_size=8", "--set", "train.epochs=1"]
    result = cli("train", *args, "--run-dir", tmp_path / "stops")
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "cannot decode record 29 of arrayrecord:" in message and "(train-00002-of-00004.array_record, record 9)" \
        in message and "(fox/fox_0005.jpg)" in message and "data.skip_corrupt=true" in message
    assert "Traceback" not in result.stderr
    result = cli("train", *args, "--set", "data.skip_corrupt=true", "--run-dir", tmp_path / "skips")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "skips" / "summary.json").read_text())
    assert summary["stream"]["skipped_corrupt"] in (0, 1)  # 1 unless the image fell in the dropped remainder
    assert "corrupt images skipped" in result.stdout or summary["stream"]["skipped_corrupt"] == 0


@pytest.mark.slow
def test_the_imagenet_folder_recipe_on_a_generated_folder(tmp_path):
    """recipes/resnet50_imagenet_folder.yaml as it is (ResNet-50, random-resized crops, label smoothing,
    Nesterov, cosine, bfloat16), on photos of mixed sizes in ImageNet's layout: train/<wnid>/, val/<wnid>/.
    Smaller images and batches keep it short; the model and data path are the recipe's."""
    wnids = ("n01440764", "n01443537", "n01484850")
    root = image_folder(tmp_path / "imagenet", classes=wnids, per_class=6, test_per_class=2, test_name="val",
                        size=(120, 160), vary=True)
    run = tmp_path / "run"
    result = cli("train", "resnet50_imagenet_folder", "--run-dir", run, "--set", f"data.source=folder:{root}",
                 "--set", "data.image_size=[96,96]", "--set", "train.epochs=1", "--set", "train.batch_size=4",
                 "--set", "train.eval_batch_size=4", "--set", "data.val_fraction=0.25",
                 "--set", "schedule.warmup_epochs=0", "--set", "data.workers=1")
    assert result.exit_code == 0, result.output
    data = json.loads((run / "data.json").read_text())
    assert data["pipeline"] == "stream" and data["class_names"] == list(wnids) and data["image_shape"] == [96, 96, 3]
    assert (data["n_train"], data["n_val"]) == (14, 4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["n"] == 6  # val/ is the test split
    assert summary["params"] > 23_000_000  # ResNet-50
    assert summary["stream"]["records_read"] == [3 * 4 + 4]  # 14 // 4 steps of 4, then the 4 validation images
