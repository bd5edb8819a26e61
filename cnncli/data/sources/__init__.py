"""Named datasets: every source turns into uint8 NHWC images, int32 labels and class names.

A dataset is named by a spec, ``scheme`` or ``scheme:arg``::

    fashion_mnist                 Fashion-MNIST from local IDX files (Debian's dataset-fashion-mnist) or TFDS
    digits                        scikit-learn's bundled 8x8 digits (always available offline)
    tfds:cifar10                  an already prepared TensorFlow Datasets dataset (read without TensorFlow)
    folder:/data/pets             one sub-folder per class (optionally under train/ and test/)
    npz:/data/x.npz               arrays x, y (+ x_test, y_test, class_names)
    arrayrecord:/data/pets_ar     ArrayRecord shards written by `cnncli data convert` (streams)
    cifar10:/data/cifar-10-batches-py   CIFAR-10's python batches (cifar100: likewise)
    idx:/data/mnist               any MNIST-style directory of IDX files
    synthetic:32x32x3:5           deterministic learnable images for tests

Every source is a `Source` (see `base`), one module each, registered in `SOURCES` under its scheme.
Sources return the data in its natural form; `Source.load` then converts channels (gray = ITU-R 601
luma, RGB = repeated gray) and resizes (Pillow, bilinear with antialiasing) so all splits share one shape.
Sources that can stream (folders, ArrayRecord) also give their records one at a time
(`Source.records`), for data.pipeline=stream.

This module must stay cheap to import (the CLI imports it for `--help` and `cnncli datasets`):
scikit-learn, Pillow and tensorflow_datasets are imported inside the functions that need them,
and jax never.
"""

from __future__ import annotations

import importlib
import pkgutil

from cnncli.data.dataset import Dataset
from cnncli.data.records import RecordData
from cnncli.data.sources.base import SOURCES, Source
from cnncli.errors import UserError

# Each module in this package registers its source on import, so adding a source is adding a file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


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


def load_records(spec: str) -> RecordData | None:
    """The dataset named by `spec` as records read one at a time, or None if its source loads only whole.

    Raises:
        UserError: Unknown scheme, missing or malformed data.
    """
    scheme, arg = parse_spec(spec)
    source: Source = SOURCES.get(scheme)
    source.check_arg(arg)
    return source.records(arg)


def dataset_status() -> list[tuple[str, bool, str]]:
    """(name, available here, one-line detail or how to get it) for every source, for `cnncli datasets`."""
    return [(name, *SOURCES.get(name).status()) for name in SOURCES.names()]


