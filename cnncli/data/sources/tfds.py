"""TensorFlow Datasets without TensorFlow: read prepared array_record datasets, prepare new ones.

Reading goes through `tfds.data_source`, which parses the stored examples with TFDS's own protobuf
classes and Pillow, so it needs no TensorFlow. Decoding runs at about 2,500 images/s, so the decoded
arrays are cached as .npz once. Preparing (download + convert) does need TensorFlow, installed by the
optional `prepare` extra.

`tensorflow_datasets` is imported only inside the functions that read or prepare: importing it is
slow, and `cnncli --help` and `cnncli datasets` must stay instant.
"""

from __future__ import annotations

import logging
import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from cnncli.data.dataset import Dataset, cache_dir, cache_key, load_cached, save_cached
from cnncli.data.sources.base import Source, register
from cnncli.errors import UserError

TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"
DEFAULT_TFDS_DATA_DIR = "~/tensorflow_datasets"
PREPARE_INSTALL = "pip install 'cnncli[prepare]'"
TFDS_INSTALL = "pip install 'cnncli[tfds]'"  # reading prepared datasets: TensorFlow Datasets, no TensorFlow
# Decoding one example at a time pays Python overhead per call; batches of this size amortise it.
DECODE_BATCH = 1024
TRAIN_SPLIT, TEST_SPLIT = "train", "test"
ARRAY_RECORD_MARK = ".array_record"
INCOMPLETE_PREFIX = "incomplete."


def tfds_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The TFDS data directory: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(data_dir or os.environ.get(TFDS_DATA_DIR_ENV) or DEFAULT_TFDS_DATA_DIR).expanduser()


def _dataset_root(name: str, data_dir: Path) -> Path:
    # "name", "name/config" and "name:1.2.3" all live under data_dir/name[/config]/<version>/.
    return data_dir / name.partition(":")[0]


def _info_files(name: str, data_dir: Path) -> list[Path]:
    root = _dataset_root(name, data_dir)
    version = name.partition(":")[2]
    pattern = f"{version}/dataset_info.json" if version else "**/dataset_info.json"
    if not root.is_dir():
        return []
    # An interrupted `download_and_prepare` leaves incomplete.* folders behind; they are not a dataset.
    return sorted(p for p in root.glob(pattern) if not any(part.startswith(INCOMPLETE_PREFIX) for part in p.parts))


def is_prepared(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether `name` is prepared in array_record format under the data dir (a file check, no import)."""
    return any(any(ARRAY_RECORD_MARK in f.name for f in info.parent.iterdir())
               for info in _info_files(name, tfds_data_dir(data_dir)))


def prepared_names(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the datasets prepared (any format) under the data dir."""
    d = tfds_data_dir(data_dir)
    if not d.is_dir():
        return []
    return sorted({p.relative_to(d).parts[0] for p in d.glob("*/**/dataset_info.json")
                   if not any(part.startswith(INCOMPLETE_PREFIX) for part in p.relative_to(d).parts)})


def status(data_dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """(any dataset readable here, one line) for `cnncli datasets`."""
    if not have_tfds():
        return False, f"needs TensorFlow Datasets: {TFDS_INSTALL}"
    d = tfds_data_dir(data_dir)
    names = prepared_names(d)
    if names:
        return True, f"prepared in {d}: {', '.join(names)}"
    return False, f"none prepared in {d}; run `cnncli data prepare tfds:NAME` (needs {PREPARE_INSTALL} and internet)"


def have_tfds() -> bool:
    """Whether TensorFlow Datasets is installed (the optional `tfds` extra)."""
    return find_spec("tensorflow_datasets") is not None


def _not_prepared(name: str, data_dir: Path) -> UserError:
    return UserError(f"tfds:{name} is not prepared in {data_dir}; run `cnncli data prepare tfds:{name}` "
                     f"(needs `{PREPARE_INSTALL}`, which installs TensorFlow, and internet)")


def _decode_split(source, image_key: str, label_key: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    images, labels = [], np.empty(n, np.int32)
    for start in range(0, n, DECODE_BATCH):
        batch = source.__getitems__(list(range(start, min(start + DECODE_BATCH, n))))
        for i, ex in enumerate(batch):
            img = np.asarray(ex[image_key])
            images.append(img[..., None] if img.ndim == 2 else img)
            labels[start + i] = int(ex[label_key])
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        raise UserError(f"{what} has images of different sizes ({', '.join(map(str, sorted(shapes)[:3]))}, ...); "
                        f"cnncli needs one size per dataset: use a config with fixed-size images "
                        f"(e.g. tfds:imagenette/160px)")
    if not images:
        return np.zeros((0, 1, 1, 1), np.uint8), labels
    x = np.stack(images)
    if x.dtype != np.uint8 or x.shape[-1] not in (1, 3):
        raise UserError(f"{what} has images of dtype {x.dtype} with {x.shape[-1]} channels; cnncli reads uint8 "
                        f"gray or RGB images")
    return x, labels


def load_tfds(name: str, data_dir: str | os.PathLike | None = None):
    """Read the prepared TFDS dataset `name` (train and, if present, test split) into a `Dataset`.

    The decoded arrays are cached under `cache_dir()`, keyed by the dataset directory and the
    modification time of its metadata, so re-preparing invalidates the cache.

    Raises:
        UserError: The dataset is not prepared (with the command that prepares it), or has no
            train split, or its images are not fixed-size uint8 gray/RGB.
    """
    d = tfds_data_dir(data_dir)
    if not is_prepared(name, d):
        if find_spec("tensorflow") is None:
            raise _not_prepared(name, d)
        prepare_tfds(name, d)  # TensorFlow is here: prepare it now, as `cnncli data prepare` would
    infos = _info_files(name, d)
    key = cache_key("tfds", name, str(d.resolve()), [(str(p), p.stat().st_mtime_ns) for p in infos])
    short = name.replace("/", "_").replace(":", "_")
    cache = cache_dir() / f"tfds-{short}-{key}.npz"
    cached = load_cached(cache, short)
    if cached is not None:
        return cached
    if not have_tfds():
        raise UserError(f"tfds:{name} is prepared in {d}, and reading it needs TensorFlow Datasets: {TFDS_INSTALL}")

    import tensorflow_datasets as tfds

    try:
        sources = tfds.data_source(name, data_dir=str(d), download=False)
    except Exception as e:  # tfds raises assorted types for unreadable metadata; the user can fix it by re-preparing
        raise UserError(f"cannot read tfds:{name} from {d}: {e}; re-run `cnncli data prepare tfds:{name}`") from None
    if TRAIN_SPLIT not in sources:
        raise UserError(f"tfds:{name} has no '{TRAIN_SPLIT}' split (it has: {', '.join(sorted(sources))})")
    info = sources[TRAIN_SPLIT].dataset_info
    image_key, label_key = info.supervised_keys or ("image", "label")
    label_feature = info.features[label_key]
    names = list(getattr(label_feature, "names", None) or [str(i) for i in range(label_feature.num_classes)])
    # TFDS logs a warning per process when it falls back from OpenCV to Pillow; Pillow is what we want.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        train_x, train_y = _decode_split(sources[TRAIN_SPLIT], image_key, label_key, f"tfds:{name} train")
        test_x = test_y = None
        if TEST_SPLIT in sources:
            test_x, test_y = _decode_split(sources[TEST_SPLIT], image_key, label_key, f"tfds:{name} test")
    finally:
        absl_logger.setLevel(level)
    ds = Dataset(short, train_x, train_y, test_x, test_y, names)
    save_cached(cache, ds)
    return ds


def prepare_tfds(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Download and prepare TFDS dataset `name` in array_record format; returns its directory.

    Raises:
        UserError: TensorFlow is not installed (names the pip command), or `name` is unknown to TFDS.
    """
    if find_spec("tensorflow") is None or not have_tfds():
        raise UserError(f"preparing tfds:{name} needs TensorFlow: run `{PREPARE_INSTALL}` (and have internet "
                        f"access), then `cnncli data prepare tfds:{name}` again")
    import tensorflow_datasets as tfds

    d = tfds_data_dir(data_dir)
    try:
        builder = tfds.builder(name, data_dir=str(d), file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise UserError(f"tfds:{name} is not a TFDS dataset ({str(e).splitlines()[0]}); "
                        f"see https://www.tensorflow.org/datasets/catalog") from None
    builder.download_and_prepare()
    return Path(builder.data_dir)


@register
class TfdsSource(Source):
    """A prepared TensorFlow Datasets dataset, read without TensorFlow: tfds:NAME."""

    scheme, arg, usage = "tfds", "required", "tfds:NAME (e.g. tfds:cifar10)"

    def read(self, arg, *, image_size, channels):
        return load_tfds(arg)

    def status(self):
        return status()
