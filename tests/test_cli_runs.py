"""Everyday run handling: default run directories that never collide, extending a finished run, a dry run
that writes a recipe, the curves every run ends with, comparing runs of one recipe, the compile notice."""

import io
import json

import pytest
import yaml

from tests.helpers import cli, metric_rows

TINY = """name: tiny
model: {name: mlp, args: {hidden: [16]}}
data: {source: "synthetic:8x8x1:3", limit: 240, val_fraction: 0.25}
optim: {name: adam, lr: 0.01}
schedule: {name: constant}
train: {epochs: 1, batch_size: 40, log_every: 2}
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ is relative to the working directory
    (tmp_path / "tiny.yaml").write_text(TINY)
    return tmp_path / "tiny.yaml"


def train(*args):
    result = cli("train", *args)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_default_run_directory_takes_the_next_free_name(tiny, tmp_path):
    train(tiny)
    second = train(tiny)
    assert "run directory: runs/tiny-2 (runs/tiny holds another run)" in " ".join(second.stderr.split())
    assert (tmp_path / "runs" / "tiny" / "summary.json").is_file()
    assert (tmp_path / "runs" / "tiny-2" / "summary.json").is_file()
    # an explicit --run-dir keeps the strict behaviour
    result = cli("train", tiny, "--run-dir", "runs/tiny")
    assert result.exit_code == 2 and "runs/tiny already holds a run" in result.stderr
    # --resume without --run-dir continues the newest one
    resumed = train(tiny, "--resume", "--epochs", "2")
    assert "extending runs/tiny-2 from 1 to 2 epochs" in " ".join(resumed.stderr.split())
    assert len(metric_rows(tmp_path / "runs" / "tiny-2")) == 2 and len(metric_rows(tmp_path / "runs" / "tiny")) == 1


@pytest.mark.slow
def test_a_finished_run_extends_to_the_same_metrics_as_a_longer_run(tiny, tmp_path):
    train(tiny, "--run-dir", "short")
    result = train("--resume", "--run-dir", "short", "--set", "train.epochs=3")
    assert "extending short from 1 to 3 epochs" in result.stderr  # constant lr: no schedule note
    train(tiny, "--run-dir", "long", "--epochs", "3")
    assert metric_rows(tmp_path / "short") == metric_rows(tmp_path / "long")
    assert yaml.safe_load((tmp_path / "short" / "recipe.yaml").read_text())["train"]["epochs"] == 3
    shrink = cli("train", "--resume", "--run-dir", "short", "--epochs", "2")
    assert shrink.exit_code == 2 and "was set for 3 epochs: train.epochs can only grow" in shrink.stderr
    other = cli("train", "--resume", "--run-dir", "short", "--set", "optim.lr=0.1")
    assert other.exit_code == 2 and "--set optim.lr cannot change a run being resumed" in other.stderr


@pytest.mark.slow
def test_dry_run_prints_a_recipe_that_trains(tiny, tmp_path):
    described = "a description longer than any terminal line, " * 4  # no wrapping in the printed YAML
    tiny.write_text(TINY + f"description: {described}\n")
    result = train(tiny, "--dry-run", "--lr", "0.02")
    assert "mlp:" in result.stderr and "mlp:" not in result.stdout  # the model line is a message
    (tmp_path / "mine.yaml").write_text(result.stdout)
    assert yaml.safe_load(result.stdout)["optim"]["lr"] == 0.02
    assert yaml.safe_load(result.stdout)["description"] == described.strip()
    again = train(tmp_path / "mine.yaml", "--dry-run")
    assert again.stdout == result.stdout


@pytest.mark.slow
def test_every_trained_run_has_its_curves(tiny, tmp_path):
    result = train(tiny, "--run-dir", "r")
    png = tmp_path / "r" / "plots" / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"curves: {png.relative_to(tmp_path)}" in result.stdout


@pytest.mark.slow
def test_compare_tells_runs_of_one_recipe_apart(tiny, tmp_path):
    train(tiny, "--run-dir", "a/tiny")
    train(tiny, "--run-dir", "b/tiny", "--lr", "0.003")
    result = cli("compare", "a/tiny", "b/tiny", "--out", "c.png", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["differing_keys"] == ["optim.lr"]
    assert sorted((r["run"], r["differs"]["optim.lr"]) for r in report["runs"]) == [("a/tiny", 0.01),
                                                                                    ("b/tiny", 0.003)]
    table = cli("compare", "a/tiny", "b/tiny", "--out", "c.png")
    header = next(line for line in table.stdout.splitlines() if line.startswith("┃") and " run " in line)
    assert [cell.strip() for cell in header.split("┃")][1:3] == ["run", "lr"]  # the key that differs, shortened
    assert "a/tiny" in table.stdout and "0.003" in table.stdout
    assert (tmp_path / "c.png").is_file()


def test_the_progress_bar_says_compiling_before_the_first_step():
    from rich.console import Console

    from cnncli.console import COMPILING, TrainDisplay

    def shown(display):
        out = Console(file=io.StringIO(), width=200)
        out.print(display._progress.get_renderable())
        return out.file.getvalue()

    display = TrainDisplay(Console(file=io.StringIO(), force_terminal=True, width=200))
    display.start(epochs=2, steps_per_epoch=10)
    first = shown(display)
    assert COMPILING in first and "nan" not in first and "loss" not in first
    display.update(epoch=0, step=3, loss=0.5, acc=0.8, lr=1e-3, img_per_s=1234)
    assert "loss 0.5000 acc 80.00%  lr 1.00e-03  1,234 img/s" in shown(display)
    display.finish()


@pytest.mark.slow
def test_tta_warns_when_the_run_never_trained_on_flips(tiny, tmp_path):
    from cnncli import recipe as recipe_lib
    from cnncli.train.toolbox import tta_warning

    assert "trained without hflip" in tta_warning(recipe_lib.load("lenet5_fashion_mnist"))
    assert tta_warning(recipe_lib.load("fast_fashion_mnist")) is None  # trains with flips
    train(tiny, "--run-dir", "plain")
    train(tiny, "--run-dir", "flipped", "--set", "augment=[{name: hflip, p: 0.5}]")
    warned = cli("eval", "plain", "--tta", "--json")
    assert warned.exit_code == 0 and "warning: --tta averages each image with its horizontal flip" in \
        " ".join(warned.stderr.split())
    json.loads(warned.stdout)  # the warning stays off stdout
    for args in (["flipped", "--tta"], ["plain"]):
        result = cli("eval", *args, "--json")
        assert result.exit_code == 0 and "warning" not in result.stderr
