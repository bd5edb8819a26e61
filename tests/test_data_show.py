"""`cnncli data show`: class counts and imbalance against independent counts, and the grid of examples."""

import json

import numpy as np
from helpers import cli
from PIL import Image


def test_digits_counts_match_sklearn(tmp_path):
    from sklearn.datasets import load_digits

    out = tmp_path / "digits.png"
    result = cli("data", "show", "digits", "--split", "all", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    expected = np.bincount(load_digits().target)
    assert [c["count"] for c in shown["classes"]] == expected.tolist() and shown["n"] == 1797
    assert shown["imbalance"] == expected.max() / expected.min()
    assert Image.open(out).format == "PNG"


def test_imbalanced_folder_counts_and_grid(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"cat": 5, "dog": 2, "emu": 1}
    for name, k in sizes.items():
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for i in range(k):  # mixed sizes: --image-size resizes them
            Image.fromarray(rng.integers(0, 255, (12 + i, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "grid.png"
    result = cli("data", "show", f"folder:{tmp_path / 'data'}", "--image-size", "16x16", "--per-class", 3, "--out", out)
    assert result.exit_code == 0, result.output
    listed = {d.name: len(list(d.iterdir())) for d in (tmp_path / "data").iterdir()}
    for name, k in listed.items():
        assert f"{name}" in result.stdout and f"{k / 8:.1%}" in result.stdout
    assert "imbalance (largest / smallest class): 5.00 (cat / emu)" in result.stdout
    assert Image.open(out).format == "PNG"


def test_data_show_bad_input_is_one_line(tmp_path):
    for args, message in ((["digits", "--split", "val"], "--split must be one of"),
                          (["digits", "--image-size", "big"], "--image-size expects HxW")):
        result = cli("data", "show", *args, "--out", tmp_path / "x.png")
        assert result.exit_code == 2 and message in result.stderr, result.output
