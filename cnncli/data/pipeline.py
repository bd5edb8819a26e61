"""From a recipe's `data` section to train/validation/test arrays and normalization statistics.

Everything here is host-side NumPy, done once per run. The arrays stay uint8 until they are on the
device; the jitted steps gather and convert batches there (see docs/design.md). Data too large for
that streams instead (data.pipeline, `load_data`): `StreamSplits` in data/stream.py.
"""

import os
from dataclasses import dataclass, replace

import numpy as np

from cnncli.data.dataset import MIN_CLASSES, subset, subset_indices
from cnncli.data.records import RecordData
from cnncli.data.sources import load_dataset, load_records
from cnncli.errors import UserError
from cnncli.recipe import DataConfig

MIN_STD = 1e-3  # a constant channel (e.g. a blank border) must not divide by ~0
SPLITS = ("train", "val", "test", "all")
STATS_CHUNK = 1 << 20  # pixels per chunk of channel_stats
STATS_SAMPLE = 2048  # streamed datasets: training images the normalization statistics are measured on
STREAM_OPTIONS = ("random_resized_crop", "eval_crop", "jpeg_draft", "skip_corrupt")  # with these, `auto` streams


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


def split_sizes(splits) -> tuple[int, int, int]:
    """(train, val, test) sizes of `Splits` or `StreamSplits` (0 for a missing test split)."""
    if hasattr(splits, "sizes"):
        return splits.sizes
    return len(splits.train_x), len(splits.val_x), 0 if splits.test_x is None else len(splits.test_x)


def channel_stats(x: np.ndarray, mode: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, as the preprocessing mode needs them."""
    channels = x.shape[-1]
    if mode == "scale":
        return (0.0,) * channels, (1.0,) * channels
    pixels = x.reshape(-1, channels)
    # two passes over chunks: a float64 copy of every pixel at once took 8 bytes per subpixel, three times over
    chunks = range(0, len(pixels), STATS_CHUNK)
    total = sum(pixels[i:i + STATS_CHUNK].sum(axis=0, dtype=np.float64) for i in chunks)
    mean = total / max(len(pixels), 1)
    if mode == "center":
        return tuple(float(m) / 255.0 for m in mean), (1.0,) * channels
    squares = sum(((pixels[i:i + STATS_CHUNK] - mean) ** 2).sum(axis=0) for i in chunks)
    std = np.sqrt(squares / max(len(pixels), 1)) / 255.0
    return tuple(float(m) / 255.0 for m in mean), tuple(max(float(s), MIN_STD) for s in std)


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
    """Load the recipe's dataset into memory, select classes/subsets, split off validation, compute statistics.

    Training needs `min_classes` (2) classes; evaluating a trained model on data of one of its classes does
    not. This is the in-memory path whatever data.pipeline says; `load_data` chooses between the two.
    """
    _check_memory_options(data)
    ds = load_dataset(data.source, image_size=data.image_size, channels=data.channels)
    ds = subset(ds, classes=data.classes, train_per_class=data.train_per_class, limit=data.limit, seed=seed)
    if ds.num_classes < min_classes:
        raise UserError(f"dataset '{data.source}' has {ds.num_classes} class: a classifier needs at least "
                        f"{min_classes}")
    train_x, train_y, val_x, val_y = split_train_val(ds.train_x, ds.train_y, data.val_fraction, seed)
    mean, std = channel_stats(train_x, data.preprocess)
    return Splits(source=data.source, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y,
                  test_x=ds.test_x, test_y=ds.test_y, class_names=list(ds.class_names), mean=mean, std=std)


# ---------------------------------------------------------------------------------------------------------
# Memory or stream


def _check_memory_options(data: DataConfig) -> None:
    used = [o for o in STREAM_OPTIONS if getattr(data, o)]
    if used:
        why = ("the in-memory path decodes every image up front and stops at the first that does not decode"
               if used[0] == "skip_corrupt" else "the in-memory path decodes each image once, at data.image_size")
        raise UserError(f"data.{used[0]} needs data.pipeline=stream ({why}); stream a folder: or arrayrecord: source")


def memory_budget_bytes(fraction: float) -> int:
    """`fraction` of host RAM, or of one accelerator's memory when that is smaller."""
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import jax

    device = jax.local_devices()[0]
    if device.platform != "cpu":
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit:
            budget = min(budget, int(limit))
    return int(fraction * budget)


def choose_pipeline(data: DataConfig) -> tuple[str, RecordData | None]:
    """("memory" or "stream", the records when streaming) for the recipe's data section.

    Raises:
        UserError: data.pipeline=stream with a source that only loads whole, or a stream-only option
            with data.pipeline=memory.
    """
    if data.pipeline == "memory":
        _check_memory_options(data)
        return "memory", None
    records = load_records(data.source)
    if records is None:
        if data.pipeline == "stream" or any(getattr(data, o) for o in STREAM_OPTIONS):
            why = "data.pipeline=stream" if data.pipeline == "stream" else \
                f"data.{next(o for o in STREAM_OPTIONS if getattr(data, o))}"
            raise UserError(f"{why} reads images one at a time from disk, but '{data.source}' loads as arrays; "
                            f"convert it first: `cnncli data convert {data.source} --to array_record DIR`, then "
                            "data.source=arrayrecord:DIR")
        return "memory", None
    if data.pipeline == "stream" or any(getattr(data, o) for o in STREAM_OPTIONS):
        return "stream", records
    size = records.decoded_bytes(data.image_size, data.channels)
    if size is not None and size > memory_budget_bytes(data.memory_budget):
        return "stream", records
    return "memory", None


def load_data(data: DataConfig, seed: int, *, min_classes: int = MIN_CLASSES):
    """The run's data: `Splits` (decoded arrays) or `StreamSplits` (records read batch by batch), as
    `choose_pipeline` decides."""
    pipeline, records = choose_pipeline(data)
    if pipeline == "memory":
        return load_splits(data, seed, min_classes=min_classes)
    return stream_splits(data, records, seed, min_classes=min_classes)


def stream_splits(data: DataConfig, records: RecordData, seed: int, *, min_classes: int = MIN_CLASSES):
    """The streaming counterpart of `load_splits`: the same subsets and validation hold-out, over record ids."""
    from cnncli.data.stream import Preprocess, StreamSplits, default_workers

    if data.balanced_sampling:
        raise UserError("data.balanced_sampling is not available with data.pipeline=stream; use "
                        "train.class_weights=balanced to weight the loss instead")
    size = data.image_size or (records.shape[:2] if records.shape else None)
    if size is None:
        why = "data.pipeline=stream" if data.pipeline == "stream" else \
            next((f"data.{o}" for o in STREAM_OPTIONS if getattr(data, o)), "data.pipeline=auto")
        raise UserError(f"streaming ({why}) reads the images of '{data.source}' one at a time and they may differ "
                        "in size: set data.image_size, e.g. `image_size: [224, 224]` under `data:`")
    channels = data.channels or (records.shape[2] if records.shape else 3)
    train, test = records.splits["train"], records.splits.get("test")
    train_idx, train_y, test_idx, test_y, names = subset_indices(
        data.source, train.labels, None if test is None else test.labels, records.class_names, classes=data.classes,
        train_per_class=data.train_per_class, limit=data.limit, seed=seed)
    if len(names) < min_classes:
        raise UserError(f"dataset '{data.source}' has {len(names)} class: a classifier needs at least {min_classes}")
    train_ids, train_y, val_ids, val_y = split_train_val(train_idx, train_y, data.val_fraction, seed)
    crop = data.random_resized_crop
    prep = Preprocess(size=tuple(size), channels=channels,
                      random_crop=None if crop is None else (tuple(crop.scale), tuple(crop.ratio)),
                      eval_crop=data.eval_crop, draft=data.jpeg_draft)
    splits = StreamSplits(
        source=data.source, data=records, train_ids=train_ids, train_y=train_y, val_ids=val_ids, val_y=val_y,
        test_ids=test_idx if test_idx is not None and len(test_idx) else None,
        test_y=test_y if test_idx is not None and len(test_idx) else None, class_names=names,
        image_shape=(int(size[0]), int(size[1]), int(channels)), mean=(0.0,) * channels, std=(1.0,) * channels,
        prep=prep, workers=default_workers() if data.workers is None else data.workers, prefetch=data.prefetch,
        skip_corrupt=data.skip_corrupt)
    if data.preprocess != "scale":
        mean, std = channel_stats(splits.sample_images(STATS_SAMPLE, seed), data.preprocess)
        splits = replace(splits, mean=mean, std=std)
    return splits
