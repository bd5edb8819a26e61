"""`cnncli data convert SOURCE --to array_record OUT`: any dataset source as ArrayRecord shards.

Sources that stream (folders, ArrayRecord) are copied record by record: an image file's bytes go into
the shard as they are, never decoded and re-encoded, so nothing is lost and converting is mostly
reading files. Sources that load as arrays (fashion_mnist, cifar10, npz, ...) are loaded and each
image is stored as raw pixels (the default: small images gain nothing from PNG and decode for free)
or as PNG. Nothing needs TensorFlow.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncli.console import progress_bar
from cnncli.data.images import GRAY_MODES, CorruptImage
from cnncli.data.records import ENCODED, EXTENSION, RAW, FileRecords, Record, RecordSplit, write_split
from cnncli.data.sources import load_dataset, load_records
from cnncli.errors import UserError

DEFAULT_PER_SHARD = 1024  # records per shard (TFDS writes ImageNet's 1.28M training images as 1024 shards)
ENCODINGS = ("raw", "png")
READ_CHUNK = 256


@dataclass(frozen=True)
class Converted:
    """What a conversion wrote: records and shards per split, and the files skipped as unreadable."""

    out: Path
    records: dict[str, int]
    shards: dict[str, int]
    skipped: list[str]
    class_names: list[str]


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another output directory")
    existing = sorted(out.glob(f"*{EXTENSION}")) if out.is_dir() else []
    if existing and not overwrite:
        raise UserError(f"{out} already holds {len(existing)} {EXTENSION} shards; choose another directory or pass "
                        "--overwrite to replace them")
    for f in existing:
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _image_info(f) -> tuple[int, int, int]:
    """(H, W, C) of an image file (a path or bytes) from its header: C is 1 for gray modes, else 3."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(f) if isinstance(f, bytes) else f) as img:
            return img.size[1], img.size[0], 1 if img.mode in GRAY_MODES else 3
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImage(str(e)) from None


def _scan(split: RecordSplit, skip_corrupt: bool, skipped: list[str], progress) -> tuple[list[int], list]:
    """The indices of the records to copy and their (H, W, C); image files are read only as far as their header."""
    keep, shapes = [], []
    for i in range(len(split)):
        if isinstance(split, FileRecords):
            try:
                shapes.append(_image_info(split.root / split.files[i]))
            except CorruptImage as e:
                if not skip_corrupt:
                    raise UserError(f"cannot read {split.where(i)}: {e}; delete or replace it, or pass "
                                    "--skip-corrupt to leave such files out") from None
                skipped.append(split.where(i))
                continue
        else:
            shapes.append(None)  # ArrayRecord records carry their size
        keep.append(i)
        if progress is not None and (i + 1) % READ_CHUNK == 0:
            progress(i + 1, len(split))
    return keep, shapes


def _copied(split: RecordSplit, keep: list[int], shapes: list) -> Iterator[Record]:
    for start in range(0, len(keep), READ_CHUNK):
        chunk = keep[start:start + READ_CHUNK]
        for record, shape in zip(split.read(chunk), shapes[start:start + READ_CHUNK]):
            yield record if shape is None else record._replace(height=shape[0], width=shape[1], channels=shape[2])


def _encoded(x: np.ndarray, y: np.ndarray, encoding: str) -> Iterator[Record]:
    from PIL import Image

    h, w, c = x.shape[1:]
    for i, (img, label) in enumerate(zip(x, y)):
        if encoding == "raw":
            yield Record(int(label), h, w, c, RAW, f"{i}", np.ascontiguousarray(img).tobytes())
        else:
            buffer = io.BytesIO()
            Image.fromarray(img[..., 0] if c == 1 else img).save(buffer, format="PNG")
            yield Record(int(label), h, w, c, ENCODED, f"{i}.png", buffer.getvalue())


def convert(spec: str, out: Path, *, per_shard: int = DEFAULT_PER_SHARD, encoding: str = "raw",
            overwrite: bool = False, skip_corrupt: bool = False,
            progress: Callable[[int, int], None] | None = None) -> Converted:
    """Write the dataset `spec` into `out` as ArrayRecord shards of `per_shard` records per split.

    Args:
        spec: A dataset spec (folder:PATH, fashion_mnist, cifar10:DIR, ...).
        out: The output directory (created; must not hold shards unless `overwrite`).
        per_shard: Records per shard.
        encoding: How images of array sources are stored: raw pixels or PNG. Files keep their bytes.
        overwrite: Replace the shards already in `out`.
        skip_corrupt: Leave out files whose header cannot be read (listed in the result) instead of stopping.
        progress: Called with (records written, total).

    Raises:
        UserError: An unknown or unreadable source, an unreadable image file, a bad option.
    """
    if per_shard < 1:
        raise UserError(f"--per-shard {per_shard}: a shard needs at least 1 record")
    if encoding not in ENCODINGS:
        raise UserError(f"--encoding {encoding}: choose {' or '.join(ENCODINGS)}")
    data = load_records(spec)
    skipped: list[str] = []
    if data is not None:
        class_names = data.class_names
        splits = {}
        for name, split in data.splits.items():
            with progress_bar(f"checking {name} images") as scanned:
                keep, shapes = _scan(split, skip_corrupt, skipped, scanned)
            splits[name] = (len(keep), _copied(split, keep, shapes))
    else:
        ds = load_dataset(spec)
        class_names = ds.class_names
        splits = {"train": (len(ds.train_x), _encoded(ds.train_x, ds.train_y, encoding))}
        if ds.test_x is not None and len(ds.test_x):
            splits["test"] = (len(ds.test_x), _encoded(ds.test_x, ds.test_y, encoding))
    _prepare_out(out, overwrite)
    total = sum(n for n, _ in splits.values())
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total)

    shards = {}
    try:
        for name, (n, items) in splits.items():
            shards[name] = len(write_split(out, name, items, n, class_names, per_shard=per_shard, source=spec,
                                           advance=advance))
    except BaseException:
        _remove_shards(out)  # an interrupted conversion leaves nothing that could pass for a whole dataset
        raise
    return Converted(out, {name: n for name, (n, _) in splits.items()}, shards, skipped, list(class_names))


def _remove_shards(out: Path) -> None:
    for f in out.glob(f"*{EXTENSION}"):
        f.unlink(missing_ok=True)
    for f in out.glob(f".*{EXTENSION}.tmp"):
        f.unlink(missing_ok=True)
