"""The in-memory dataset every source produces, the cache of decoded datasets, and subsets of them."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncli.errors import UserError, brief

# Where cached decoded datasets live; CNNCLI_CACHE overrides the root.
CACHE_ENV = "CNNCLI_CACHE"
DEFAULT_CACHE_ROOT = "~/.cache/cnncli"
CACHE_SUBDIR = "datasets"
# Bump when the cache layout or decoding changes, so stale caches are never read.
CACHE_VERSION = 1

MIN_CLASSES = 2


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
# Cache of decoded arrays (folders and TFDS decode slowly)


def cache_dir() -> Path:
    """Directory for cached decoded datasets: ${CNNCLI_CACHE:-~/.cache/cnncli}/datasets."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser() / CACHE_SUBDIR


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-serialisable `parts` (plus the cache version)."""
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def load_cached(path: Path, name: str) -> Dataset | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            has_test = "test_x" in z
            return Dataset(name, z["train_x"], z["train_y"], z["test_x"] if has_test else None,
                           z["test_y"] if has_test else None, [str(c) for c in z["class_names"]])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None  # a damaged cache is just a cache miss; it gets rewritten


def save_cached(path: Path, ds: Dataset) -> None:
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


def subset_indices(name: str, train_y: np.ndarray, test_y: np.ndarray | None, class_names: list[str], *,
                   classes: list[int] | None = None, train_per_class: int | None = None, limit: int | None = None,
                   seed: int = 0):
    """Which examples `subset` keeps: (train indices, their new labels, test indices, their new labels, names).

    Works on labels alone, so a dataset streamed from disk is selected exactly like one in memory.

    Raises:
        UserError: An unknown or repeated class index, or a non-positive count.
    """
    train_idx = np.arange(len(train_y))
    test_idx = None if test_y is None else np.arange(len(test_y))
    names = list(class_names)
    if classes is not None:
        k = len(class_names)
        bad = [c for c in classes if not 0 <= c < k]
        if bad:
            raise UserError(f"data.classes: class {bad[0]} does not exist; {name} has {k} classes (0..{k - 1})")
        if len(set(classes)) != len(classes):
            seen: set[int] = set()
            repeated = next(c for c in classes if c in seen or seen.add(c))
            raise UserError(f"data.classes {brief(list(classes))} repeats class {repeated}; list each class once")
        if len(classes) < MIN_CLASSES:
            raise UserError(f"data.classes {brief(list(classes))} keeps {len(classes)} class; a classifier needs at "
                            f"least {MIN_CLASSES}")
        relabel = np.full(k, -1, np.int32)
        relabel[np.asarray(classes, dtype=np.int64)] = np.arange(len(classes), dtype=np.int32)
        train_idx = np.flatnonzero(relabel[train_y] >= 0)
        train_y = relabel[train_y[train_idx]]
        if test_y is not None:
            test_idx = np.flatnonzero(relabel[test_y] >= 0)
            test_y = relabel[test_y[test_idx]]
        names = [class_names[c] for c in classes]
    if train_per_class is not None:
        if train_per_class < 1:
            raise UserError(f"data.train_per_class is {train_per_class}; it must be at least 1")
        rng = np.random.default_rng(seed)
        keep = []
        for c in range(len(names)):
            idx = np.flatnonzero(train_y == c)
            keep.append(idx if len(idx) <= train_per_class else rng.choice(idx, train_per_class, replace=False))
        keep_idx = np.sort(np.concatenate(keep))
        train_idx, train_y = train_idx[keep_idx], train_y[keep_idx]
    if limit is not None:
        if limit < 1:
            raise UserError(f"data.limit is {limit}; it must be at least 1")
        train_idx, train_y = train_idx[:limit], train_y[:limit]
    return train_idx, train_y.astype(np.int32), test_idx, None if test_y is None else test_y.astype(np.int32), names


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
    if classes is None and train_per_class is None and limit is None:
        return ds
    train_idx, train_y, test_idx, test_y, names = subset_indices(
        ds.name, ds.train_y, ds.test_y, ds.class_names, classes=classes, train_per_class=train_per_class, limit=limit,
        seed=seed)
    test_x = None if ds.test_x is None else ds.test_x[test_idx]
    return Dataset(ds.name, ds.train_x[train_idx], train_y, test_x, test_y, names)
