"""From a recipe's `data` section to train/validation/test arrays and normalization statistics.

Everything here is host-side NumPy, done once per run. The arrays stay uint8 until they are on the
device; the jitted steps gather and convert batches there (see docs/design.md).
"""

from dataclasses import dataclass

import numpy as np

from cnncli.data.dataset import MIN_CLASSES, subset
from cnncli.data.sources import load_dataset
from cnncli.errors import UserError
from cnncli.recipe import DataConfig

MIN_STD = 1e-3  # a constant channel (e.g. a blank border) must not divide by ~0
SPLITS = ("train", "val", "test", "all")


@dataclass(frozen=True)
class Splits:
    """The run's data: uint8 NHWC images and int32 labels per split, plus what travels with them."""

    source: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    class_names: list[str]
    mean: tuple[float, ...]  # per channel, in pixel units [0, 1]: the model's first op uses them
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_x.shape[1:])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels of split `name`: train, val, test, or all (every image of the three)."""
        arrays = {"train": (self.train_x, self.train_y), "val": (self.val_x, self.val_y),
                  "test": (self.test_x, self.test_y)}
        present = {k: v for k, v in arrays.items() if v[0] is not None and len(v[0])}
        if name == "all":
            return (np.concatenate([x for x, _ in present.values()]),
                    np.concatenate([y for _, y in present.values()]))
        if name not in arrays:
            raise UserError(f"unknown split '{name}'; choose {', '.join(SPLITS)}")
        if name not in present:
            have = ", ".join(f"{k} ({len(v[0]):,} images)" for k, v in present.items())
            raise UserError(f"the dataset '{self.source}' has no {name} split; it has {have}: choose one with "
                            f"--split, or --split all for every image")
        return arrays[name]


def channel_stats(x: np.ndarray, mode: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, as the preprocessing mode needs them."""
    channels = x.shape[-1]
    if mode == "scale":
        return (0.0,) * channels, (1.0,) * channels
    pixels = x.reshape(-1, channels).astype(np.float64) / 255.0
    mean = tuple(float(m) for m in pixels.mean(axis=0))
    if mode == "center":
        return mean, (1.0,) * channels
    std = tuple(max(float(s), MIN_STD) for s in pixels.std(axis=0))
    return mean, std


def split_train_val(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Hold out `fraction` of the training set for validation, shuffled with the recipe's seed."""
    if fraction <= 0:
        return x, y, x[:0], y[:0]
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = int(round(fraction * len(x)))
    if n_val == 0 or n_val == len(x):
        raise UserError(f"data.val_fraction={fraction} leaves an empty split of {len(x)} training images")
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def load_splits(data: DataConfig, seed: int, *, min_classes: int = MIN_CLASSES) -> Splits:
    """Load the recipe's dataset, select classes/subsets, split off validation, compute statistics.

    Training needs `min_classes` (2) classes; evaluating a trained model on data of one of its classes does not.
    """

    ds = load_dataset(data.source, image_size=data.image_size, channels=data.channels)
    ds = subset(ds, classes=data.classes, train_per_class=data.train_per_class, limit=data.limit, seed=seed)
    if ds.num_classes < min_classes:
        raise UserError(f"dataset '{data.source}' has {ds.num_classes} class: a classifier needs at least "
                        f"{min_classes}")
    train_x, train_y, val_x, val_y = split_train_val(ds.train_x, ds.train_y, data.val_fraction, seed)
    mean, std = channel_stats(train_x, data.preprocess)
    return Splits(source=data.source, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y,
                  test_x=ds.test_x, test_y=ds.test_y, class_names=list(ds.class_names), mean=mean, std=std)
