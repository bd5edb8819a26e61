"""cifar10:DIR / cifar100:DIR: the official python batches, read without running any pickled code."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from cnncli.data.sources import load_dataset
from cnncli.errors import UserError


def py2_pickle(obj) -> bytes:
    """`obj` pickled as Python 2's cPickle wrote the official batches (protocol 2, byte strings as
    BINSTRING opcodes, which Python 3 reads back as bytes with encoding='bytes')."""

    class Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose opcode writers can be swapped
        dispatch = pickle._Pickler.dispatch.copy()

        def save_py2_str(self, data: bytes):
            n = len(data)
            op = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + n.to_bytes(4, "little")
            self.write(op + data)
            self.memoize(data)

        dispatch[bytes] = save_py2_str

    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _batch(rng, n, label_key, classes):
    """A batch in the official layout: bytes keys (Python 2 str), labels as a list, data (n, 3072) uint8
    holding the R, G and B planes of each 32x32 image in turn."""
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    labels = rng.integers(0, classes, n).tolist()
    batch = {b"batch_label": b"training batch", label_key: labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return batch, images, np.asarray(labels)


def write_cifar10(root, rng, per_batch=7):
    root.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch, images, labels = _batch(rng, per_batch, b"labels", 10)
        (root / name).write_bytes(py2_pickle(batch))
        xs.append(images)
        ys.append(labels)
    meta = {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (root / "batches.meta").write_bytes(py2_pickle(meta))
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def test_cifar10_batches(tmp_path):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    for spec in (f"cifar10:{tmp_path / 'cifar-10-batches-py'}", f"cifar10:{tmp_path}"):  # the folder or its parent
        ds = load_dataset(spec)
        np.testing.assert_array_equal(ds.train_x, train_x)
        np.testing.assert_array_equal(ds.train_y, train_y)
        np.testing.assert_array_equal(ds.test_x, test_x)
        np.testing.assert_array_equal(ds.test_y, test_y)
        assert ds.class_names == CIFAR10_NAMES and ds.train_x.shape == (35, 32, 32, 3)


def test_cifar10_archive(tmp_path):
    train_x, _, test_x, _ = write_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(1))
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_dataset(f"cifar10:{tmp_path / 'cifar-10-python.tar.gz'}")
    np.testing.assert_array_equal(ds.train_x, train_x)
    np.testing.assert_array_equal(ds.test_x, test_x)


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    names = [f"class{i}" for i in range(100)]
    expected = {}
    for split in ("train", "test"):
        batch, images, labels = _batch(rng, 11, b"fine_labels", 100)
        batch[b"coarse_labels"] = (labels // 5).tolist()
        (root / split).write_bytes(py2_pickle(batch))
        expected[split] = (images, labels)
    meta = {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c"] * 20}
    (root / "meta").write_bytes(py2_pickle(meta))
    ds = load_dataset(f"cifar100:{root}")
    np.testing.assert_array_equal(ds.train_x, expected["train"][0])
    np.testing.assert_array_equal(ds.test_y, expected["test"][1])
    assert ds.class_names == names


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar10(root, np.random.default_rng(3))
    marker = tmp_path / "pwned"
    (root / "data_batch_3").write_bytes(py2_pickle({b"data": _Exploit(marker), b"labels": []}))
    with pytest.raises(UserError, match=r"data_batch_3 is not a CIFAR python batch: refusing to load "
                                        r"(posix|os)\.system"):
        load_dataset(f"cifar10:{root}")
    assert not marker.exists()
    # pickle's own loader would have run it: the test's exploit is real
    pickle.loads((root / "data_batch_3").read_bytes())
    assert marker.exists()


def test_malformed_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar10(root, np.random.default_rng(4))
    floats = {b"data": np.zeros((7, 3072), np.float32), b"labels": [0] * 7}
    (root / "data_batch_2").write_bytes(py2_pickle(floats))
    with pytest.raises(UserError, match=r"data_batch_2: 'data' has dtype f4, expected uint8"):
        load_dataset(f"cifar10:{root}")
    (root / "data_batch_2").unlink()
    with pytest.raises(UserError, match=r"has no data_batch_2: the CIFAR batches are incomplete"):
        load_dataset(f"cifar10:{root}")
    with pytest.raises(UserError, match=r"no CIFAR python batches in .*: give the extracted cifar-10-batches-py"):
        (tmp_path / "empty").mkdir()
        load_dataset(f"cifar10:{tmp_path / 'empty'}")
    (tmp_path / "x.tar.gz").write_bytes(io.BytesIO(b"no archive").getvalue())
    with pytest.raises(UserError, match="cannot open .*x.tar.gz as a CIFAR archive"):
        load_dataset(f"cifar10:{tmp_path / 'x.tar.gz'}")
