"""ArrayRecord datasets: `cnncli data convert`, reading them back (into memory), and the damaged-dataset errors."""

import numpy as np
import pytest

from cnncli.data.convert import convert
from cnncli.data.records import ENCODED, RAW, Record, open_records, pack_record, unpack_record
from cnncli.data.sources import load_dataset, load_records
from cnncli.errors import UserError
from tests.helpers import cli, image_folder


def truncated_jpeg(data: bytes) -> bytes:
    """`data` cut where its header still parses but its pixels no longer decode (a half-copied file)."""
    import io

    from PIL import Image

    for cut in range(len(data) - 1, 0, -16):
        try:
            Image.open(io.BytesIO(data[:cut]))  # opening parses the header only
        except OSError:
            continue
        try:
            Image.open(io.BytesIO(data[:cut])).load()
        except OSError:
            return data[:cut]
    raise AssertionError("no cut of the JPEG opens without decoding")


def test_record_round_trip():
    for record in (Record(7, 3, 2, 1, RAW, "x", bytes(range(6))),
                   Record(0, 0, 0, 0, ENCODED, "dir/é.jpg", b"\xff\xd8 not really a jpeg")):
        assert unpack_record(pack_record(record)) == record


def test_folder_converts_byte_for_byte_and_reads_back_like_the_folder(tmp_path):
    root = image_folder(tmp_path / "pets", per_class=5, test_per_class=2)
    result = cli("data", "convert", f"folder:{root}", "--to", "array_record", tmp_path / "ar", "--per-shard", "4")
    assert result.exit_code == 0, result.stderr
    assert "train 15 records in 4 shards, test 6 records in 2 shards (3 classes)" in result.stdout
    splits = open_records(tmp_path / "ar")
    train = splits["train"]
    assert train.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    records = train.read(range(len(train)))
    files = sorted((root / "train").rglob("*.jpg"))
    assert [r.payload for r in records] == [f.read_bytes() for f in files]  # never re-encoded
    assert {(r.height, r.width, r.channels) for r in records} == {(40, 52, 3)}
    # decoded into memory, the converted dataset is the folder
    a, b = load_dataset(f"arrayrecord:{tmp_path / 'ar'}"), load_dataset(f"folder:{root}")
    for key in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert a.class_names == b.class_names == ["cat", "dog", "fox"]
    assert load_records(f"arrayrecord:{tmp_path / 'ar'}").shape == (40, 52, 3)


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_array_sources_convert_losslessly(tmp_path, encoding):
    convert("digits", tmp_path / "ar", encoding=encoding, per_shard=500)
    a, b = load_dataset(f"arrayrecord:{tmp_path / 'ar'}"), load_dataset("digits")
    for key in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert a.class_names == b.class_names
    kinds = {r.kind for r in load_records(f"arrayrecord:{tmp_path / 'ar'}").splits["test"].read([0, 359])}
    assert kinds == {RAW if encoding == "raw" else ENCODED}


def test_convert_refuses_to_mix_with_existing_shards(tmp_path):
    root = image_folder(tmp_path / "pets", per_class=2)
    convert(f"folder:{root}", tmp_path / "ar")
    with pytest.raises(UserError, match="already holds 1 .array_record shards; .* --overwrite"):
        convert(f"folder:{root}", tmp_path / "ar")
    convert(f"folder:{root}", tmp_path / "ar", overwrite=True, per_shard=2)
    assert len(list((tmp_path / "ar").glob("*.array_record"))) == 3


def test_unreadable_file_stops_the_conversion_or_is_skipped(tmp_path):
    root = image_folder(tmp_path / "pets", per_class=3)
    (root / "dog" / "dog_0001.jpg").write_bytes(b"this is no image")
    result = cli("data", "convert", f"folder:{root}", "--to", "array_record", tmp_path / "ar")
    assert result.exit_code == 2
    assert "cannot read" in result.stderr and "dog_0001.jpg" in result.stderr and "--skip-corrupt" in result.stderr
    assert not list((tmp_path / "ar").glob("*.array_record")) if (tmp_path / "ar").exists() else True
    result = cli("data", "convert", f"folder:{root}", "--to", "array_record", tmp_path / "ar", "--skip-corrupt")
    assert result.exit_code == 0, result.stderr
    assert "1 unreadable files skipped" in result.stdout and "dog_0001.jpg" in result.stderr
    assert len(open_records(tmp_path / "ar")["train"]) == 8


def _converted(tmp_path, name="ar", classes=("cat", "dog", "fox"), per_shard=3):
    root = image_folder(tmp_path / f"src_{name}", classes=classes, per_class=3)
    convert(f"folder:{root}", tmp_path / name, per_shard=per_shard)
    return tmp_path / name


def test_missing_shard(tmp_path):
    out = _converted(tmp_path)
    (out / "train-00001-of-00003.array_record").unlink()
    with pytest.raises(UserError, match=r"shard train-00001-of-00003.array_record is missing from"):
        load_records(f"arrayrecord:{out}")


def test_truncated_shard(tmp_path):
    out = _converted(tmp_path)
    shard = out / "train-00002-of-00003.array_record"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError, match=r"train-00002-of-00003.array_record is empty or truncated"):
        load_records(f"arrayrecord:{out}")


def test_shards_of_different_datasets(tmp_path):
    out = _converted(tmp_path)
    other = _converted(tmp_path, "other", classes=("ant", "bee", "cow"))
    (other / "train-00001-of-00003.array_record").replace(out / "train-00001-of-00003.array_record")
    with pytest.raises(UserError, match=r"the class names of train-00001-of-00003.array_record \(ant, bee, cow\) "
                                        r"differ from those of train-00000-of-00003.array_record \(cat, dog, fox\)"):
        load_records(f"arrayrecord:{out}")


def test_renamed_and_foreign_files(tmp_path):
    out = _converted(tmp_path)
    (out / "train-00001-of-00003.array_record").rename(out / "train-00001-of-00004.array_record")
    with pytest.raises(UserError, match="mixes train shards of different conversions"):
        load_records(f"arrayrecord:{out}")
    with pytest.raises(UserError, match=r"no such directory .*cnncli data convert"):
        load_records(f"arrayrecord:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no .array_record files in"):
        load_records(f"arrayrecord:{tmp_path / 'empty'}")


def test_corrupt_image_inside_arrayrecord_is_named_by_record(tmp_path):
    root = image_folder(tmp_path / "pets", per_class=3)
    (root / "fox" / "fox_0002.jpg").write_bytes(truncated_jpeg((root / "fox" / "fox_0002.jpg").read_bytes()))
    convert(f"folder:{root}", tmp_path / "ar", per_shard=4)  # the header still parses: the pixels do not
    with pytest.raises(UserError, match=r"cannot decode record 8 of arrayrecord:.*ar \(train-00002-of-00003"
                                        r".array_record, record 0\) \(fox/fox_0002.jpg\)"):
        load_dataset(f"arrayrecord:{tmp_path / 'ar'}")


def test_convert_cli_errors(tmp_path):
    result = cli("data", "convert", "digits", "--to", "tfrecord", tmp_path / "x")
    assert result.exit_code == 2 and "the only output format is array_record" in result.stderr
    result = cli("data", "convert", "digits", "--to", "array_record", tmp_path / "x", "--encoding", "webp")
    assert result.exit_code == 2 and "--encoding webp: choose raw or png" in result.stderr


def test_imagenet_layout_reads_val_as_the_test_split(tmp_path):
    root = image_folder(tmp_path / "imagenet", per_class=3, test_per_class=2, test_name="val")
    ds = load_dataset(f"folder:{root}")
    assert len(ds.train_x) == 9 and len(ds.test_x) == 6 and ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    data = load_records(f"folder:{root}")
    assert sorted(data.splits) == ["test", "train"] and data.splits["test"].files[0] == "val/cat/cat_0000.jpg"
