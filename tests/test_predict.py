"""`cnncli predict` on many files: folders, globs, batches, CSV and JSON, the same probabilities as in memory."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cnncli.inspect.interpret import load_model, probabilities, read_images
from cnncli.train.trained_run import eval_data, load_trained
from tests.helpers import cli

N_FILES = 600  # more than a table lists (predict.MAX_LISTED), several batches of 64


@pytest.fixture(scope="module")
def image_tree(lenet_run, tmp_path_factory):
    """N_FILES Fashion-MNIST test images as PNG files in nested folders, a hidden folder and a text file."""
    root = tmp_path_factory.mktemp("predict")
    x, y, _ = eval_data(load_trained(lenet_run), "test")
    for i in range(N_FILES):
        folder = root / "photos" / f"batch{i % 3}" / ("deeper" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, ..., 0]).save(folder / f"{i:04d}.png")
    (root / "photos" / ".thumbnails").mkdir()
    Image.fromarray(x[0, ..., 0]).save(root / "photos" / ".thumbnails" / "t.png")  # skipped: hidden
    (root / "photos" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.slow
def test_folders_and_globs_in_batches_give_the_in_memory_probabilities(lenet_run, image_tree, tmp_path):
    out = tmp_path / "preds.csv"
    result = cli("predict", lenet_run, image_tree / "photos", "--batch-size", "64", "--top", "3", "--out", out)
    assert result.exit_code == 0, result.output
    with out.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3"]
    files = [row[0] for row in rows[1:]]
    assert len(files) == N_FILES and len(set(files)) == N_FILES and not any(".thumbnails" in f for f in files)
    trained = load_trained(lenet_run)
    reference = probabilities(load_model(trained), read_images(files, trained.image_shape))
    names = trained.class_names
    for row, p in zip(rows[1:], reference):
        order = np.argsort(-p, kind="stable")[:3]
        assert row[1::2] == [names[j] for j in order]
        np.testing.assert_allclose([float(v) for v in row[2::2]], p[order], atol=2e-6)
    assert f"{N_FILES:,} images by most probable class" in " ".join(result.stdout.split())  # too many to list
    # a glob (as the shell would leave it quoted) and a single file: the same predictions
    result = cli("predict", lenet_run, str(image_tree / "photos" / "batch1" / "**" / "*.png"),
                 str(image_tree / "photos" / "batch0" / "0000.png"), "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert len(listed) == N_FILES // 3 + 1
    by_file = {row[0]: row[1] for row in rows[1:]}
    assert all(entry["top"][0]["class"] == by_file[entry["image"]] for entry in listed)


def test_json_file_and_a_table_for_a_few(lenet_run, image_tree, tmp_path):
    out = tmp_path / "preds.json"
    few = image_tree / "photos" / "batch2"
    result = cli("predict", lenet_run, str(few / "*.png"), "--out", out, "--top", "1")
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert len(written) == len(list(few.glob("*.png"))) and all(len(e["top"]) == 1 for e in written)
    assert "predictions" in result.stdout and written[0]["top"][0]["class"] in result.stdout


@pytest.mark.parametrize("args,expected", [
    (["nowhere.png"], "no such image file or folder: nowhere.png"),
    (["empty"], "no images (.bmp, .gif, .jpeg, .jpg, .png) in the folder"),
    (["photos/*.jpeg"], "no image file matches"),
    (["photos", "--out", "preds.txt"], "--out preds.txt: write .csv or .json"),
])
def test_bad_input_is_one_line(lenet_run, image_tree, tmp_path, monkeypatch, args, expected):
    (image_tree / "empty").mkdir(exist_ok=True)
    monkeypatch.chdir(image_tree)
    result = cli("predict", lenet_run, *args)
    assert result.exit_code == 2 and expected in " ".join(result.stderr.split()), result.output
    assert "Traceback" not in result.output
