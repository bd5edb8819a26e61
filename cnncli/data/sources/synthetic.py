"""Deterministic learnable images for tests: synthetic[:HxWxC[:K]]."""

from __future__ import annotations

import numpy as np

from cnncli.data.dataset import MIN_CLASSES, Dataset
from cnncli.data.images import resize_image
from cnncli.data.sources.base import Source, register
from cnncli.errors import UserError

SYNTHETIC_DEFAULT_SHAPE = (28, 28, 1)
SYNTHETIC_DEFAULT_CLASSES = 10
SYNTHETIC_TRAIN = 2000
SYNTHETIC_TEST = 500
SYNTHETIC_SEED = 0
# Templates are drawn on a coarse grid and upsampled, so they are smooth blobs a CNN learns quickly.
SYNTHETIC_GRID = 4
# Pixel = TEMPLATE_WEIGHT * template + noise in [0, 255 - TEMPLATE_WEIGHT * 255]: learnable, not trivial.
SYNTHETIC_TEMPLATE_WEIGHT = 0.6



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
    h, w, c = shape
    rng = np.random.default_rng([seed, h, w, c, num_classes])
    coarse = rng.integers(0, 256, (num_classes, SYNTHETIC_GRID, SYNTHETIC_GRID, c), dtype=np.uint8)
    templates = np.stack([resize_image(t, (h, w)) for t in coarse])
    templates = (templates * SYNTHETIC_TEMPLATE_WEIGHT).astype(np.uint8)
    noise_max = int(255 * (1 - SYNTHETIC_TEMPLATE_WEIGHT))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)  # balanced classes
        x = templates[y] + rng.integers(0, noise_max + 1, (n, h, w, c), dtype=np.uint8)
        return x, y

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, [f"class{i}" for i in range(num_classes)])


@register
class SyntheticSource(Source):
    """Deterministic learnable images for tests: synthetic[:HxWxC[:K]] (default 28x28x1, 10 classes)."""

    scheme, arg = "synthetic", "optional"

    def read(self, arg, *, image_size, channels):
        shape, k = _parse_synthetic(arg)
        return make_synthetic(shape, k)

    def status(self):
        return True, (f"generated: {SYNTHETIC_TRAIN:,} train / {SYNTHETIC_TEST:,} test images, "
                      f"synthetic:HxWxC:K (default 28x28x1:10)")


