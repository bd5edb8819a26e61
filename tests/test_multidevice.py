"""The same code on several devices: 4 CPU devices give the losses of 1 device (data-parallel mesh)."""

import json
import os
import subprocess
import sys

from tests.helpers import REPO, metric_rows

ARGS = ["--set", "data.source=synthetic:16x16x1:4", "--set", "model.name=mlp", "--set", "train.epochs=2",
        "--set", "train.batch_size=64", "--set", "optim.name=momentum", "--set", "optim.lr=0.05"]


def _train(run_dir, devices: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, "-m", "cnncli", "train", "lenet5_fashion_mnist", "--run-dir", run_dir,
                           *ARGS, *extra], env=env, capture_output=True, text=True)


def test_four_devices_match_one(tmp_path):
    one, four = _train(tmp_path / "one", 1), _train(tmp_path / "four", 4)
    assert one.returncode == 0, one.stderr
    assert four.returncode == 0, four.stderr
    a, b = metric_rows(tmp_path / "one"), metric_rows(tmp_path / "four")
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert abs(ra[key] - rb[key]) < 1e-4, (key, ra, rb)
    test_a = json.loads((tmp_path / "one" / "summary.json").read_text())["test"]
    test_b = json.loads((tmp_path / "four" / "summary.json").read_text())["test"]
    assert test_a["n"] == test_b["n"] == 500


def test_batch_must_divide_over_devices(tmp_path):
    result = _train(tmp_path / "bad", 4, "--set", "train.batch_size=62")
    assert result.returncode == 2
    assert "train.batch_size=62 does not divide over 4 devices" in result.stderr


def test_eval_on_four_devices_matches_one(tmp_path):
    assert _train(tmp_path / "run", 1).returncode == 0
    results = []
    for devices in (1, 4):
        env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out = subprocess.run([sys.executable, "-m", "cnncli", "eval", tmp_path / "run", "--json"], env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout))
    assert results[0]["n"] == results[1]["n"] == 500
    assert results[0]["top1"] == results[1]["top1"]
    assert abs(results[0]["loss"] - results[1]["loss"]) < 1e-5
