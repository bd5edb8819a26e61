"""Dataset sources: shapes, dtypes, labels, class names, conversions, caching and the user-facing errors."""

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnncli.data.dataset import Dataset, subset
from cnncli.data.images import resize_images, to_channels
from cnncli.data.pipeline import load_splits
from cnncli.data.sources import SOURCES, dataset_status, fashion_mnist, folder, idx, load_dataset
from cnncli.data.sources import tfds as tfds_source
from cnncli.data.sources.fashion_mnist import FASHION_MNIST_CLASSES
from cnncli.errors import UserError
from cnncli.recipe import DataConfig

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not idx.has_idx(FASHION_DIR), reason="dataset-fashion-mnist not installed")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test gets its own cache and an empty TFDS dir, and no user-set Fashion-MNIST path."""
    monkeypatch.setenv("CNNCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.delenv("CNNCLI_FASHION_MNIST", raising=False)


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_idx_dir(d: Path, n_train=12, n_test=6, k=3, gz=False, naming="classic") -> tuple[np.ndarray, np.ndarray]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8)
    y = (np.arange(n_train) % k).astype(np.uint8)
    suffix = ".gz" if gz else ""
    if naming == "classic":
        names = [f"{p}-{k}-ubyte" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    else:
        names = [f"{p}-{k}-ubyte" for p in ("train", "test") for k in ("images.idx3", "labels.idx1")]
    write_idx(d / (names[0] + suffix), x, gz)
    write_idx(d / (names[1] + suffix), y, gz)
    if n_test:
        write_idx(d / (names[2] + suffix), x[:n_test], gz)
        write_idx(d / (names[3] + suffix), y[:n_test], gz)
    return x, y


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_folder(root: Path, classes=("cat", "dog"), n=3, size=(6, 5), mode="L", split=None) -> Path:
    rng = np.random.default_rng(len(classes))
    base = root / split if split else root
    for c in classes:
        for i in range(n):
            shape = size if mode == "L" else (*size, 3)
            save_png(base / c / f"{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    return root


def check_dataset(ds: Dataset) -> None:
    assert ds.train_x.dtype == np.uint8 and ds.train_x.ndim == 4 and ds.train_x.shape[-1] in (1, 3)
    assert ds.train_y.dtype == np.int32 and ds.train_y.shape == (len(ds.train_x),)
    assert ds.train_y.min() >= 0 and ds.train_y.max() < ds.num_classes
    if ds.test_x is not None:
        assert ds.test_x.dtype == np.uint8 and ds.test_x.shape[1:] == ds.train_x.shape[1:]
        assert ds.test_y.dtype == np.int32 and ds.test_y.max() < ds.num_classes
    assert ds.image_shape == ds.train_x.shape[1:]


# --- registry and entry points ----------------------------------------------------------------------------


def test_all_sources_registered_with_help():
    assert SOURCES.names() == ["arrayrecord", "cifar10", "cifar100", "digits", "fashion_mnist", "folder", "idx", "npz",
                              "synthetic", "tfds"]
    assert all(SOURCES.help(n) for n in SOURCES.names())


def test_unknown_source_suggests_close_name():
    with pytest.raises(UserError) as e:
        load_dataset("fashon_mnist")
    assert str(e.value) == ("unknown dataset 'fashon_mnist' (did you mean: fashion_mnist?); "
                            "known: arrayrecord, cifar10, cifar100, digits, fashion_mnist, folder, idx, npz, "
                            "synthetic, tfds")


def test_missing_and_unexpected_arguments():
    with pytest.raises(UserError, match=r"^dataset 'folder' needs an argument: folder:PATH"):
        load_dataset("folder")
    with pytest.raises(UserError, match=r"^dataset 'digits' takes no argument \(got 'digits:x'\); use just 'digits'$"):
        load_dataset("digits:x")
    with pytest.raises(UserError, match="data.channels is 2"):
        load_dataset("synthetic", channels=2)


def test_dataset_status_lists_every_source():
    rows = dataset_status()
    assert [r[0] for r in rows] == SOURCES.names()
    assert all(isinstance(ok, bool) and isinstance(detail, str) and detail for _, ok, detail in rows)
    status = {name: (ok, detail) for name, ok, detail in rows}
    assert status["digits"][0] and status["synthetic"][0]
    assert status["tfds"] == (False, f"none prepared in {os.environ['TFDS_DATA_DIR']}; run `cnncli data prepare "
                                     f"tfds:NAME` (needs pip install 'cnncli[prepare]' and internet)")


def test_import_is_light():
    code = ("import sys, cnncli.data.sources as s; s.dataset_status(); "
            "print(sorted(m for m in ('jax', 'tensorflow_datasets', 'tensorflow', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert out.stdout.strip() == "[]"


# --- Fashion-MNIST and IDX --------------------------------------------------------------------------------


@needs_fashion
def test_fashion_mnist_from_debian_files():
    t = time.perf_counter()
    ds = load_dataset("fashion_mnist")
    elapsed = time.perf_counter() - t
    check_dataset(ds)
    assert ds.name == "fashion_mnist"
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
    assert ds.train_y[:5].tolist() == [9, 0, 0, 3, 0]
    assert ds.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                              "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert np.bincount(ds.train_y).tolist() == [6000] * 10
    assert elapsed < 5.0  # about 0.6 s; generous because the test machine is shared


def test_fashion_mnist_from_explicit_dir_and_env(tmp_path, monkeypatch):
    x, y = write_idx_dir(tmp_path / "fm", k=10, n_train=20, n_test=10, gz=True)
    ds = load_dataset(f"fashion_mnist:{tmp_path / 'fm'}")
    assert ds.class_names == FASHION_MNIST_CLASSES
    np.testing.assert_array_equal(ds.train_x[..., 0], x)
    np.testing.assert_array_equal(ds.train_y, y)
    monkeypatch.setenv("CNNCLI_FASHION_MNIST", str(tmp_path / "fm"))
    assert load_dataset("fashion_mnist").train_x.shape == (20, 5, 4, 1)
    monkeypatch.setenv("CNNCLI_FASHION_MNIST", str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"\$CNNCLI_FASHION_MNIST names .*nope, which does not exist"):
        load_dataset("fashion_mnist")


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(UserError) as e:
        load_dataset("fashion_mnist")
    assert str(e.value) == (
        f"Fashion-MNIST not found (looked in {tmp_path / 'absent'} and {tmp_path / 'tfds'}); get it with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or `cnncli data prepare tfds:fashion_mnist`, "
        "or pass the directory of the IDX files as fashion_mnist:DIR or in $CNNCLI_FASHION_MNIST")
    ok, detail = SOURCES.get("fashion_mnist").status()
    assert not ok and "apt-get install dataset-fashion-mnist" in detail


def test_fashion_mnist_falls_back_to_prepared_tfds(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    fake = Dataset("fashion_mnist", np.zeros((2, 28, 28, 1), np.uint8), np.array([9, 0], np.int32), None, None,
                   [n.lower() for n in FASHION_MNIST_CLASSES])
    monkeypatch.setattr(tfds_source, "is_prepared", lambda name, data_dir=None: name == "fashion_mnist")
    monkeypatch.setattr(tfds_source, "load_tfds", lambda name, data_dir=None: fake)
    ds = load_dataset("fashion_mnist")
    assert ds.train_y.tolist() == [9, 0] and ds.class_names == FASHION_MNIST_CLASSES
    assert SOURCES.get("fashion_mnist").status() == (True, f"TFDS, prepared in {tmp_path / 'tfds'}")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("naming", ["classic", "dotted"])
def test_idx_dir_plain_and_gz_both_namings(tmp_path, gz, naming):
    x, y = write_idx_dir(tmp_path / "m", gz=gz, naming=naming)
    ds = load_dataset(f"idx:{tmp_path / 'm'}")
    check_dataset(ds)
    assert ds.name == "m" and ds.class_names == ["0", "1", "2"]
    assert ds.train_x.shape == (12, 5, 4, 1) and ds.test_x.shape == (6, 5, 4, 1)
    np.testing.assert_array_equal(ds.train_x[..., 0], x)


def test_idx_classes_txt_and_no_test_split(tmp_path):
    write_idx_dir(tmp_path / "m", n_test=0)
    (tmp_path / "m" / "classes.txt").write_text("zero\none\ntwo\n")
    ds = load_dataset(f"idx:{tmp_path / 'm'}")
    assert ds.class_names == ["zero", "one", "two"] and ds.test_x is None and ds.test_y is None


def test_idx_bad_magic_and_truncated_file_name_the_file(tmp_path):
    write_idx_dir(tmp_path / "m")
    images = tmp_path / "m" / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(b"\x00\x00\x08\x01" + good[4:])
    with pytest.raises(UserError) as e:
        load_dataset(f"idx:{tmp_path / 'm'}")
    assert str(e.value) == (f"{images} is not an IDX file of 3-D unsigned bytes (magic 0x00000803, found 0x00000801); "
                            "re-download it")
    images.write_bytes(good[:-7])
    with pytest.raises(UserError) as e:
        load_dataset(f"idx:{tmp_path / 'm'}")
    assert str(e.value) == (f"{images} is truncated or padded: its header says 12x5x4 = 240 bytes of data but it "
                            "holds 233; re-download it")
    plain_test = tmp_path / "m" / "t10k-images-idx3-ubyte"
    plain_test.unlink()
    (tmp_path / "m" / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    images.write_bytes(good)
    with pytest.raises(UserError, match=r"^cannot read IDX file .*t10k-images-idx3-ubyte.gz: .*; re-download it$"):
        load_dataset(f"idx:{tmp_path / 'm'}")


def test_idx_count_mismatch_and_missing_dir(tmp_path):
    write_idx_dir(tmp_path / "m", n_test=0)
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(UserError, match=r"holds 12 images but .*train-labels-idx1-ubyte holds 11 labels"):
        load_dataset(f"idx:{tmp_path / 'm'}")
    with pytest.raises(UserError) as e:
        load_dataset(f"idx:{tmp_path / 'nope'}")
    assert str(e.value) == (f"no such directory {tmp_path / 'nope'}; give the directory of the IDX files "
                            "(train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz], or "
                            "train-images.idx3-ubyte and so on)")
    with pytest.raises(UserError, match=r"^no IDX training files in "):
        load_dataset(f"idx:{tmp_path}")


# --- digits -----------------------------------------------------------------------------------------------


def test_digits_fixed_stratified_split():
    ds = load_dataset("digits")
    check_dataset(ds)
    assert ds.train_x.shape == (1437, 8, 8, 1) and ds.test_x.shape == (360, 8, 8, 1)
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.train_x.max() == 255 and ds.train_x.min() == 0
    # 16 -> 255, 8 -> round(127.5) = 128 under numpy's round-half-even, 1 -> 16
    assert set(np.unique(ds.train_x)) <= {round(v * 255 / 16) for v in range(17)}
    counts = np.bincount(ds.test_y)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 20% of each class
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.test_x, ds.test_x)
    np.testing.assert_array_equal(again.test_y, ds.test_y)


# --- npz --------------------------------------------------------------------------------------------------


def test_npz_uint8_and_float_images(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 4, 4), dtype=np.uint8)
    y = np.arange(10) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'a.npz'}")
    check_dataset(ds)
    assert ds.name == "a" and ds.image_shape == (4, 4, 1) and ds.class_names == ["0", "1", "2"] and ds.test_x is None
    np.savez(tmp_path / "b.npz", x=x[..., None] / 255.0, y=y, x_test=x[:4, ..., None].astype(np.float32) / 255,
             y_test=y[:4], class_names=np.array(["a", "b", "c", "d"]))
    ds = load_dataset(f"npz:{tmp_path / 'b.npz'}")
    np.testing.assert_array_equal(ds.train_x[..., 0], x)
    np.testing.assert_array_equal(ds.test_x[..., 0], x[:4])
    assert ds.class_names == ["a", "b", "c", "d"] and ds.num_classes == 4


def test_npz_errors(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, x=np.full((3, 4, 4), 2.0), y=np.arange(3))
    with pytest.raises(UserError) as e:
        load_dataset(f"npz:{p}")
    assert str(e.value) == (f"npz:{p} array x is float with values outside [0, 1] (min 2, max 2); "
                            "save uint8 0..255 or floats scaled to [0, 1]")
    np.savez(p, images=np.zeros((3, 4, 4), np.uint8), y=np.arange(3))
    with pytest.raises(UserError) as e:
        load_dataset(f"npz:{p}")
    assert str(e.value) == f"npz: {p} has no array 'x' (found: images, y); save images as x and labels as y"
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8), y=np.array([0.0, 1.0, 1.0]))
    with pytest.raises(UserError, match=r"array y has dtype float64; labels must be integers 0..K-1$"):
        load_dataset(f"npz:{p}")
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1, 5]), class_names=np.array(["a", "b"]))
    with pytest.raises(UserError, match=r"labels go up to 5 but class_names has only 2 names$"):
        load_dataset(f"npz:{p}")
    np.savez(p, x=np.zeros((3, 4, 4, 2), np.uint8), y=np.arange(3))
    with pytest.raises(UserError, match=r"has shape \(3, 4, 4, 2\); images must be"):
        load_dataset(f"npz:{p}")
    p.write_text("not a zip")
    with pytest.raises(UserError, match=r"^npz: cannot read .*bad.npz as a NumPy .npz archive"):
        load_dataset(f"npz:{p}")
    with pytest.raises(UserError) as e:
        load_dataset(f"npz:{tmp_path / 'none.npz'}")
    assert str(e.value) == f"npz: no such file {tmp_path / 'none.npz'}"


# --- folders ----------------------------------------------------------------------------------------------


def test_folder_train_test_gray(tmp_path):
    root = make_folder(tmp_path / "pets", split="train", n=3)
    make_folder(root, classes=("cat",), n=2, split="test")
    ds = load_dataset(f"folder:{root}")
    check_dataset(ds)
    assert ds.name == "pets" and ds.class_names == ["cat", "dog"]
    assert ds.train_x.shape == (6, 6, 5, 1) and ds.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test_x.shape == (2, 6, 5, 1) and ds.test_y.tolist() == [0, 0]
    np.testing.assert_array_equal(ds.train_x[0, ..., 0], np.asarray(Image.open(root / "train/cat/0.png")))


def test_folder_flat_mixed_colour_and_extensions(tmp_path):
    root = make_folder(tmp_path / "d", classes=("b_class", "a_class"), n=2)
    rgb = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a_class" / "x.JPG", quality=95)
    (root / "a_class" / "notes.txt").write_text("ignored")
    ds = load_dataset(f"folder:{root}")
    assert ds.class_names == ["a_class", "b_class"] and ds.test_x is None
    assert ds.train_x.shape == (5, 6, 5, 3)  # one colour image: all load as RGB
    assert load_dataset(f"folder:{root}", channels=1).image_shape == (6, 5, 1)


def test_folder_16_bit_png_and_bmp(tmp_path):
    root = make_folder(tmp_path / "d", n=1)
    Image.fromarray(np.full((6, 5), 65535, np.uint16)).save(root / "cat" / "wide.png")
    Image.fromarray(np.full((6, 5), 7, np.uint8)).save(root / "dog" / "small.BMP")
    ds = load_dataset(f"folder:{root}")
    assert ds.image_shape == (6, 5, 1) and len(ds.train_x) == 4
    assert (ds.train_x[1] == 255).all() and (ds.train_x[3] == 7).all()  # sorted: 0.png, wide.png; 0.png, small.BMP


def test_folder_sizes_differ_needs_image_size(tmp_path):
    root = make_folder(tmp_path / "d", n=1)
    save_png(root / "dog" / "big.png", np.zeros((9, 7), np.uint8))
    with pytest.raises(UserError) as e:
        load_dataset(f"folder:{root}")
    assert str(e.value) == (f"images in {root} have different sizes (0.png is 6x5, big.png is 9x7); set "
                            "data.image_size in the recipe, e.g. `image_size: [64, 64]` under `data:`")
    ds = load_dataset(f"folder:{root}", image_size=(8, 8), channels=3)
    assert ds.image_shape == (8, 8, 3) and len(ds.train_x) == 3


def test_folder_errors(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset(f"folder:{tmp_path / 'nope'}")
    assert str(e.value) == (f"folder: no such directory {tmp_path / 'nope'}; give a folder with one sub-folder of "
                            "images per class")
    (tmp_path / "flat").mkdir()
    save_png(tmp_path / "flat" / "0.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(UserError) as e:
        load_dataset(f"folder:{tmp_path / 'flat'}")
    assert str(e.value) == (f"found no class folder in {tmp_path / 'flat'}: give a folder with one sub-folder of "
                            "images per class (training needs at least 2)")
    root = make_folder(tmp_path / "one", classes=("cat",))
    assert load_dataset(f"folder:{root}").class_names == ["cat"]  # enough to evaluate a trained model on
    with pytest.raises(UserError) as e:
        load_splits(DataConfig(source=f"folder:{root}"), seed=0)
    assert str(e.value) == f"dataset 'folder:{root}' has 1 class: a classifier needs at least 2"
    root = make_folder(tmp_path / "corrupt")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError) as e:
        load_dataset(f"folder:{root}")
    msg = str(e.value)
    assert msg.startswith(f"cannot read image {root / 'dog' / 'broken.png'}: ")
    assert msg.endswith("; delete or replace the file")


def test_folder_cache_hit_and_invalidation(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d")
    first = load_dataset(f"folder:{root}")
    assert list((tmp_path / "cache" / "datasets").glob("folder-d-*.npz"))
    real_decode = folder.decode_image

    def no_decode(path):
        raise AssertionError(f"decoded {path} although the cache is fresh")

    monkeypatch.setattr(folder, "decode_image", no_decode)
    again = load_dataset(f"folder:{root}")
    np.testing.assert_array_equal(again.train_x, first.train_x)
    assert again.class_names == first.class_names
    save_png(root / "cat" / "new.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(AssertionError, match="decoded"):
        load_dataset(f"folder:{root}")  # a changed listing is a cache miss
    monkeypatch.setattr(folder, "decode_image", real_decode)
    assert len(load_dataset(f"folder:{root}").train_x) == 7


# --- TFDS -------------------------------------------------------------------------------------------------


def test_tfds_not_prepared_message(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset("tfds:cifar10")
    assert str(e.value) == (f"tfds:cifar10 is not prepared in {tmp_path / 'tfds'}; run `cnncli data prepare "
                            "tfds:cifar10` (needs `pip install 'cnncli[prepare]'`, which installs TensorFlow, "
                            "and internet)")
    # What an interrupted `download_and_prepare` leaves behind is not a prepared dataset.
    partial = tmp_path / "tfds" / "cifar10" / "incomplete.ABC_3.0.2"
    partial.mkdir(parents=True)
    (partial / "dataset_info.json").write_text("{}")
    (partial / "cifar10-train.array_record-00000-of-00001").write_bytes(b"")
    assert not tfds_source.is_prepared("cifar10") and tfds_source.prepared_names() == []


@pytest.mark.skipif(tfds_source.find_spec("tensorflow") is not None, reason="TensorFlow is installed")
def test_prepare_tfds_without_tensorflow():
    with pytest.raises(UserError) as e:
        tfds_source.prepare_tfds("mnist")
    assert str(e.value) == ("preparing tfds:mnist needs TensorFlow: run `pip install 'cnncli[prepare]'` (and have "
                            "internet access), then `cnncli data prepare tfds:mnist` again")


def _prepare_tiny_tfds(data_dir: Path) -> None:
    """Write a real prepared array_record TFDS dataset without TensorFlow.

    TFDS only needs TensorFlow to encode numpy images; giving it PNG bytes from Pillow avoids that.
    """
    import io

    import tensorflow_datasets as tfds

    class TinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(6, 5, 1)),
                "label": tfds.features.ClassLabel(names=["circle", "square", "star"])}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12), "test": self._generate_examples(6)}

        def _generate_examples(self, n):
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(np.full((6, 5), 10 * i + i % 3, np.uint8)).save(buf, format="PNG")
                yield i, {"image": buf.getvalue(), "label": i % 3}

    TinyShapes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_reads_prepared_array_record_without_tensorflow(tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    _prepare_tiny_tfds(data_dir)
    assert tfds_source.is_prepared("tiny_shapes")
    assert SOURCES.get("tfds").status() == (True, f"prepared in {data_dir}: tiny_shapes")
    ds = load_dataset("tfds:tiny_shapes")
    check_dataset(ds)
    assert ds.name == "tiny_shapes" and ds.class_names == ["circle", "square", "star"]
    assert ds.train_x.shape == (12, 6, 5, 1) and ds.test_x.shape == (6, 6, 5, 1)
    # Each image is constant 10*i + i%3, so its pixel value says which label it must carry.
    assert ((ds.train_x[:, 0, 0, 0] % 10) == ds.train_y).all()
    assert "tensorflow" not in sys.modules
    # The decoded arrays are cached: a second load must not read TFDS at all.
    monkeypatch.setattr(tfds_source, "_decode_split", lambda *a: pytest.fail("decoded again"))
    np.testing.assert_array_equal(load_dataset("tfds:tiny_shapes", channels=3).train_x[..., 0], ds.train_x[..., 0])


def test_tfds_without_tensorflow_datasets_names_the_extra(tmp_path, monkeypatch):
    _prepare_tiny_tfds(tmp_path / "tfds")
    monkeypatch.setattr(tfds_source, "have_tfds", lambda: False)  # as after a plain `pip install cnncli`
    with pytest.raises(UserError) as e:
        load_dataset("tfds:tiny_shapes")
    assert str(e.value) == (f"tfds:tiny_shapes is prepared in {tmp_path / 'tfds'}, and reading it needs TensorFlow "
                            "Datasets: pip install 'cnncli[tfds]'")
    assert SOURCES.get("tfds").status() == (False, "needs TensorFlow Datasets: pip install 'cnncli[tfds]'")


# --- synthetic --------------------------------------------------------------------------------------------


def test_synthetic_default_and_spec():
    ds = load_dataset("synthetic")
    check_dataset(ds)
    assert ds.train_x.shape == (2000, 28, 28, 1) and ds.test_x.shape == (500, 28, 28, 1)
    assert ds.class_names == [f"class{i}" for i in range(10)]
    assert np.bincount(ds.train_y).tolist() == [200] * 10
    ds2 = load_dataset("synthetic:12x10x3:4")
    assert ds2.image_shape == (12, 10, 3) and ds2.class_names == ["class0", "class1", "class2", "class3"]
    np.testing.assert_array_equal(load_dataset("synthetic").train_x, ds.train_x)  # deterministic
    with pytest.raises(UserError, match=r"^synthetic:12x10x2 is not HxWxC\[:K\]"):
        load_dataset("synthetic:12x10x2")


def test_synthetic_is_learnable():
    ds = load_dataset("synthetic:16x16x1:5")
    x = ds.train_x.reshape(len(ds.train_x), -1).astype(np.float32)
    centroids = np.stack([x[ds.train_y == c].mean(0) for c in range(ds.num_classes)])
    t = ds.test_x.reshape(len(ds.test_x), -1).astype(np.float32)
    pred = ((t[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == ds.test_y).mean() > 0.9


# --- conversions ------------------------------------------------------------------------------------------


def test_channel_conversion_matches_pillow():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 7, 9, 3), dtype=np.uint8)
    gray = to_channels(rgb, 1)
    expected = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])[..., None]
    np.testing.assert_array_equal(gray, expected)
    back = to_channels(gray, 3)
    assert back.shape == (20, 7, 9, 3) and (back == gray).all()


def test_resize_matches_pillow_bilinear():
    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    out = resize_images(x, (14, 20))
    assert out.shape == (3, 14, 20, 1) and out.dtype == np.uint8
    ref = np.asarray(Image.fromarray(x[1, ..., 0]).resize((20, 14), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out[1, ..., 0], ref)


def test_load_with_size_and_channels_converts_all_splits():
    ds = load_dataset("synthetic:10x10x1:3", image_size=(12, 14), channels=3)
    assert ds.train_x.shape[1:] == (12, 14, 3) and ds.test_x.shape[1:] == (12, 14, 3)


# --- subset -----------------------------------------------------------------------------------------------


def small() -> Dataset:
    y = np.arange(40, dtype=np.int32) % 4
    x = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)
    return Dataset("s", x, y, x[:8].copy(), y[:8].copy(), ["a", "b", "c", "d"])


def test_subset_classes_relabels_in_given_order():
    ds = subset(small(), classes=[3, 1])
    assert ds.class_names == ["d", "b"]
    assert set(ds.train_y.tolist()) == {0, 1} and len(ds.train_y) == 20
    assert (ds.train_x[ds.train_y == 0, 0, 0, 0] % 4 == 3).all()  # old class 3 is new class 0
    assert ds.test_y.tolist() == [1, 0, 1, 0]
    with pytest.raises(UserError) as e:
        subset(small(), classes=[0, 7])
    assert str(e.value) == "data.classes: class 7 does not exist; s has 4 classes (0..3)"


def test_subset_train_per_class_and_limit():
    a = subset(small(), train_per_class=3, seed=5)
    assert np.bincount(a.train_y).tolist() == [3, 3, 3, 3]
    assert (np.diff(a.train_x[:, 0, 0, 0].astype(int)) > 0).all()  # original order kept
    b = subset(small(), train_per_class=3, seed=5)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    c = subset(small(), train_per_class=3, seed=6)
    assert not np.array_equal(a.train_x, c.train_x)
    d = subset(small(), classes=[0, 2], train_per_class=2, limit=3)
    assert len(d.train_y) == 3 and d.test_x.shape[0] == 4
    assert subset(small(), limit=5).train_x[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


@needs_fashion
def test_fashion_mnist_tasks_a_and_b():
    ds = load_dataset("fashion_mnist")
    b = subset(ds, classes=[5, 6, 7, 8, 9])
    assert b.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert len(b.train_y) == 30000 and len(b.test_y) == 5000 and b.train_y[0] == 4  # first image: ankle boot
