"""ArrayRecord shards written by `cnncli data convert`: arrayrecord:DIR, streamed or decoded into memory."""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from cnncli.data.dataset import MIN_CLASSES, Dataset, cache_dir, cache_key, load_cached, save_cached
from cnncli.data.images import CorruptImage, resize_image, to_channels
from cnncli.data.records import CONVERT_HOWTO, RecordData, common_shape, decode_record, open_records
from cnncli.data.sources.base import Source, register
from cnncli.errors import UserError

# Records decoded per read when a whole split goes into memory: one read per record costs a Python call each.
READ_BATCH = 1024


def arrayrecord_data(root: Path) -> RecordData:
    """The converted dataset in `root`, every shard checked (see records.open_records)."""
    splits = open_records(root)
    if "train" not in splits:
        raise UserError(f"arrayrecord: {root} has no train shards (only {', '.join(sorted(splits))}); {CONVERT_HOWTO}")
    unknown = sorted(set(splits) - {"train", "test"})
    if unknown:
        raise UserError(f"arrayrecord: {root} has shards of split '{unknown[0]}'; cnncli reads train and test")
    class_names = splits["train"].shards[0].header["class_names"]
    if len(class_names) < MIN_CLASSES:
        raise UserError(f"arrayrecord: {root} has {len(class_names)} class; a classifier needs at least {MIN_CLASSES}")
    shape = common_shape([s for split in splits.values() for s in split.shards])
    return RecordData(root.name, dict(splits), list(class_names), shape)


def _decode_split(split, image_size, channels: int) -> np.ndarray:
    n = len(split)
    first = None
    out = None
    for start in range(0, n, READ_BATCH):
        for offset, record in enumerate(split.read(range(start, min(start + READ_BATCH, n)))):
            i = start + offset
            try:
                img = decode_record(record)
            except CorruptImage as e:
                raise UserError(f"cannot decode {split.where(i)} ({record.name}): {e}; convert the dataset again "
                                "without that image, or stream it with data.skip_corrupt=true") from None
            img = to_channels(img[None], channels)[0]
            if image_size is not None:
                img = resize_image(img, tuple(image_size))
            if first is None:
                first = (img.shape, i)
                out = np.empty((n, *img.shape), np.uint8)
            elif img.shape != first[0]:
                raise UserError(f"the images of {split.what} have different sizes ({split.where(first[1])} is "
                                f"{first[0][0]}x{first[0][1]}, {split.where(i)} is {img.shape[0]}x{img.shape[1]}); "
                                "set data.image_size in the recipe, e.g. `image_size: [64, 64]` under `data:`")
            out[i] = img
    if out is None:
        h, w = image_size or (1, 1)
        return np.zeros((0, h, w, channels), np.uint8)
    return out


def read_arrayrecord(root: Path, image_size: tuple[int, int] | None, channels: int | None) -> Dataset:
    """Decode every record of the converted dataset in `root` into memory (data.pipeline=memory).

    The arrays are cached under `cache_dir()`, keyed by the shards' names, sizes and times.
    """
    data = arrayrecord_data(root)
    shards = sorted(f for f in root.resolve().glob("*.array_record"))
    key = cache_key("arrayrecord", str(root.resolve()), image_size and list(image_size), channels,
                    [(f.name, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in shards])
    cache = cache_dir() / f"arrayrecord-{root.resolve().name}-{key}.npz"
    cached = load_cached(cache, data.name)
    if cached is not None:
        return cached
    if channels is None:
        channels = data.shape[2] if data.shape else 3
    train_x = _decode_split(data.splits["train"], image_size, channels)
    test = data.splits.get("test")
    test_x = _decode_split(test, image_size, channels) if test is not None and len(test) else None
    if test_x is not None and test_x.shape[1:] != train_x.shape[1:]:
        raise UserError(f"the test images of {test.what} are {test_x.shape[1]}x{test_x.shape[2]}, the train images "
                        f"{train_x.shape[1]}x{train_x.shape[2]}; set data.image_size in the recipe")
    ds = Dataset(data.name, train_x, data.splits["train"].labels, test_x,
                 test.labels if test_x is not None else None, data.class_names)
    save_cached(cache, ds)
    return ds


@register
class ArrayRecordSource(Source):
    """ArrayRecord shards of encoded images written by `cnncli data convert`: arrayrecord:DIR."""

    scheme, arg, usage = "arrayrecord", "required", "arrayrecord:DIR (written by `cnncli data convert`)"

    def read(self, arg, *, image_size, channels):
        return read_arrayrecord(Path(arg).expanduser(), image_size, channels)

    def records(self, arg):
        return arrayrecord_data(Path(arg).expanduser())

    def status(self):
        if find_spec("array_record") is None:
            return False, "needs array-record: pip install array-record"
        return True, "arrayrecord:DIR reads shards from `cnncli data convert SOURCE --to array_record DIR`"
