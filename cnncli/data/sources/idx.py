"""MNIST-style IDX files: idx:DIR (and the reader Fashion-MNIST uses).

Hand-written with NumPy: it reads Debian's gzipped files offline, without the TensorFlow that TFDS
needs to prepare them (docs/design.md, habit 10).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from cnncli.data.dataset import Dataset
from cnncli.data.sources.base import Source, register
from cnncli.errors import UserError

# IDX header: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per dimension.
IDX_UBYTE = 0x08
IDX_IMAGES_NDIM = 3
IDX_LABELS_NDIM = 1
IDX_TRAIN_PREFIXES = ("train",)
IDX_TEST_PREFIXES = ("t10k", "test")
IDX_CLASSES_FILE = "classes.txt"
IDX_EXPECTED = "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz], or train-images.idx3-ubyte and so on"



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


@register
class IdxSource(Source):
    """Any MNIST-style directory of IDX files: idx:DIR."""

    scheme, arg, usage = "idx", "required", "idx:DIR (a directory with train-images-idx3-ubyte[.gz] and friends)"

    def read(self, arg, *, image_size, channels):
        directory = Path(arg).expanduser()
        return read_idx_dir(directory, directory.name or "idx")

    def status(self):
        return True, "idx:DIR reads MNIST-style IDX files (train-images-idx3-ubyte[.gz], ...)"


