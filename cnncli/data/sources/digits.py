"""scikit-learn's bundled 8x8 handwritten digits: always available offline."""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np

from cnncli.data.dataset import Dataset
from cnncli.data.sources.base import Source, register

DIGITS_TEST_FRACTION = 0.2
# Fixed, independent of the recipe's seed, so every run evaluates on the same 360 digits.
DIGITS_SPLIT_SEED = 1234
DIGITS_MAX_VALUE = 16


@register
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


