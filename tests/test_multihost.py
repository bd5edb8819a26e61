"""Several processes, one run: 2 processes on localhost (2 CPU devices each) train like 1 process.

The two processes run in different working directories with the same relative --run-dir, as two
hosts without a shared filesystem would: process 0 must write everything, process 1 nothing, and a
resume must work from what process 0 alone can read.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import REPO, cli, metric_rows

TIMEOUT = 300  # seconds for one launch: a hung collective fails the test instead of blocking CI
# digits: 100 images -> 90 train / 10 val: one step of 64 per epoch, so each metrics row is one step's loss;
# a constant learning rate makes a 2-epoch run the first half of a 4-epoch one (for the resume below)
ARGS = ["lenet5_fashion_mnist", "--run-dir", "run", "--set", "data.source=digits", "--set", "data.limit=100",
        "--set", "model.name=mlp", "--set", "train.batch_size=64", "--set", "schedule.name=constant",
        "--set", "train.log_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _single(cwd, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "cnncli", "train", *args], cwd=cwd, env=_env(1),
                          capture_output=True, text=True, timeout=TIMEOUT)


def _launch(cwds, *args: str) -> list[subprocess.CompletedProcess]:
    """`cnncli train args` as process i of len(cwds) in cwds[i]; each process sees 2 CPU devices."""
    return _wait(_start(cwds, *args), time.monotonic() + TIMEOUT)


def _start(cwds, *args: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i, cwd in enumerate(cwds):
        cwd.mkdir(exist_ok=True)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cnncli", "train", *args, "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", str(len(cwds)), "--process-id", str(i)],
            cwd=cwd, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs, deadline: float) -> list[subprocess.CompletedProcess]:
    """Every process's result; one still running at the deadline is killed (its test then fails)."""
    results = []
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += "\n[still running at the deadline: killed]"
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.slow
def test_two_processes_match_one_and_only_process_0_writes(tmp_path):
    single = _single(tmp_path / "single", *ARGS, "--set", "train.epochs=4")
    assert single.returncode == 0, single.stderr
    hosts = [tmp_path / "host0", tmp_path / "host1"]

    first = _launch(hosts, *ARGS, "--set", "train.epochs=2")
    for i, result in enumerate(first):
        assert result.returncode == 0, (i, result.stderr[-3000:])
    run = hosts[0] / "run"
    assert not (hosts[1] / "run").exists()  # process 1 wrote nothing, not even the directory
    assert first[1].stdout == ""  # and printed no results (nor Gloo's connection notes)
    assert "epoch 1/2" in first[0].stderr and "epoch" not in first[1].stderr
    assert "test top-1" in first[0].stdout
    assert "2 processes, 4 devices: 32 images of each batch per process" in first[0].stderr

    # resume on both "hosts" with 2 more epochs; process 1 cannot see the run: process 0 hands it out
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["train"]["epochs"] = 4
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    resumed = _launch(hosts, "--resume", "--run-dir", "run")
    for i, result in enumerate(resumed):
        assert result.returncode == 0, (i, result.stderr[-3000:])
    assert "resuming run at epoch 3, step 0" in resumed[0].stderr
    assert not (hosts[1] / "run").exists()

    one, two = metric_rows(tmp_path / "single" / "run"), metric_rows(run)
    assert [r["epoch"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):  # one step per epoch: the loss of each step
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
        for key in ("train_acc", "val_acc", "val_top5"):
            assert a[key] == b[key], (key, a, b)
    test_one = json.loads((tmp_path / "single" / "run" / "summary.json").read_text())["test"]
    test_two = json.loads((run / "summary.json").read_text())["test"]
    assert test_one["n"] == test_two["n"] == 360  # digits' test split, every example counted once
    assert test_one["confusion"] == test_two["confusion"]
    assert test_one["loss"] == pytest.approx(test_two["loss"], rel=1e-5)
    # the checkpoint is an ordinary one: a single process evaluates it
    out = subprocess.run([sys.executable, "-m", "cnncli", "eval", run, "--json"], env=_env(1),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["confusion"] == test_two["confusion"]


@pytest.mark.slow
def test_two_processes_stream_their_own_rows_and_match_one(tmp_path):
    """data.pipeline=stream: each process reads only its rows of every global batch from the ArrayRecord
    shards (counted), and the run's losses are a single process's."""
    from cnncli.data.convert import convert

    records = tmp_path / "digits_records"
    convert("digits", records, per_shard=400)
    args = [*ARGS, "--set", f"data.source=arrayrecord:{records}", "--set", "data.pipeline=stream",
            "--set", "data.workers=1", "--set", "train.epochs=3"]
    single = _single(tmp_path / "single", *args)
    assert single.returncode == 0, single.stderr
    hosts = [tmp_path / "host0", tmp_path / "host1"]
    results = _launch(hosts, *args)
    for i, result in enumerate(results):
        assert result.returncode == 0, (i, result.stderr[-3000:])
    assert not (hosts[1] / "run").exists() and results[1].stdout == ""

    one, two = metric_rows(tmp_path / "single" / "run"), metric_rows(hosts[0] / "run")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)
        for key in ("train_acc", "val_acc", "val_top5"):
            assert a[key] == b[key], (key, a, b)
    summary_one = json.loads((tmp_path / "single" / "run" / "summary.json").read_text())
    summary_two = json.loads((hosts[0] / "run" / "summary.json").read_text())
    assert summary_one["test"]["confusion"] == summary_two["test"]["confusion"]
    # per epoch: one training batch of 64 (32 rows each) and the 10 validation images in a batch of 12
    # padded for 4 devices (process 0 holds rows 0-5, process 1 rows 6-11, of which 4 are images)
    assert summary_one["stream"]["records_read"] == [3 * (64 + 10)]
    assert summary_two["stream"]["records_read"] == [3 * (32 + 6), 3 * (32 + 4)]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_with_a_checkpoint(tmp_path):
    """Preemption (Slurm, Kubernetes, `timeout`) sends SIGTERM; here only process 1 gets it. Every process
    stops at the next progress update, process 0 checkpoints that step, and all exit with 143: none hangs
    (JAX's own preemption service used to take the signal and leave the processes running)."""
    from cnncli.run import checkpoint

    hosts = [tmp_path / "host0", tmp_path / "host1"]
    procs = _start(hosts, *ARGS, "--set", "train.epochs=5000")
    run = hosts[0] / "run"
    deadline = time.monotonic() + TIMEOUT
    while not (run / "metrics.jsonl").is_file() and procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    results = _wait(procs, time.monotonic() + 120)
    assert [r.returncode for r in results] == [143, 143], [r.stderr[-2000:] for r in results]
    text = " ".join(results[0].stderr.split())
    assert "stopped by SIGTERM" in text and "checkpoint saved" in text and "--resume" in text
    assert "Traceback" not in results[0].stderr + results[1].stderr
    index = json.loads((run / "checkpoints" / "index.json").read_text())
    assert index["latest"]["epoch"] == metric_rows(run)[-1]["epoch"] < 5000  # the step it stopped at
    assert checkpoint.damage(run / "checkpoints" / index["latest"]["dir"]) is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--process-id", "1"], "--process-id also needs --coordinator and --num-processes"),
    (["--num-processes", "2", "--process-id", "0"], "also needs --coordinator"),
    (["--coordinator", "node0:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 is out of range for --num-processes 2: use 0 to 1"),
    (["--coordinator", "node0:1234", "--num-processes", "0", "--process-id", "0"], "at least 1 process"),
    (["--coordinator", "node0", "--num-processes", "2", "--process-id", "0"], "'node0' is not HOST:PORT"),
    (["--coordinator", "node0:99999", "--num-processes", "2", "--process-id", "0"], "is not HOST:PORT"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, message, tmp_path):
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", tmp_path / "run", *flags)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) <= 2  # Rich may wrap the line
    assert not (tmp_path / "run").exists()


def test_coordinator_addresses_accepted():
    from cnncli.run.distributed import check_flags

    assert check_flags(None, None, None) is False
    for address in ("10.0.0.1:1234", "node-0.cluster:80", "[fe80::1]:65535", "localhost:1"):
        assert check_flags(address, 4, 3) is True


def test_cluster_detection_needs_more_than_one_process(monkeypatch):
    """Without flags, JAX's own detection starts a multi-process run only for a job of several processes."""
    from cnncli.run.distributed import cluster_detected

    for var in ("OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_SKIP_MDS_QUERY"):
        monkeypatch.delenv(var, raising=False)
    slurm = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for var, value in slurm.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not cluster_detected()  # one Slurm task: a plain run, not pinned to one device
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert cluster_detected()
