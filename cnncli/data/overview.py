"""Know your data before training on it: class counts, imbalance, and example images per class.

The numbers behind `cnncli data show`; the grid of examples is drawn by `cnncli.inspect.figures`.
"""

from typing import Any

import numpy as np

from cnncli.data.dataset import Dataset
from cnncli.errors import UserError

SPLITS = ("train", "test", "all")


def split_arrays(ds: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of a source's train or test split, or both together (`all`)."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    if split in ("test", "all") and ds.test_x is None:
        if split == "test":
            raise UserError(f"'{ds.name}' has no test split; use --split train or --split all")
        return ds.train_x, ds.train_y
    if split == "train":
        return ds.train_x, ds.train_y
    if split == "test":
        return ds.test_x, ds.test_y
    return np.concatenate([ds.train_x, ds.test_x]), np.concatenate([ds.train_y, ds.test_y])


def class_counts(labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Images per class, their shares, and the imbalance ratio (largest class / smallest class).

    A class without images makes the ratio infinite (reported as None, with the empty classes listed).
    """
    counts = np.bincount(np.asarray(labels), minlength=len(class_names))
    total = int(counts.sum())
    empty = [name for name, c in zip(class_names, counts) if c == 0]
    return {"n": total, "classes": [{"class": name, "index": i, "count": int(c), "share": float(c / max(total, 1))}
                                    for i, (name, c) in enumerate(zip(class_names, counts))],
            "imbalance": None if empty else float(counts.max() / counts.min()), "empty": empty,
            "largest": class_names[int(counts.argmax())], "smallest": class_names[int(counts.argmin())]}


def examples_per_class(labels: np.ndarray, num_classes: int, per_class: int, seed: int = 0) -> list[np.ndarray]:
    """For each class, the sorted indices of up to `per_class` of its images, drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(num_classes):
        mine = np.flatnonzero(labels == k)
        out.append(np.sort(rng.choice(mine, size=min(per_class, len(mine)), replace=False)))
    return out
