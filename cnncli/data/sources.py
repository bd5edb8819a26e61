"""Named datasets: every source turns into uint8 NHWC images, int32 labels and class names.

A dataset is named by a spec, ``scheme`` or ``scheme:arg``::

    fashion_mnist                 Fashion-MNIST from local IDX files (Debian's dataset-fashion-mnist) or TFDS
    digits                        scikit-learn's bundled 8x8 digits (always available offline)
    tfds:cifar10                  an already prepared TensorFlow Datasets dataset (read without TensorFlow)
    folder:/data/pets             one sub-folder per class (optionally under train/ and test/)
    npz:/data/x.npz               arrays x, y (+ x_test, y_test, class_names)
    idx:/data/mnist               any MNIST-style directory of IDX files
    synthetic:32x32x3:5           deterministic learnable images for tests

Every source is a `Source` registered in `SOURCES` under its scheme. Sources return the data in its
natural form; `Source.load` then converts channels (gray = ITU-R 601 luma, RGB = repeated gray) and
resizes (Pillow, bilinear with antialiasing) so all splits share one shape.

This module must stay cheap to import (the CLI imports it for `--help` and `cnncli datasets`):
scikit-learn, Pillow and tensorflow_datasets are imported inside the functions that need them,
and jax never.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from cnncli.errors import UserError
from cnncli.registry import Registry

# Where cached decoded datasets live; CNNCLI_CACHE overrides the root.
CACHE_ENV = "CNNCLI_CACHE"
DEFAULT_CACHE_ROOT = "~/.cache/cnncli"
CACHE_SUBDIR = "datasets"
# Bump when the cache layout or decoding changes, so stale caches are never read.
CACHE_VERSION = 1

FASHION_MNIST_ENV = "CNNCLI_FASHION_MNIST"
# Debian's `dataset-fashion-mnist` package installs the four gzipped IDX files here.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_HOWTO = ("`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
                       "`cnncli data prepare tfds:fashion_mnist`, or pass the directory of the IDX files "
                       f"as fashion_mnist:DIR or in ${FASHION_MNIST_ENV}")

# IDX header: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per dimension.
IDX_UBYTE = 0x08
IDX_IMAGES_NDIM = 3
IDX_LABELS_NDIM = 1
IDX_TRAIN_PREFIXES = ("train",)
IDX_TEST_PREFIXES = ("t10k", "test")
IDX_CLASSES_FILE = "classes.txt"
IDX_EXPECTED = "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz], or train-images.idx3-ubyte and so on"

DIGITS_TEST_FRACTION = 0.2
# Fixed, independent of the recipe's seed, so every run evaluates on the same 360 digits.
DIGITS_SPLIT_SEED = 1234
DIGITS_MAX_VALUE = 16

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif"})
# Pillow modes that carry no colour; a folder of only these images loads as one channel.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "F"})
UINT8_MAX, UINT16_MAX = 255, 65535
MIN_CLASSES = 2

SYNTHETIC_DEFAULT_SHAPE = (28, 28, 1)
SYNTHETIC_DEFAULT_CLASSES = 10
SYNTHETIC_TRAIN = 2000
SYNTHETIC_TEST = 500
SYNTHETIC_SEED = 0
# Templates are drawn on a coarse grid and upsampled, so they are smooth blobs a CNN learns quickly.
SYNTHETIC_GRID = 4
# Pixel = TEMPLATE_WEIGHT * template + noise in [0, 255 - TEMPLATE_WEIGHT * 255]: learnable, not trivial.
SYNTHETIC_TEMPLATE_WEIGHT = 0.6

# ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B) in Pillow's 16-bit fixed point, so converting here
# gives exactly the bytes Pillow's convert("L") gives for the same image (folders decode through Pillow).
LUMA_WEIGHTS_16 = np.array([19595, 38470, 7471], dtype=np.uint32)
LUMA_SHIFT = 16
LUMA_ROUND = 1 << (LUMA_SHIFT - 1)
LUMA_CHUNK = 4096


@dataclass(frozen=True)
class Dataset:
    """Images and labels of one dataset, ready for the batch pipeline.

    Attributes:
        name: Short name, e.g. "fashion_mnist"; used in run summaries.
        train_x: uint8 images, shape (N, H, W, C) with C in {1, 3}.
        train_y: int32 labels, shape (N,), values 0..K-1.
        test_x: Test images in the same layout, or None when the source has no test split.
        test_y: Test labels, or None.
        class_names: K names; they travel with the data into evaluation output.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    class_names: list[str]

    def __post_init__(self) -> None:
        # Cheap invariant checks: a source that breaks them has a bug, so these are not UserErrors.
        splits = [("train", self.train_x, self.train_y)]
        if self.test_x is not None or self.test_y is not None:
            splits.append(("test", self.test_x, self.test_y))
        for split, x, y in splits:
            if x is None or y is None:
                raise ValueError(f"{self.name}: {split} images and labels must both be given")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
                raise ValueError(f"{self.name}: {split} images must be uint8 (N, H, W, 1|3), got {x.dtype} {x.shape}")
            if y.dtype != np.int32 or y.shape != (len(x),):
                raise ValueError(f"{self.name}: {split} labels must be int32 ({len(x)},), got {y.dtype} {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= len(self.class_names)):
                raise ValueError(f"{self.name}: {split} labels outside 0..{len(self.class_names) - 1}")
        if self.test_x is not None and self.test_x.shape[1:] != self.train_x.shape[1:]:
            raise ValueError(f"{self.name}: test images {self.test_x.shape[1:]} differ from train "
                             f"{self.train_x.shape[1:]}")

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# Image conversions shared by all sources


def to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Convert uint8 NHWC images to `channels` (1 or 3): gray = ITU-R 601 luma, RGB = gray repeated."""
    have = x.shape[-1]
    if have == channels:
        return x
    if channels == 3 and have == 1:
        return np.repeat(x, 3, axis=-1)
    if channels == 1 and have == 3:
        # Chunked so a large colour dataset never needs a wide copy of itself.
        out = np.empty(x.shape[:-1] + (1,), np.uint8)
        for i in range(0, len(x), LUMA_CHUNK):
            rgb = x[i:i + LUMA_CHUNK].astype(np.uint32)
            luma = (rgb @ LUMA_WEIGHTS_16 + LUMA_ROUND) >> LUMA_SHIFT
            out[i:i + LUMA_CHUNK, ..., 0] = luma.astype(np.uint8)
        return out
    raise ValueError(f"cannot convert {have} channels to {channels}")


def resize_images(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 NHWC images to (H, W) with Pillow's bilinear filter (antialiased when shrinking)."""
    from PIL import Image

    h, w = size
    if x.shape[1:3] == (h, w):
        return x
    out = np.empty((len(x), h, w, x.shape[-1]), np.uint8)
    for i, img in enumerate(x):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out[i] = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR)).reshape(h, w, -1)
    return out


def _check_options(image_size: tuple[int, int] | None, channels: int | None) -> None:
    if channels is not None and channels not in (1, 3):
        raise UserError(f"data.channels is {channels}; use 1 (gray) or 3 (RGB)")
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise UserError(f"data.image_size is {list(image_size)}; give two positive integers [H, W]")


def adapt(ds: Dataset, image_size: tuple[int, int] | None = None, channels: int | None = None) -> Dataset:
    """Return `ds` with every split converted to `channels` and resized to `image_size` (None keeps them)."""

    def conv(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        # Resize while the images have the fewer channels: Pillow's work grows with the channel count.
        gray_first = channels == 1
        if gray_first:
            x = to_channels(x, channels)
        if image_size is not None:
            x = resize_images(x, tuple(image_size))
        if channels is not None and not gray_first:
            x = to_channels(x, channels)
        return x

    if channels is None and image_size is None:
        return ds
    return replace(ds, train_x=conv(ds.train_x), test_x=conv(ds.test_x))


# ---------------------------------------------------------------------------------------------------------
# Cache of decoded arrays (folders and TFDS decode slowly)


def cache_dir() -> Path:
    """Directory for cached decoded datasets: ${CNNCLI_CACHE:-~/.cache/cnncli}/datasets."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser() / CACHE_SUBDIR


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable `parts` (plus the cache version)."""
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _cache_load(path: Path, name: str) -> Dataset | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            has_test = "test_x" in z
            return Dataset(name, z["train_x"], z["train_y"], z["test_x"] if has_test else None,
                           z["test_y"] if has_test else None, [str(c) for c in z["class_names"]])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None  # a damaged cache is just a cache miss; it gets rewritten


def _cache_save(path: Path, ds: Dataset) -> None:
    arrays = {"train_x": ds.train_x, "train_y": ds.train_y, "class_names": np.array(ds.class_names, dtype=str)}
    if ds.test_x is not None:
        arrays.update(test_x=ds.test_x, test_y=ds.test_y)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    except OSError:
        pass  # a read-only cache only costs speed, never correctness


# ---------------------------------------------------------------------------------------------------------
# Sources


class Source:
    """A dataset source registered under its scheme.

    Subclasses implement `read` (the data in its natural shape) and `status`; `load` applies the
    user's channel and size options uniformly.
    """

    scheme: str = ""
    #: "required", "optional" or "none": whether `scheme:arg` takes an argument.
    arg: str = "none"
    #: Shown in error messages when the argument is missing, e.g. "folder:PATH".
    usage: str = ""

    def load(self, arg: str | None = None, *, image_size: tuple[int, int] | None = None,
             channels: int | None = None) -> Dataset:
        """Load the dataset named by `arg` with every split converted to `channels` and `image_size`.

        Raises:
            UserError: The data is missing, unreadable or malformed, or the options are invalid.
        """
        _check_options(image_size, channels)
        if self.arg == "required" and not arg:
            raise UserError(f"dataset '{self.scheme}' needs an argument: {self.usage}")
        if self.arg == "none" and arg:
            raise UserError(f"dataset '{self.scheme}' takes no argument (got '{self.scheme}:{arg}'); "
                            f"use just '{self.scheme}'")
        return adapt(self.read(arg, image_size=image_size, channels=channels), image_size, channels)

    def read(self, arg: str | None, *, image_size: tuple[int, int] | None, channels: int | None) -> Dataset:
        """Return the data; may already apply `image_size`/`channels` where that is cheaper (folders)."""
        raise NotImplementedError

    def status(self) -> tuple[bool, str]:
        """(available here, one line: where it comes from or how to get it)."""
        raise NotImplementedError


SOURCES = Registry("dataset")


def _register(cls: type[Source]) -> type[Source]:
    SOURCES.register(cls.scheme, cls(), help=(cls.__doc__ or "").strip().splitlines()[0])
    return cls


# --- IDX (MNIST-style) ------------------------------------------------------------------------------------


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes (optionally gzipped) with `ndim` dimensions.

    Raises:
        UserError: The file is unreadable, not IDX, or its size disagrees with its header.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read IDX file {path}: {e}; re-download it") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or raw[3] != ndim:
        got = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise UserError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (magic 0x00000{IDX_UBYTE:x}0{ndim}, "
                        f"found 0x{got}); re-download it")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise UserError(f"{path} is truncated or padded: its header says {'x'.join(map(str, dims))} = "
                        f"{int(np.prod(dims))} bytes of data but it holds {len(raw) - header}; re-download it")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_file(directory: Path, prefixes: tuple[str, ...], kind: str, ndim: int) -> Path | None:
    # Both the classic `train-images-idx3-ubyte` and the `train-images.idx3-ubyte` naming, each maybe gzipped.
    for prefix in prefixes:
        for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
            for suffix in ("", ".gz"):
                if (directory / (stem + suffix)).is_file():
                    return directory / (stem + suffix)
    return None


def _idx_split(directory: Path, prefixes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    images = _idx_file(directory, prefixes, "images", IDX_IMAGES_NDIM)
    labels = _idx_file(directory, prefixes, "labels", IDX_LABELS_NDIM)
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        missing = "images" if images is None else "labels"
        raise UserError(f"{directory} has {(labels or images).name} but no {prefixes[0]} {missing} file "
                        f"({prefixes[0]}-{missing}-idx{IDX_IMAGES_NDIM if images is None else IDX_LABELS_NDIM}"
                        f"-ubyte[.gz])")
    x, y = read_idx(images, IDX_IMAGES_NDIM), read_idx(labels, IDX_LABELS_NDIM)
    if len(x) != len(y):
        raise UserError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels; re-download them")
    return x[..., None], y.astype(np.int32)


def has_idx(directory: Path) -> bool:
    """Whether `directory` holds at least the training images and labels in IDX format."""
    return all(_idx_file(directory, IDX_TRAIN_PREFIXES, kind, nd) is not None
               for kind, nd in (("images", IDX_IMAGES_NDIM), ("labels", IDX_LABELS_NDIM)))


def read_idx_dir(directory: Path, name: str, class_names: list[str] | None = None) -> Dataset:
    """Read train (and, if present, t10k/test) IDX files from `directory`.

    Class names come from `class_names`, else from `classes.txt` (one per line), else "0".."K-1".
    """
    if not directory.is_dir():
        raise UserError(f"no such directory {directory}; give the directory of the IDX files ({IDX_EXPECTED})")
    train = _idx_split(directory, IDX_TRAIN_PREFIXES)
    if train is None:
        raise UserError(f"no IDX training files in {directory}: expected {IDX_EXPECTED}")
    test = _idx_split(directory, IDX_TEST_PREFIXES)
    labels = [train[1]] + ([test[1]] if test else [])
    k = int(max(int(y.max()) for y in labels if len(y))) + 1
    if class_names is None:
        names_file = directory / IDX_CLASSES_FILE
        if names_file.is_file():
            class_names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        else:
            class_names = [str(i) for i in range(k)]
    if k > len(class_names):
        raise UserError(f"{name}: labels in {directory} go up to {k - 1} but there are only {len(class_names)} "
                        f"class names; fix {directory / IDX_CLASSES_FILE}")
    return Dataset(name, train[0], train[1], test[0] if test else None, test[1] if test else None, class_names)


@_register
class IdxSource(Source):
    """Any MNIST-style directory of IDX files: idx:DIR."""

    scheme, arg, usage = "idx", "required", "idx:DIR (a directory with train-images-idx3-ubyte[.gz] and friends)"

    def read(self, arg, *, image_size, channels):
        directory = Path(arg).expanduser()
        return read_idx_dir(directory, directory.name or "idx")

    def status(self):
        return True, "idx:DIR reads MNIST-style IDX files (train-images-idx3-ubyte[.gz], ...)"


# --- Fashion-MNIST ----------------------------------------------------------------------------------------


def _fashion_mnist_dirs() -> list[tuple[Path, bool]]:
    """Candidate directories in order, each with whether the user named it (then it must work)."""
    env = os.environ.get(FASHION_MNIST_ENV)
    dirs = [(Path(env).expanduser(), True)] if env else []
    return dirs + [(FASHION_MNIST_SYSTEM_DIR, False)]


@_register
class FashionMnistSource(Source):
    """Fashion-MNIST (70,000 28x28 gray clothes images, 10 classes) from local IDX files or TFDS."""

    scheme, arg = "fashion_mnist", "optional"

    def read(self, arg, *, image_size, channels):
        if arg:
            return read_idx_dir(Path(arg).expanduser(), "fashion_mnist", FASHION_MNIST_CLASSES)
        for directory, named in _fashion_mnist_dirs():
            if named or has_idx(directory):
                if named and not directory.is_dir():
                    raise UserError(f"${FASHION_MNIST_ENV} names {directory}, which does not exist; "
                                    f"point it at the directory of the Fashion-MNIST IDX files")
                return read_idx_dir(directory, "fashion_mnist", FASHION_MNIST_CLASSES)
        from cnncli.data import tfds_source

        if tfds_source.is_prepared("fashion_mnist"):
            return replace(tfds_source.load_tfds("fashion_mnist"), name="fashion_mnist",
                           class_names=list(FASHION_MNIST_CLASSES))
        raise UserError(f"Fashion-MNIST not found (looked in {FASHION_MNIST_SYSTEM_DIR} and "
                        f"{tfds_source.tfds_data_dir()}); get it with {FASHION_MNIST_HOWTO}")

    def status(self):
        for directory, named in _fashion_mnist_dirs():
            if has_idx(directory):
                return True, f"IDX files in {directory}"
            if named:
                return False, f"${FASHION_MNIST_ENV}={directory} holds no IDX files"
        from cnncli.data import tfds_source

        if tfds_source.is_prepared("fashion_mnist"):
            return True, f"TFDS, prepared in {tfds_source.tfds_data_dir()}"
        return False, f"get it with {FASHION_MNIST_HOWTO}"


# --- scikit-learn digits ----------------------------------------------------------------------------------


@_register
class DigitsSource(Source):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; always offline)."""

    scheme = "digits"

    def read(self, arg, *, image_size, channels):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        x = np.round(bunch.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)[..., None]
        y = bunch.target.astype(np.int32)
        train_x, test_x, train_y, test_y = train_test_split(
            x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SPLIT_SEED)
        return Dataset("digits", train_x, train_y, test_x, test_y, [str(i) for i in range(10)])

    def status(self):
        if find_spec("sklearn") is None:
            return False, "needs scikit-learn: pip install scikit-learn"
        return True, "bundled with scikit-learn: 1,437 train / 360 test 8x8 gray images"


# --- npz --------------------------------------------------------------------------------------------------


def _npz_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{where} has shape {x.shape}; images must be (N, H, W) or (N, H, W, C) with C 1 or 3")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind == "f":
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise UserError(f"{where} is float with values outside [0, 1] (min {np.nanmin(x):g}, max "
                            f"{np.nanmax(x):g}); save uint8 0..255 or floats scaled to [0, 1]")
        return np.rint(x * 255.0).astype(np.uint8)
    if x.dtype.kind in "iu" and (not x.size or (x.min() >= 0 and x.max() <= 255)):
        return x.astype(np.uint8)
    raise UserError(f"{where} has dtype {x.dtype}; save images as uint8 0..255 or float in [0, 1]")


def _npz_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise UserError(f"{where} has dtype {y.dtype}; labels must be integers 0..K-1")
    if y.shape != (n,):
        raise UserError(f"{where} has shape {y.shape}; expected ({n},), one label per image")
    if n and y.min() < 0:
        raise UserError(f"{where} has negative labels; labels must be integers 0..K-1")
    return y.astype(np.int32)


@_register
class NpzSource(Source):
    """NumPy archive with arrays x, y (+ optional x_test, y_test, class_names): npz:PATH."""

    scheme, arg, usage = "npz", "required", "npz:PATH (a .npz with arrays x and y)"

    def read(self, arg, *, image_size, channels):
        path = Path(arg).expanduser()
        if not path.is_file():
            raise UserError(f"npz: no such file {path}")
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"npz: cannot read {path} as a NumPy .npz archive ({e}); save it with np.savez") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise UserError(f"npz: {path} holds a single array, not an archive; save it with np.savez(path, x=..., "
                            f"y=...)")
        with z:
            for key in ("x", "y"):
                if key not in z:
                    raise UserError(f"npz: {path} has no array '{key}' (found: {', '.join(z.files) or 'none'}); "
                                    f"save images as x and labels as y")
            if ("x_test" in z) != ("y_test" in z):
                raise UserError(f"npz: {path} has only one of x_test and y_test; save both or neither")
            try:
                arrays = {k: z[k] for k in z.files}
            except ValueError as e:  # object arrays need pickle, which we refuse for safety
                raise UserError(f"npz: cannot read {path}: {e}; save class_names as np.array(names, dtype=str)") \
                    from None
        where = f"npz:{path}"
        train_x = _npz_images(arrays["x"], f"{where} array x")
        train_y = _npz_labels(arrays["y"], len(train_x), f"{where} array y")
        test_x = test_y = None
        if "x_test" in arrays:
            test_x = _npz_images(arrays["x_test"], f"{where} array x_test")
            test_y = _npz_labels(arrays["y_test"], len(test_x), f"{where} array y_test")
            if test_x.shape[1:] != train_x.shape[1:]:
                raise UserError(f"{where}: x_test images are {test_x.shape[1:]} but x images are {train_x.shape[1:]}; "
                                f"both splits need the same image shape")
        top = max(int(y.max()) for y in (train_y, test_y) if y is not None and len(y)) if len(train_y) else -1
        if "class_names" in arrays:
            names = [str(c) for c in np.asarray(arrays["class_names"]).reshape(-1)]
            if top >= len(names):
                raise UserError(f"{where}: labels go up to {top} but class_names has only {len(names)} names")
        else:
            names = [str(i) for i in range(top + 1)]
        if len(names) < MIN_CLASSES:
            raise UserError(f"{where} has {len(names)} class; a classifier needs at least {MIN_CLASSES}")
        return Dataset(path.stem, train_x, train_y, test_x, test_y, names)

    def status(self):
        return True, "npz:PATH reads arrays x, y (+ x_test, y_test, class_names) from a .npz file"


# --- image folders ----------------------------------------------------------------------------------------


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not _is_hidden(d)), key=lambda d: d.name)


def _image_files(class_dir: Path) -> list[Path]:
    # rglob: nested folders inside a class folder still belong to that class.
    return sorted(p for p in class_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(p))


def _decode(path: Path) -> np.ndarray:
    """Decode one image to uint8 (H, W, 1) if it is gray, else (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            gray = img.mode in GRAY_MODES
            if img.mode in WIDE_GRAY_MODES:
                # 16-bit gray (e.g. PNG) maps 0..65535 onto 0..255; 32-bit modes holding 8-bit values stay as they are.
                a = np.asarray(img, dtype=np.float64)
                wide = img.mode.startswith("I;16") or (a.size and a.max() > UINT8_MAX)
                scale = UINT8_MAX / UINT16_MAX if wide else 1.0
                return np.clip(np.rint(a * scale), 0, UINT8_MAX).astype(np.uint8)[..., None]
            arr = np.asarray(img.convert("L" if gray else "RGB"))
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; delete or replace the file") from None
    return arr[..., None] if gray else arr


def _decode_all(files: list[tuple[Path, int]]) -> tuple[list[np.ndarray], np.ndarray]:
    """Decode (file, label) pairs; returns the images (natural channels) and int32 labels."""
    return [_decode(f) for f, _ in files], np.array([label for _, label in files], np.int32)


def _stack(images: list[np.ndarray], files: list[Path], image_size, channels: int, root: Path) -> np.ndarray:
    from PIL import Image

    out = []
    first_shape = None
    for img, f in zip(images, files, strict=True):
        img = to_channels(img[None], channels)[0]
        if image_size is not None:
            h, w = image_size
            if img.shape[:2] != (h, w):
                pil = Image.fromarray(img[..., 0] if channels == 1 else img)
                img = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR)).reshape(h, w, channels)
        elif first_shape is None:
            first_shape = (img.shape, f)
        elif img.shape != first_shape[0]:
            (h0, w0, _), f0 = first_shape
            raise UserError(f"images in {root} have different sizes ({f0.name} is {h0}x{w0}, {f.name} is "
                            f"{img.shape[0]}x{img.shape[1]}); set data.image_size in the recipe, e.g. "
                            f"`image_size: [64, 64]` under `data:`")
        out.append(img)
    if not out:
        h, w = image_size or (1, 1)
        return np.zeros((0, h, w, channels), np.uint8)
    return np.stack(out)


def _folder_listing(files: list[Path], root: Path) -> list[tuple[str, int, int]]:
    listing = []
    for f in files:
        st = f.stat()
        listing.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return listing


def read_folder(path: Path, image_size: tuple[int, int] | None = None, channels: int | None = None) -> Dataset:
    """Read `path/train/<class>/*` (+ optional `path/test/<class>/*`) or `path/<class>/*` (all train).

    Decoded arrays are cached under `cache_dir()`, keyed by the folder, the options and the
    (name, size, mtime) of every file, so editing the folder invalidates the cache.

    Raises:
        UserError: Missing folder, fewer than 2 classes, an unreadable image, or mixed image sizes
            without `image_size`.
    """
    if not path.is_dir():
        raise UserError(f"folder: no such directory {path}; give a folder with one sub-folder of images per class")
    root = path.resolve()
    train_root, test_root = root, None
    if (root / "train").is_dir():
        train_root = root / "train"
        test_root = root / "test" if (root / "test").is_dir() else None
    class_names = [d.name for d in _class_dirs(train_root)]
    if len(class_names) < MIN_CLASSES:
        n = len(class_names)
        raise UserError(f"found {n} class folder{'' if n == 1 else 's'} in {train_root}: a classifier needs at least "
                        f"{MIN_CLASSES} sub-folders, one per class")
    if test_root is not None:
        unknown = [d.name for d in _class_dirs(test_root) if d.name not in class_names]
        if unknown:
            raise UserError(f"{test_root} has class folder(s) {', '.join(unknown)} that {train_root} lacks; "
                            f"every test class needs training images")

    splits = {"train": train_root} | ({"test": test_root} if test_root else {})
    files = {s: [(f, label) for label, name in enumerate(class_names) if (r / name).is_dir()
                 for f in _image_files(r / name)] for s, r in splits.items()}
    train_labels = {label for _, label in files["train"]}
    for label, name in enumerate(class_names):
        if label not in train_labels:
            raise UserError(f"class folder {train_root / name} has no images "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove the folder")
    key = cache_key("folder", str(root), image_size and list(image_size), channels,
                    {s: _folder_listing([f for f, _ in fs], root) for s, fs in files.items()})
    cache = cache_dir() / f"folder-{root.name}-{key}.npz"
    cached = _cache_load(cache, root.name)
    if cached is not None:
        return cached

    decoded = {s: _decode_all(fs) for s, fs in files.items()}
    if channels is None:
        all_gray = all(img.shape[-1] == 1 for imgs, _ in decoded.values() for img in imgs)
        channels = 1 if all_gray else 3
    arrays = {s: (_stack(imgs, [f for f, _ in files[s]], image_size, channels, splits[s]), y)
              for s, (imgs, y) in decoded.items()}
    train_x, train_y = arrays["train"]
    test_x, test_y = arrays.get("test", (None, None))
    if test_x is not None and len(test_x) and test_x.shape[1:] != train_x.shape[1:]:
        raise UserError(f"test images in {test_root} are {test_x.shape[1]}x{test_x.shape[2]} but train images are "
                        f"{train_x.shape[1]}x{train_x.shape[2]}; set data.image_size in the recipe")
    if test_x is not None and not len(test_x):
        test_x = test_y = None
    ds = Dataset(root.name, train_x, train_y, test_x, test_y, class_names)
    _cache_save(cache, ds)
    return ds


@_register
class FolderSource(Source):
    """Image files, one sub-folder per class (optionally under train/ and test/): folder:PATH."""

    scheme, arg, usage = "folder", "required", "folder:PATH (PATH/<class>/*.png or PATH/train/<class>/...)"

    def read(self, arg, *, image_size, channels):
        return read_folder(Path(arg).expanduser(), image_size, channels)

    def status(self):
        if find_spec("PIL") is None:
            return False, "needs Pillow: pip install pillow"
        return True, "folder:PATH reads PATH/<class>/*.{png,jpg,jpeg,bmp,gif}; decoded once, then cached"


# --- TensorFlow Datasets ----------------------------------------------------------------------------------


@_register
class TfdsSource(Source):
    """A prepared TensorFlow Datasets dataset, read without TensorFlow: tfds:NAME."""

    scheme, arg, usage = "tfds", "required", "tfds:NAME (e.g. tfds:cifar10)"

    def read(self, arg, *, image_size, channels):
        from cnncli.data import tfds_source

        return tfds_source.load_tfds(arg)

    def status(self):
        from cnncli.data import tfds_source

        return tfds_source.status()


# --- synthetic --------------------------------------------------------------------------------------------


def _parse_synthetic(arg: str | None) -> tuple[tuple[int, int, int], int]:
    if not arg:
        return SYNTHETIC_DEFAULT_SHAPE, SYNTHETIC_DEFAULT_CLASSES
    shape_s, _, k_s = arg.partition(":")
    try:
        dims = tuple(int(d) for d in shape_s.lower().split("x"))
        k = int(k_s) if k_s else SYNTHETIC_DEFAULT_CLASSES
    except ValueError:
        dims, k = (), 0
    if len(dims) == 2:
        dims = (*dims, 1)
    if len(dims) != 3 or min(dims[:2]) < 1 or dims[2] not in (1, 3) or k < MIN_CLASSES:
        raise UserError(f"synthetic:{arg} is not HxWxC[:K] (C 1 or 3, K >= {MIN_CLASSES}); e.g. synthetic:32x32x3:5")
    return dims, k  # type: ignore[return-value]


def make_synthetic(shape: tuple[int, int, int] = SYNTHETIC_DEFAULT_SHAPE, num_classes: int = SYNTHETIC_DEFAULT_CLASSES,
                   n_train: int = SYNTHETIC_TRAIN, n_test: int = SYNTHETIC_TEST, seed: int = SYNTHETIC_SEED) -> Dataset:
    """Deterministic learnable images: each class is a smooth random template plus uniform noise."""
    from PIL import Image

    h, w, c = shape
    rng = np.random.default_rng([seed, h, w, c, num_classes])
    coarse = rng.integers(0, 256, (num_classes, SYNTHETIC_GRID, SYNTHETIC_GRID, c), dtype=np.uint8)
    templates = np.stack([
        np.asarray(Image.fromarray(t[..., 0] if c == 1 else t).resize((w, h), Image.Resampling.BILINEAR))
        .reshape(h, w, c) for t in coarse])
    templates = (templates * SYNTHETIC_TEMPLATE_WEIGHT).astype(np.uint8)
    noise_max = int(255 * (1 - SYNTHETIC_TEMPLATE_WEIGHT))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)  # balanced classes
        x = templates[y] + rng.integers(0, noise_max + 1, (n, h, w, c), dtype=np.uint8)
        return x, y

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, [f"class{i}" for i in range(num_classes)])


@_register
class SyntheticSource(Source):
    """Deterministic learnable images for tests: synthetic[:HxWxC[:K]] (default 28x28x1, 10 classes)."""

    scheme, arg = "synthetic", "optional"

    def read(self, arg, *, image_size, channels):
        shape, k = _parse_synthetic(arg)
        return make_synthetic(shape, k)

    def status(self):
        return True, (f"generated: {SYNTHETIC_TRAIN:,} train / {SYNTHETIC_TEST:,} test images, "
                      f"synthetic:HxWxC:K (default 28x28x1:10)")


# ---------------------------------------------------------------------------------------------------------
# Public entry points


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split "scheme:arg" into (scheme, arg); "scheme" gives (scheme, None)."""
    scheme, sep, arg = spec.strip().partition(":")
    if not scheme:
        raise UserError(f"dataset '{spec}' has no name; use one of: {', '.join(SOURCES.names())}")
    return scheme, (arg if sep else None)


def load_dataset(spec: str, *, image_size: tuple[int, int] | None = None, channels: int | None = None) -> Dataset:
    """Load a dataset by spec, e.g. "fashion_mnist", "folder:/data/pets", "synthetic:32x32x3:5".

    Args:
        spec: "scheme" or "scheme:arg"; schemes are the names in `SOURCES`.
        image_size: Resize every split to (H, W) (Pillow bilinear, antialiased); None keeps the size.
        channels: Convert every split to 1 (gray, ITU-R 601 luma) or 3 (RGB) channels; None keeps them.

    Raises:
        UserError: Unknown scheme (with suggestions), missing or malformed data.
    """
    scheme, arg = parse_spec(spec)
    source: Source = SOURCES.get(scheme)
    return source.load(arg, image_size=image_size, channels=channels)


def dataset_status() -> list[tuple[str, bool, str]]:
    """(name, available here, one-line detail or how to get it) for every source, for `cnncli datasets`."""
    return [(name, *SOURCES.get(name).status()) for name in SOURCES.names()]


def subset(ds: Dataset, *, classes: list[int] | None = None, train_per_class: int | None = None,
           limit: int | None = None, seed: int = 0) -> Dataset:
    """Keep some classes and/or fewer training images.

    Args:
        ds: The dataset.
        classes: Keep only these classes (train and test), relabelled 0..k-1 in the given order;
            class names follow. E.g. Fashion-MNIST task A = [0, 1, 2, 3, 4], task B = [5, ..., 9].
        train_per_class: Keep at most this many training images per class, chosen at random but
            deterministically for `seed` (a stratified few-shot subset), in their original order.
        limit: Keep only the first `limit` training images (after the above).
        seed: Seed for `train_per_class`.

    Raises:
        UserError: An unknown or repeated class index, or a non-positive count.
    """
    if classes is not None:
        k = ds.num_classes
        bad = [c for c in classes if not 0 <= c < k]
        if bad:
            raise UserError(f"data.classes: class {bad[0]} does not exist; {ds.name} has {k} classes (0..{k - 1})")
        if len(set(classes)) != len(classes):
            raise UserError(f"data.classes {list(classes)} repeats a class; list each class once")
        if len(classes) < MIN_CLASSES:
            raise UserError(f"data.classes {list(classes)} keeps {len(classes)} class; a classifier needs at least "
                            f"{MIN_CLASSES}")
        relabel = np.full(k, -1, np.int32)
        relabel[np.asarray(classes, dtype=np.int64)] = np.arange(len(classes), dtype=np.int32)

        def pick(x, y):
            if x is None:
                return None, None
            keep = relabel[y] >= 0
            return x[keep], relabel[y[keep]]

        train_x, train_y = pick(ds.train_x, ds.train_y)
        test_x, test_y = pick(ds.test_x, ds.test_y)
        ds = Dataset(ds.name, train_x, train_y, test_x, test_y, [ds.class_names[c] for c in classes])
    if train_per_class is not None:
        if train_per_class < 1:
            raise UserError(f"data.train_per_class is {train_per_class}; it must be at least 1")
        rng = np.random.default_rng(seed)
        keep = []
        for c in range(ds.num_classes):
            idx = np.flatnonzero(ds.train_y == c)
            keep.append(idx if len(idx) <= train_per_class else rng.choice(idx, train_per_class, replace=False))
        keep_idx = np.sort(np.concatenate(keep))
        ds = replace(ds, train_x=ds.train_x[keep_idx], train_y=ds.train_y[keep_idx])
    if limit is not None:
        if limit < 1:
            raise UserError(f"data.limit is {limit}; it must be at least 1")
        ds = replace(ds, train_x=ds.train_x[:limit], train_y=ds.train_y[:limit])
    return ds
