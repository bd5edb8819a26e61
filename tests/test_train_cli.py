"""End to end through the CLI on real Fashion-MNIST: train, eval, resume, interrupts, bad input."""

import json
import signal
import time

import pytest

from tests.helpers import SMALL_LENET, cli, cli_process, metric_rows


def test_train_writes_the_run(lenet_run):
    for name in ("recipe.yaml", "data.json", "metrics.jsonl", "summary.json", "checkpoints/index.json"):
        assert (lenet_run / name).is_file(), name
    rows = metric_rows(lenet_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    summary = json.loads((lenet_run / "summary.json").read_text())
    assert summary["params"] == 61706
    assert summary["test"]["n"] == 10000 and summary["test"]["top1"] > 0.70


def test_eval_json_counts_every_example(lenet_run):
    result = cli("eval", lenet_run, "--json", "--batch-size", "999")  # 999 does not divide 10,000
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["n"] == 10000 and sum(sum(row) for row in out["confusion"]) == 10000
    assert 0.70 < out["top1"] <= out["top5"] <= 1.0
    assert out["per_class"][9]["class"] == "Ankle boot" and out["per_class"][9]["n"] == 1000
    summary = json.loads((lenet_run / "summary.json").read_text())
    assert out["top1"] == pytest.approx(summary["test"]["top1"])
    assert out["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_eval_table_and_other_split(lenet_run):
    result = cli("eval", lenet_run, "--split", "val")
    assert result.exit_code == 0
    assert "top-1 accuracy" in result.stdout and "Ankle boot" in result.stdout
    assert "val: 300 images" in " ".join(result.stdout.split())  # 10% of the 3,000-image slice


@pytest.mark.slow
def test_eval_other_source_with_same_classes(lenet_run, tmp_path):
    import numpy as np

    from cnncli.data.sources import load_dataset

    ds = load_dataset("fashion_mnist")
    npz = tmp_path / "fm.npz"
    np.savez(npz, x=ds.test_x[:500, :, :, 0], y=ds.test_y[:500])
    result = cli("eval", lenet_run, "--data", f"npz:{npz}", "--split", "train", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    full = json.loads(cli("eval", lenet_run, "--json").stdout)
    assert out["n"] == 500 and abs(out["top1"] - full["top1"]) < 0.08


@pytest.mark.slow
def test_same_recipe_twice_gives_identical_metrics(lenet_run, tmp_path):
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", tmp_path / "again", *SMALL_LENET)
    assert result.exit_code == 0
    assert metric_rows(tmp_path / "again") == metric_rows(lenet_run)


def test_existing_run_needs_resume_or_overwrite(lenet_run):
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", lenet_run, *SMALL_LENET)
    assert result.exit_code == 2 and "already holds a run" in result.stderr


def _wait_for_checkpoint(run_dir, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "checkpoints" / "index.json").is_file():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training made no progress")


THREE_EPOCHS = [*SMALL_LENET, "--set", "train.epochs=3"]


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory, fashion):
    """The uninterrupted 3-epoch run that every interrupted-and-resumed run must reproduce."""
    reference = tmp_path_factory.mktemp("reference") / "run"
    assert cli("train", "lenet5_fashion_mnist", "--run-dir", reference, *THREE_EPOCHS).exit_code == 0
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_mid_run_then_resumed_matches_uninterrupted(three_epochs, tmp_path, sig):
    """3-epoch run killed after epoch 1 (mid-epoch 2), resumed: same metrics as the uninterrupted run."""
    reference = three_epochs
    run_dir = tmp_path / "interrupted"
    proc = cli_process("train", "lenet5_fashion_mnist", "--run-dir", run_dir, *THREE_EPOCHS)
    _wait_for_checkpoint(run_dir, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert "checkpoint saved" in stderr and "Traceback" not in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    epochs_before = len(metric_rows(run_dir))
    assert epochs_before in (1, 2)

    result = cli("train", "--resume", "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    assert metric_rows(run_dir) == metric_rows(reference)
    a = json.loads((run_dir / "summary.json").read_text())["test"]
    b = json.loads((reference / "summary.json").read_text())["test"]
    assert a["top1"] == b["top1"] and a["loss"] == b["loss"]


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_checkpoints(lenet_run, tmp_path):
    run_dir = tmp_path / "nan"
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", run_dir, *SMALL_LENET,
                 "--set", "optim.name=sgd", "--set", "optim.lr=1e6", "--set", "data.preprocess=scale")
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "the training loss became nan" in message and "Lower optim.lr" in message
    assert not (run_dir / "metrics.jsonl").exists() or all(
        r["train_loss"] == r["train_loss"] for r in metric_rows(run_dir))


@pytest.mark.slow
def test_resume_killed_before_first_checkpoint_starts_over(lenet_run, tmp_path):
    import shutil

    run_dir = tmp_path / "early"
    shutil.copytree(lenet_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    result = cli("train", "--resume", "--run-dir", run_dir)
    assert result.exit_code == 0 and "starting it from the beginning" in result.stderr
    assert metric_rows(run_dir) == metric_rows(lenet_run)


def test_bad_input_is_one_line_exit_2(tmp_path, lenet_run):
    cases = [
        (["train", "--resume", "--run-dir", tmp_path / "nothing"], "nothing to resume"),
        (["eval", tmp_path], "is not a cnncli run"),
        (["eval", tmp_path / "missing"], "does not exist"),
        (["train", "lenet5_fashion_mnist", "--run-dir", tmp_path / "big", "--set", "data.limit=100",
          "--set", "train.batch_size=500"], "is larger than the 90 training images"),
        (["train", "lenet5_fashion_mnist", "--set", "data.source=folder:/no/such/dir", "--dry-run"], "/no/such/dir"),
    ]
    for args, expected in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in " ".join(result.stderr.split()), (args, result.stderr)
        assert "Traceback" not in result.output
    (tmp_path / "norun" / "checkpoints").mkdir(parents=True)
    (tmp_path / "norun" / "recipe.yaml").write_text((lenet_run / "recipe.yaml").read_text())
    result = cli("eval", tmp_path / "norun")
    assert result.exit_code == 2 and "no checkpoint" in result.stderr


def test_folder_with_corrupt_image_and_one_class(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(tmp_path / "pets" / cls / f"{i}.png")
    (tmp_path / "pets" / "dog" / "broken.png").write_bytes(b"not a png")
    result = cli("train", "lenet5_fashion_mnist", "--set", f"data.source=folder:{tmp_path / 'pets'}", "--dry-run")
    assert result.exit_code == 2 and "broken.png" in result.stderr
    (tmp_path / "one" / "cat").mkdir(parents=True)
    Image.new("RGB", (12, 12)).save(tmp_path / "one" / "cat" / "a.png")
    result = cli("train", "lenet5_fashion_mnist", "--set", f"data.source=folder:{tmp_path / 'one'}", "--dry-run")
    assert result.exit_code == 2 and "at least 2" in result.stderr


def test_dry_run_prints_recipe_and_model_line():
    result = cli("train", "lenet5_fashion_mnist", "--dry-run", "--set", "optim.lr=0.01")
    assert result.exit_code == 0
    assert "lr: 0.01" in result.stdout
    # the model line is a message (stderr): `--dry-run > my.yaml` writes a recipe
    assert "lenet5: 61,706 parameters, input 28x28x1, 10 classes" in " ".join(result.stderr.split())


def test_help_is_instant_and_imports_no_jax():
    import subprocess
    import sys

    code = "import sys; from cnncli.cli import app; assert 'jax' not in sys.modules and 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    result = cli("--help")
    assert result.exit_code == 0 and "train" in result.stdout and "eval" in result.stdout
    assert cli("--version").stdout.startswith("cnncli ")


@pytest.mark.slow
def test_compilation_is_timed_apart_and_validation_and_test_share_one_eval_program(tmp_path, fashion, monkeypatch):
    """Compiling each step is made 3 s slower: summary.json counts it as compile time, epoch 1's time leaves
    it out, and the run compiles one train step and one eval step (validation, EMA and test share it)."""
    from jax._src import compiler

    slow, compiled_steps = 3.0, []
    real = compiler.compile_or_get_cached

    def slow_compile(backend, computation, *args, **kwargs):
        name = str(computation.operation.attributes["sym_name"]).strip('"')
        if name in ("jit_train_step", "jit_step"):  # the train step, the eval step
            compiled_steps.append(name)
            time.sleep(slow)
        return real(backend, computation, *args, **kwargs)

    monkeypatch.setattr(compiler, "compile_or_get_cached", slow_compile)
    run_dir = tmp_path / "timed"
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", run_dir, "--set", "data.limit=640",
                 "--set", "train.batch_size=64", "--set", "train.epochs=2", "--set", "train.ema=0.9")
    assert result.exit_code == 0, result.output
    assert sorted(compiled_steps) == ["jit_step", "jit_train_step"]  # one eval step: validation, EMA and test
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["compile_seconds"] >= 2 * slow
    assert rows[0]["seconds"] < slow and rows[0]["img_per_s"] == pytest.approx(9 * 64 / rows[0]["seconds"], rel=0.01)
    assert summary["train_seconds"] == pytest.approx(sum(r["seconds"] for r in rows), abs=2e-3)
    assert summary["test_seconds"] > 0
    assert "compiled the train and eval steps in" in result.stderr
