"""The streaming input path (data.pipeline=stream): Grain reads, decodes and crops batches in worker processes.

Nothing is decoded up front. One Grain pipeline per run yields, epoch after epoch, the training
batches and then the validation batches of that epoch, so one set of worker processes serves both
(starting workers costs seconds) and one iterator state says where a run stands:

    MapDataset.range(epochs * (steps + val_batches))  element k -> one batch (`BatchMaker`)
      .to_iter_dataset().mp_prefetch(workers)          decode + crop in `data.workers` processes
      -> ThreadPrefetch (host) -> device_put -> ThreadPrefetch (device)   batches wait on the device

Determinism: batch k depends only on k, the seed and this process's rows, never on the number of
workers (Grain hands element k to worker k mod W and returns elements in order). The epoch's order
is a permutation of the training records seeded by (the recipe's seed, the epoch); random crops draw
from a generator seeded by (seed, epoch, position in the epoch). Several processes
(hosts): every process computes the same order and reads only its own rows of every global batch
(`rows`, the block its devices hold), so the global batch is the one a single process would read.
Grain's iterator state (`get_state`) travels in the checkpoint; `set_state` resumes mid-epoch.

Images are uint8 from disk to device: the random augmentations that are cheap there stay in the
jitted step (data/augment), as on the in-memory path.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnncli.data.images import (
    CorruptImage,
    center_crop,
    image_size,
    random_resized_crop_box,
    resize_image,
    resize_shorter,
    resized_crop,
    to_channels,
)
from cnncli.data.records import RAW, RecordData, RecordSplit, decode_record
from cnncli.errors import UserError

TRAIN, EVAL = 0, 1  # what a batch is for (the element's "kind")
SHUFFLE_STREAM, CROP_STREAM = 1, 2  # independent random streams from the recipe's seed
MAX_WORKERS = 16
PARENT_POLL_S = 1.0  # how often a worker checks that the training process is still there
READ_AHEAD_BYTES = 256 << 20  # per process: the decoded batches being read ahead
MAX_READ_AHEAD = 16
DECODE_BATCH = 256  # images per element when a whole split is decoded into memory


@dataclass(frozen=True)
class Preprocess:
    """How a record becomes a (H, W, C) uint8 image; picklable, it travels to Grain's workers.

    Training: `random_crop` (scale, ratio) takes torchvision's random-resized crop; else the eval
    transform. Evaluation: with `eval_crop` (a ratio such as 0.875) the shorter side is resized to
    size / ratio and the center `size` cropped; else the image is resized to `size` (as the in-memory
    path does). `draft` lets a JPEG decode at 1/2, 1/4 or 1/8 scale when that still covers the output.
    """

    size: tuple[int, int]
    channels: int
    random_crop: tuple[tuple[float, float], tuple[float, float]] | None = None
    eval_crop: float | None = None
    draft: bool = False

    def __call__(self, record, train: bool, rng: np.random.Generator | None) -> np.ndarray:
        cropping = self.random_crop is not None and train
        box = draft = None
        if cropping or self.draft:  # the crop and the draft size are chosen on the stored image's size
            h0, w0 = (record.height, record.width) if record.kind == RAW else image_size(record.payload)
        if cropping:
            box = random_resized_crop_box(h0, w0, rng, *self.random_crop)
            if self.draft:  # decoded size at which the crop still covers the output size
                draft = (-(-w0 * self.size[1] // box[3]), -(-h0 * self.size[0] // box[2]))
        elif self.draft:
            if self.eval_crop is not None:
                rh, rw = resize_shorter(h0, w0, self.size, self.eval_crop)
            else:
                rh, rw = self.size
            draft = (rw, rh)
        img = decode_record(record, draft=draft)
        img = to_channels(img[None], self.channels)[0]
        if box is not None:
            h1, w1 = img.shape[:2]
            if (h1, w1) != (h0, w0):  # a drafted JPEG: the crop box scales with the image
                top, left, ch, cw = box
                box = (top * h1 // h0, left * w1 // w0, max(1, ch * h1 // h0), max(1, cw * w1 // w0))
            return resized_crop(img, box, self.size)
        if self.eval_crop is not None:
            return center_crop(resize_image(img, resize_shorter(*img.shape[:2], self.size, self.eval_crop)),
                               self.size)
        return resize_image(img, self.size)


@dataclass(frozen=True)
class Part:
    """The records one part of the stream reads: ids into a split and their (relabelled) labels."""

    ids: np.ndarray
    labels: np.ndarray
    batch: int  # global batch size
    batches: int  # batches per pass


@dataclass
class BatchMaker:
    """Grain's map function: element k of the stream -> one batch of this process's rows (a dict of arrays).

    Picklable (it goes to every worker); reads through the split's random-access source.
    """

    split: RecordSplit
    prep: Preprocess
    train: Part
    val: Part | None
    eval_only: bool
    rows: tuple[int, int]  # this process's rows of a training batch
    eval_rows: tuple[int, int]  # and of an evaluation batch
    seed: int
    skip_corrupt: bool
    _order: Any = field(default=None, repr=False)

    def __getstate__(self):
        return {**self.__dict__, "_order": None}

    @property
    def per_epoch(self) -> int:
        if self.eval_only:  # `train` is then the split evaluated
            return self.train.batches
        return self.train.batches + (self.val.batches if self.val else 0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the training records; each worker moves through the epochs in
        order, so it keeps only the current one."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng((self.seed, SHUFFLE_STREAM, epoch))
            self._order = (epoch, rng.permutation(len(self.train.ids)))
        return self._order[1]

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        epoch, j = divmod(int(k), self.per_epoch)
        if not self.eval_only and j < self.train.batches:
            start, stop = self.rows
            positions = np.arange(j * self.train.batch + start, j * self.train.batch + stop)
            return self._make(self.train, self._epoch_order(epoch)[positions].tolist(), positions, epoch, TRAIN)
        part = self.val if not self.eval_only else self.train
        b = j - (0 if self.eval_only else self.train.batches)
        start, stop = self.eval_rows
        positions = np.arange(b * part.batch + start, b * part.batch + stop)
        return self._make(part, [int(p) if p < len(part.ids) else -1 for p in positions], positions, epoch, EVAL)

    def _make(self, part: Part, picks: list[int], positions: np.ndarray, epoch: int, kind: int):
        h, w = self.prep.size
        images = np.zeros((len(picks), h, w, self.prep.channels), np.uint8)
        labels = np.zeros(len(picks), np.int32)
        mask = np.zeros(len(picks), np.float32)
        ids = np.full(len(picks), -1, np.int64)
        skipped = 0
        valid = [i for i, p in enumerate(picks) if p >= 0]
        records = self.split.read([int(part.ids[picks[i]]) for i in valid])
        for i, record in zip(valid, records):
            pick = picks[i]
            rng = (np.random.default_rng((self.seed, CROP_STREAM, epoch, int(positions[i])))
                   if kind == TRAIN and self.prep.random_crop is not None else None)
            record_id = int(part.ids[pick])
            while True:
                try:
                    images[i] = self.prep(record, kind == TRAIN, rng)
                    break
                except CorruptImage as e:
                    if not self.skip_corrupt:
                        where = self.split.where(record_id)
                        where += "" if record.name in where else f" ({record.name})"
                        raise UserError(f"cannot decode {where}: {e}; delete or replace it, or set "
                                        "data.skip_corrupt=true to skip and count such images") from None
                    # the next record of the part stands in, so that the batch keeps its size
                    skipped += 1
                    if skipped > len(part.ids):
                        raise UserError(f"no image of {self.split.what} decodes") from None
                    pick = (pick + 1) % len(part.ids)
                    record_id = int(part.ids[pick])
                    record = self.split.read([record_id])[0]
            labels[i] = part.labels[pick]
            mask[i] = 1.0
            ids[i] = record_id
        return {"image": images, "label": labels, "mask": mask, "id": ids,
                "kind": np.int32(kind), "skipped": np.int32(skipped), "step": np.int64(positions[0] // part.batch)}


def read_ahead(batch_bytes: int, prefetch: int) -> int:
    """Batches each process decodes concurrently and holds ahead: as many as READ_AHEAD_BYTES allows, up to
    MAX_READ_AHEAD (a worker decoded 224 px batches 1.8x faster with 16 than with 2), at least `prefetch`."""
    return max(prefetch, min(MAX_READ_AHEAD, READ_AHEAD_BYTES // max(batch_bytes, 1)))


def default_workers() -> int:
    """One worker per core but one (the training step needs a core), at least 1."""
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) - 1))


def _quiet_grain() -> None:
    """Grain checks absl flags that a non-absl program never parses, and logs to stderr at INFO."""
    from absl import flags, logging

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.WARNING)


def _worker_init(worker: int, count: int) -> None:
    """In each Grain worker: quiet logging, and exit when the training process is gone (kill -9 of it
    would otherwise leave the workers running, holding its output pipes open)."""
    _quiet_grain()
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="cnncli-parent-watch", daemon=True).start()


class Stream:
    """An iterator of device batches over a Grain pipeline, with its state, counts and waiting time.

    `next()` returns (element, device arrays); `state()` is Grain's state after the last element
    taken (JSON-ready), `records_read` the records of the batches taken, `wait_seconds` the time
    spent waiting for a batch that was not ready.
    """

    def __init__(self, maker: BatchMaker, length: int, *, workers: int, prefetch: int,
                 to_device: Callable[[dict], dict], state: dict | None = None, read_ahead: int | None = None):
        import grain
        from grain.experimental import ThreadPrefetchIterDataset

        _quiet_grain()
        # Grain's default reads 500 elements ahead in every process; an element here is a whole batch (a
        # worker held ~2.7 GB of 224 px batches), so the read-ahead is bounded (see `read_ahead`)
        ahead = max(read_ahead or prefetch, 1)
        read = grain.ReadOptions(num_threads=ahead, prefetch_buffer_size=ahead)
        ds = grain.MapDataset.range(length).map(maker).to_iter_dataset(read)
        if workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
                                worker_init_fn=_worker_init)
            # own copies: Grain releases a worker's shared memory when the element is dropped, and a device
            # array may keep using its host buffer (on CPU); dropped here, it is released while training runs
            ds = ds.map(lambda element: {k: np.array(v) for k, v in element.items()})
        ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=max(prefetch, 1))
        ds = ds.map(lambda element: (element, to_device(element)))
        ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=max(prefetch, 1))
        self._iter = iter(ds)
        if state is not None:
            self._iter.set_state(state)
        self.records_read = 0
        self.skipped = 0
        self.wait_seconds = 0.0

    def next(self) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        try:
            element, device = next(self._iter)
        except StopIteration:
            raise RuntimeError("the input stream ended before training did") from None
        self.wait_seconds += time.perf_counter() - t0
        self.records_read += int(np.count_nonzero(element["mask"]))
        self.skipped += int(element["skipped"])
        return element, device

    def state(self) -> dict:
        return self._iter.get_state()

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()
        # Grain's iterators keep elements in reference cycles; collected now, their shared memory is
        # released here rather than reported as leaked by the resource tracker when the program exits
        gc.collect()


# ---------------------------------------------------------------------------------------------------------
# What a run streams


@dataclass(frozen=True)
class StreamSplits:
    """The run's data on the streaming path: record ids and labels per split, and what travels with them.

    The counterpart of pipeline.Splits (which holds decoded arrays): the same val hold-out and
    subsets, chosen over record ids, and the same per-channel statistics (from a sample).
    """

    source: str
    data: RecordData
    train_ids: np.ndarray
    train_y: np.ndarray
    val_ids: np.ndarray
    val_y: np.ndarray
    test_ids: np.ndarray | None
    test_y: np.ndarray | None
    class_names: list[str]
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    prep: Preprocess
    workers: int
    prefetch: int
    skip_corrupt: bool

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sizes(self) -> tuple[int, int, int]:
        return len(self.train_ids), len(self.val_ids), 0 if self.test_ids is None else len(self.test_ids)

    def train_stream(self, *, epochs: int, batch: int, eval_batch: int, rows: tuple[int, int],
                     eval_rows: tuple[int, int], seed: int, to_device, state: dict | None = None) -> Stream:
        """Training batches then validation batches, epoch after epoch (see the module docstring)."""
        steps = len(self.train_ids) // batch
        train = Part(self.train_ids, self.train_y, batch, steps)
        val = Part(self.val_ids, self.val_y, eval_batch, -(-len(self.val_ids) // eval_batch)) \
            if len(self.val_ids) else None
        maker = BatchMaker(self.data.splits["train"], self.prep, train, val, False, rows, eval_rows, seed,
                           self.skip_corrupt)
        return Stream(maker, epochs * maker.per_epoch, workers=self.workers, prefetch=self.prefetch,
                      to_device=to_device, state=state, read_ahead=self._read_ahead(rows))

    def split_ids(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Record ids and labels of split `split` (train, val or test)."""
        parts = {"train": (self.train_ids, self.train_y), "val": (self.val_ids, self.val_y),
                 "test": (self.test_ids, self.test_y)}
        if split not in parts:
            raise UserError(f"unknown split '{split}'; choose train, val or test (`all` needs data.pipeline=memory)")
        ids, labels = parts[split]
        if ids is None or not len(ids):
            raise UserError(f"the dataset '{self.source}' has no {split} split here")
        return ids, labels

    def eval_stream(self, split: str, *, batch: int, rows: tuple[int, int], seed: int, to_device) -> Stream:
        """One pass over the `split` records through the evaluation transform, padded to whole batches
        (the mask says which rows count)."""
        ids, labels = self.split_ids(split)
        part = Part(ids, labels, batch, -(-len(ids) // batch))
        source = self.data.splits["test" if split == "test" else "train"]
        maker = BatchMaker(source, self.prep, part, None, True, rows, rows, seed, self.skip_corrupt)
        return Stream(maker, part.batches, workers=min(self.workers, part.batches), prefetch=self.prefetch,
                      to_device=to_device, read_ahead=self._read_ahead(rows))

    def _read_ahead(self, rows: tuple[int, int]) -> int:
        return read_ahead((rows[1] - rows[0]) * int(np.prod(self.image_shape)), self.prefetch)

    def decode(self, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole `split` decoded into memory through the evaluation transform: (uint8 images, labels).

        For the commands that need a split as arrays (visualize, adversarial, calibration); it takes
        as much memory as the in-memory path would for this split.
        """
        ids, labels = self.split_ids(split)
        h, w, c = self.image_shape
        x = np.empty((len(ids), h, w, c), np.uint8)
        batch = min(len(ids), DECODE_BATCH)
        stream = self.eval_stream(split, batch=batch, rows=(0, batch), seed=seed, to_device=lambda e: None)
        try:
            for start in range(0, len(ids), batch):
                element, _ = stream.next()
                valid = element["mask"] > 0
                x[start:start + int(valid.sum())] = element["image"][valid]
        finally:
            stream.close()
        return x, labels

    def sample_images(self, n: int, seed: int) -> np.ndarray:
        """Up to `n` training images chosen at random (deterministically), through the evaluation transform."""
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(len(self.train_ids), size=min(n, len(self.train_ids)), replace=False))
        part = Part(self.train_ids, self.train_y, len(picks), 1)
        maker = BatchMaker(self.data.splits["train"], self.prep, part, None, True, (0, len(picks)), (0, len(picks)),
                           seed, self.skip_corrupt)
        return maker._make(part, [int(p) for p in picks], np.arange(len(picks)), 0, EVAL)["image"]
