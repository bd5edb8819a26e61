"""CIFAR-10 and CIFAR-100 from the official python batches (cifar-10-batches-py, cifar-100-python).

The batches are Python pickles. Unpickling runs whatever callables a pickle names, so they are read
with an unpickler that knows the batches' layout: a dict of labels, file names and one uint8 array.
It resolves only the three names NumPy's array pickles use (`_reconstruct`, `ndarray`, `dtype`), and
to stand-ins that record their arguments; the array is then built here from its raw bytes, after
checking that it is uint8 of the expected shape. Any other name in the pickle is refused, so a
tampered file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from cnncli.data.dataset import Dataset
from cnncli.data.sources.base import Source, register
from cnncli.errors import UserError

SIDE, CHANNELS = 32, 3
PIXELS = SIDE * SIDE * CHANNELS
# (archive folder, training batches, test batch, meta file, label key, class-name key)
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}
# The names NumPy writes into array pickles (numpy.core before NumPy 2, numpy._core since).
_ARRAY_NAMES = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}


class _Stub:
    """A stand-in for an object the pickle builds: keeps the constructor arguments and the state."""

    def __init__(self, name: str, *args):
        self.name, self.args, self.state = name, args, None

    def __setstate__(self, state):
        self.state = state


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ARRAY_NAMES:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch")
        return lambda *args: _Stub(name, *args)


def _array(stub, where: str) -> np.ndarray:
    """The uint8 array an ndarray stub describes: state (version, shape, dtype, fortran, raw bytes)."""
    if not isinstance(stub, _Stub) or stub.name != "_reconstruct" or not isinstance(stub.state, tuple):
        raise UserError(f"{where}: 'data' is not a NumPy array; is this a CIFAR python batch?")
    _, shape, dtype, fortran, raw = stub.state
    code = dtype.args[0] if isinstance(dtype, _Stub) and dtype.args else None
    code = code.decode() if isinstance(code, bytes) else code
    if code != "u1" or not isinstance(raw, bytes | str):
        raise UserError(f"{where}: 'data' has dtype {code}, expected uint8; is this a CIFAR python batch?")
    raw = raw.encode("latin1") if isinstance(raw, str) else raw
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2 or shape[1] != PIXELS or len(raw) != shape[0] * PIXELS:
        raise UserError(f"{where}: 'data' has shape {shape} ({len(raw)} bytes), expected (N, {PIXELS})")
    return np.frombuffer(raw, np.uint8).reshape(shape, order="F" if fortran else "C")


def _load(data: bytes, where: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{where} is not a CIFAR python batch: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a CIFAR python batch (a {type(obj).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _get(batch: dict, key: str, where: str):
    if key not in batch:
        raise UserError(f"{where} has no '{key}' entry (it has: {', '.join(map(str, batch))}); is this the right "
                        "CIFAR variant?")
    return batch[key]


def _labels(values, n: int, classes: int, where: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) != n or not all(isinstance(v, int) for v in values):
        raise UserError(f"{where}: labels are not {n} integers")
    y = np.asarray(values, np.int32)
    if n and (y.min() < 0 or y.max() >= classes):
        raise UserError(f"{where}: labels outside 0..{classes - 1}")
    return y


def _reader(path: Path, folder: str, meta_file: str):
    """A function file name -> bytes over the batches in `path`: the batch folder, its parent, or the .tar.gz."""
    if path.is_file():
        try:
            archive = tarfile.open(path)
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"cannot open {path} as a CIFAR archive: {e}") from None
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}

        def read_member(name: str) -> bytes:
            if name not in members:
                raise UserError(f"{path} has no {name}: is it the python version of CIFAR ({folder}.tar.gz)?")
            return archive.extractfile(members[name]).read()

        return read_member
    for directory in (path / folder, path):
        if (directory / meta_file).is_file():
            def read_file(name: str, directory=directory) -> bytes:
                if not (directory / name).is_file():
                    raise UserError(f"{directory} has no {name}: the CIFAR batches are incomplete")
                return (directory / name).read_bytes()

            return read_file
    raise UserError(f"no CIFAR python batches in {path}: give the extracted {folder} folder (or its .tar.gz) "
                    "from https://www.cs.toronto.edu/~kriz/cifar.html")


def read_cifar(path: Path, variant: str) -> Dataset:
    """Read CIFAR-10 or CIFAR-100 (`variant`) from its python batches; images become (N, 32, 32, 3) uint8."""
    folder, train_files, test_file, meta_file, label_key, names_key = LAYOUTS[variant]
    if not path.exists():
        raise UserError(f"{variant}: no such file or directory {path}")
    read = _reader(path, folder, meta_file)
    meta = _load(read(meta_file), f"{path}/{meta_file}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, names_key, meta_file)]

    def split(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in files:
            batch = _load(read(name), f"{path}/{name}")
            x = _array(_get(batch, "data", name), f"{path}/{name}")
            xs.append(x.reshape(-1, CHANNELS, SIDE, SIDE).transpose(0, 2, 3, 1))  # stored as planes R, G, B
            ys.append(_labels(_get(batch, label_key, name), len(x), len(names), f"{path}/{name}"))
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

    train_x, train_y = split(train_files)
    test_x, test_y = split([test_file])
    return Dataset(variant, train_x, train_y, test_x, test_y, names)


class _Cifar(Source):
    arg = "required"
    variant = ""

    def read(self, arg, *, image_size, channels):
        return read_cifar(Path(arg).expanduser(), self.variant)

    def status(self):
        folder = LAYOUTS[self.variant][0]
        return True, f"{self.scheme}:DIR reads the python batches in DIR ({folder}, or its .tar.gz); no download"


@register
class Cifar10Source(_Cifar):
    """CIFAR-10 (60,000 32x32 colour images, 10 classes) from the python batches: cifar10:DIR."""

    scheme, variant, usage = "cifar10", "cifar10", "cifar10:DIR (the extracted cifar-10-batches-py)"


@register
class Cifar100Source(_Cifar):
    """CIFAR-100 (60,000 32x32 colour images, 100 fine classes) from the python batches: cifar100:DIR."""

    scheme, variant, usage = "cifar100", "cifar100", "cifar100:DIR (the extracted cifar-100-python)"
