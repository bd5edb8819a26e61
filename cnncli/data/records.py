"""Datasets as records read one at a time: ArrayRecord shards of encoded images, and image files.

A converted dataset (`cnncli data convert SOURCE --to array_record OUT`) is a folder of shards
named `<split>-<i>-of-<n>.array_record`. Record 0 of every shard is its header (JSON after
`HEADER_MAGIC`: split, shard number and count, the class names, the labels of its records, their
common shape), so each shard describes itself: a missing shard, a truncated file or shards of two
different datasets are found before training starts. Every other record is one image::

    <label u32> <height u32> <width u32> <channels u8> <kind u8> <name length u16> <name> <payload>

kind ENCODED is a file's bytes as they were (JPEG, PNG, ... decoded by Pillow); kind RAW is the uint8
pixels, height x width x channels (small images: decoding them costs nothing, PNG saves nothing).
Shards are written with `group_size:1` so that reading one record reads only that record.

A folder read lazily (`FileRecords`) gives the same `Record`s, so the streaming pipeline treats both
alike. Nothing here imports Grain or Pillow at module level: the CLI imports it for `--help`.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cnncli.errors import UserError

EXTENSION = ".array_record"
HEADER_MAGIC = b"cnncli-records\n"
FORMAT_VERSION = 1
# group_size:1 makes every record its own chunk (random access reads one record); images are already
# compressed, and raw pixels of small images compress too little to pay for decompressing them.
WRITER_OPTIONS = "group_size:1,uncompressed"
SHARD_NAME = re.compile(r"^(?P<split>[a-z]+)-(?P<shard>\d{5})-of-(?P<count>\d{5})\.array_record$")
_FIELDS = struct.Struct("<IIIBBH")
ENCODED, RAW = 0, 1
CONVERT_HOWTO = "create it with `cnncli data convert SOURCE --to array_record DIR`"


class Record(NamedTuple):
    """One image as stored: its label, size (0 where unknown), kind (ENCODED or RAW), name and bytes."""

    label: int
    height: int
    width: int
    channels: int
    kind: int
    name: str
    payload: bytes


def pack_record(record: Record) -> bytes:
    name = record.name.encode()
    return _FIELDS.pack(record.label, record.height, record.width, record.channels, record.kind, len(name)) + name + \
        record.payload


def unpack_record(data: bytes) -> Record:
    label, height, width, channels, kind, name_len = _FIELDS.unpack_from(data)
    start = _FIELDS.size
    name = bytes(data[start:start + name_len]).decode()
    return Record(label, height, width, channels, kind, name, data[start + name_len:])


def shard_name(split: str, shard: int, count: int) -> str:
    return f"{split}-{shard:05d}-of-{count:05d}{EXTENSION}"


def pack_header(header: dict) -> bytes:
    return HEADER_MAGIC + json.dumps(header, separators=(",", ":")).encode()


def unpack_header(data: bytes) -> dict | None:
    """The header dict of a shard's record 0, or None when it is not one."""
    if not data.startswith(HEADER_MAGIC):
        return None
    try:
        header = json.loads(data[len(HEADER_MAGIC):])
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


# ---------------------------------------------------------------------------------------------------------
# Reading


class RecordSplit:
    """The records of one split, in a random-access form Grain reads (also from its worker processes).

    Subclasses give `__len__`, `read(indices) -> list[Record]` and `where(index)` (a name for error
    messages); `labels` holds every record's label without reading the records.
    """

    labels: np.ndarray
    what: str

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices) -> list[Record]:
        raise NotImplementedError

    def where(self, index: int) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Shard:
    path: Path
    header: dict


class ArrayRecordSplit(RecordSplit):
    """One split of a converted dataset: its shards, read through Grain's ArrayRecordDataSource."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        self.what = f"arrayrecord:{shards[0].path.parent}"
        self.labels = np.concatenate([np.asarray(s.header["labels"], np.int32) for s in shards]) if shards \
            else np.zeros(0, np.int32)
        self._starts = np.cumsum([0] + [s.header["count"] for s in shards])
        self._source = None  # opened lazily, so that pickling to Grain's workers sends paths only

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def _open(self):
        if self._source is None:
            from grain.sources import ArrayRecordDataSource

            # path[1:n+1] skips each shard's header record
            self._source = ArrayRecordDataSource([f"{s.path}[1:{s.header['count'] + 1}]" for s in self.shards])
        return self._source

    def read(self, indices) -> list[Record]:
        source = self._open()
        # one read per record: the batched __getitems__ starts a thread pool per call, which costs more
        return [unpack_record(source[int(i)]) for i in indices]

    def where(self, index: int) -> str:
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f"record {index} of {self.what} ({self.shards[shard].path.name}, record {index - self._starts[shard]})"


class FileRecords(RecordSplit):
    """Image files read lazily, one record per file (a folder source that streams)."""

    def __init__(self, root: Path, files: list[str], labels: np.ndarray):
        self.root = root
        self.files = np.asarray(files, dtype=object)  # relative paths: one Python str each, pickled once per worker
        self.labels = np.asarray(labels, np.int32)
        self.what = f"folder:{root}"

    def read(self, indices) -> list[Record]:
        out = []
        for i in indices:
            name = self.files[int(i)]
            try:
                payload = (self.root / name).read_bytes()
            except OSError as e:
                raise UserError(f"cannot read image {self.root / name}: {e.strerror}") from None
            out.append(Record(int(self.labels[int(i)]), 0, 0, 0, ENCODED, name, payload))
        return out

    def where(self, index: int) -> str:
        return str(self.root / self.files[int(index)])


def _read_header(path: Path) -> dict:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(str(path))
    except Exception as e:  # the C++ reader raises plain RuntimeError/ValueError subclasses for damaged files
        raise UserError(f"{path} is not a readable ArrayRecord file ({str(e).splitlines()[0]}); convert the "
                        f"dataset again") from None
    try:
        n = reader.num_records()
        header = unpack_header(reader.read([0])[0]) if n else None
    finally:
        try:
            reader.close()
        except RuntimeError:  # closing a truncated file reports the damage again; it is reported below
            pass
    if header is None or not n:
        what = "is empty or truncated (no records could be read)" if not n else "has no cnncli header record"
        raise UserError(f"{path} {what}; {CONVERT_HOWTO}")
    if header.get("format") != FORMAT_VERSION:
        raise UserError(f"{path} was written in record format {header.get('format')}; this cnncli reads format "
                        f"{FORMAT_VERSION}: convert the dataset again")
    if n != header["count"] + 1:
        raise UserError(f"{path} holds {n - 1} records but its header says {header['count']}: the file is truncated "
                        "or damaged; convert the dataset again")
    return header


def open_records(root: Path) -> dict[str, ArrayRecordSplit]:
    """The splits of the converted dataset in `root`, every shard checked: present, complete, one dataset.

    Raises:
        UserError: No shards, a missing or unreadable shard, a truncated file, or shards whose class
            names differ.
    """
    if not root.is_dir():
        raise UserError(f"arrayrecord: no such directory {root}; {CONVERT_HOWTO}")
    files = sorted(root.glob(f"*{EXTENSION}"))
    if not files:
        raise UserError(f"arrayrecord: no {EXTENSION} files in {root}; {CONVERT_HOWTO}")
    by_split: dict[str, dict[int, Path]] = {}
    counts: dict[str, set[int]] = {}
    for f in files:
        m = SHARD_NAME.match(f.name)
        if m is None:
            raise UserError(f"arrayrecord: {f} is not named <split>-NNNNN-of-NNNNN{EXTENSION}; {CONVERT_HOWTO}")
        by_split.setdefault(m["split"], {})[int(m["shard"])] = f
        counts.setdefault(m["split"], set()).add(int(m["count"]))
    splits: dict[str, ArrayRecordSplit] = {}
    reference: tuple[Path, list[str]] | None = None
    for split, shards in sorted(by_split.items()):
        if len(counts[split]) > 1:
            raise UserError(f"arrayrecord: {root} mixes {split} shards of different conversions (-of-"
                            f"{', -of-'.join(f'{c:05d}' for c in sorted(counts[split]))}); keep one conversion")
        (n,) = counts[split]
        missing = [shard_name(split, i, n) for i in range(n) if i not in shards]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise UserError(f"arrayrecord: shard {missing[0]}{more} is missing from {root}; copy it back or convert "
                            "the dataset again")
        read = []
        for i in range(n):
            header = _read_header(shards[i])
            if (header.get("split"), header.get("shard"), header.get("num_shards")) != (split, i, n):
                raise UserError(f"{shards[i]} holds {header.get('split')} shard {header.get('shard')} of "
                                f"{header.get('num_shards')}: the file was renamed; restore its name")
            if reference is None:
                reference = (shards[i], header["class_names"])
            elif header["class_names"] != reference[1]:
                raise UserError(f"arrayrecord: the class names of {shards[i].name} ({_names(header['class_names'])}) "
                                f"differ from those of {reference[0].name} ({_names(reference[1])}): the shards come "
                                "from different datasets")
            read.append(Shard(shards[i], header))
        splits[split] = ArrayRecordSplit(read)
    return splits


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f", ... ({len(names)} classes)" if len(names) > 4 else "")


def common_shape(shards: list[Shard]) -> tuple[int, int, int] | None:
    """The (H, W, C) every record of these shards has, or None when they differ or are unknown."""
    shapes = {tuple(s.header["shape"]) if s.header.get("shape") else None for s in shards}
    if len(shapes) != 1 or None in shapes:
        return None
    return shapes.pop()


# ---------------------------------------------------------------------------------------------------------
# Writing


def write_split(out: Path, split: str, records, count: int, class_names: list[str], *, per_shard: int,
                source: str, advance=None) -> list[Path]:
    """Write `count` records (an iterable of `Record`) of `split` as shards of `per_shard` records.

    A shard is assembled in memory and written to a temporary name, then renamed: an interrupted
    conversion leaves no shard that looks complete. `advance(n)` is called after each record.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    num_shards = max(1, -(-count // per_shard))
    records = iter(records)
    written = []
    for shard in range(num_shards):
        batch = [next(records) for _ in range(min(per_shard, count - shard * per_shard))]
        shapes = {(r.height, r.width, r.channels) for r in batch}
        only = next(iter(shapes)) if len(shapes) == 1 else None
        shape = list(only) if only and all(only) else None  # 0: a size the converter did not learn
        header = {"format": FORMAT_VERSION, "split": split, "shard": shard, "num_shards": num_shards,
                  "count": len(batch), "class_names": list(class_names), "labels": [r.label for r in batch],
                  "shape": shape, "source": source}
        path = out / shard_name(split, shard, num_shards)
        tmp = path.with_name(f".{path.name}.tmp")
        writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
        try:
            writer.write(pack_header(header))
            for r in batch:
                writer.write(pack_record(r))
                if advance is not None:
                    advance(1)
        finally:
            writer.close()
        tmp.replace(path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------
# What a source that streams hands to the pipeline


@dataclass(frozen=True)
class RecordData:
    """A dataset read one record at a time: its splits ('train', optionally 'test'), classes and image shape.

    `shape` is the (H, W, C) every record has when the source knows it (a converted dataset of
    equal-sized images), else None; `decoded_bytes(image_size, channels)` estimates what decoding
    every split into memory would take.
    """

    name: str
    splits: dict[str, RecordSplit]
    class_names: list[str]
    shape: tuple[int, int, int] | None

    def decoded_bytes(self, image_size: tuple[int, int] | None, channels: int | None) -> int | None:
        """Bytes of every split decoded to uint8 at `image_size`, or None when the image size is unknown."""
        h, w, c = self.shape or (None, None, 3)
        if image_size is not None:
            h, w = image_size
        if h is None:
            return None
        return sum(len(s) for s in self.splits.values()) * h * w * (channels or c)


def decode_record(record: Record, *, draft: tuple[int, int] | None = None) -> np.ndarray:
    """The record's image as uint8 HWC in its own channels (1 or 3).

    Raises:
        CorruptImage: An encoded image that does not decode, or raw pixels of the wrong length.
    """
    from cnncli.data.images import CorruptImage, decode_bytes

    if record.kind == RAW:
        shape = (record.height, record.width, record.channels)
        if len(record.payload) != record.height * record.width * record.channels:
            raise CorruptImage(f"{len(record.payload)} bytes of pixels for a {shape} image")
        return np.frombuffer(record.payload, np.uint8).reshape(shape)
    return decode_bytes(record.payload, draft=draft)
