"""Live logs: TensorBoard events (read back with TensorBoard's own reader, as `tensorboard --logdir` shows
them) and CSV files that agree with metrics.jsonl, also after a resume."""

import csv
import json

import pytest
from helpers import cli, cli_process


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard reads the run's event files (its EventAccumulator, which
    drops the events a restarted writer purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def _csv(path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tensorboard_and_csv_logs_match_the_metrics(tmp_path, fashion):
    """One epoch, then extended to two with --resume: the resume starts at step 9, whose events (the
    epoch's last log and its metrics) TensorBoard must keep."""
    run = tmp_path / "run"
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", run, "--set", "data.limit=1280", "--set",
                 "train.epochs=1", "--set", "train.log_every=3")
    assert result.exit_code == 0, result.output
    result = cli("train", "--resume", "--run-dir", run, "--epochs", "2")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = _csv(run / "epochs.csv")
    assert [float(r["val_acc"]) for r in epochs] == [m["val_acc"] for m in metrics]
    steps = _csv(run / "steps.csv")
    spe = metrics[0]["step"]  # 9 steps an epoch: logs at 3, 6, 9 (the epoch's end)
    assert [int(r["step"]) for r in steps] == [3, 6, 9, 12, 15, 18]
    assert float(steps[spe // 3 - 1]["loss"]) == pytest.approx(metrics[0]["train_loss"])  # the epoch's last log
    scalars = {(tag, step): value for tag, events in _scalars(run / "tensorboard").items() for step, value in events}
    assert sorted({step for tag, step in scalars if tag == "train/loss"}) == [3, 6, 9, 12, 15, 18]
    for m in metrics:
        for key in ("val_acc", "val_loss", "train_loss", "lr", "grad_norm"):
            assert scalars[(f"epoch/{key}", m["step"])] == pytest.approx(m[key], rel=1e-6)
    for r in steps:
        for key in ("loss", "acc", "lr", "grad_norm"):
            assert scalars[(f"train/{key}", int(r["step"]))] == pytest.approx(float(r[key]), rel=1e-6)


@pytest.mark.slow
def test_a_resumed_run_drops_the_logs_after_its_checkpoint(tmp_path, fashion):
    import signal
    import time

    run = tmp_path / "run"
    args = ["train", "lenet5_fashion_mnist", "--run-dir", run, "--set", "data.limit=1280", "--set", "train.epochs=3",
            "--set", "train.log_every=3"]
    proc = cli_process(*args)
    while not (run / "epochs.csv").is_file() or len(_csv(run / "epochs.csv")) < 1:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # stops during epoch 2; the checkpoint is that step
    proc.communicate(timeout=300)
    result = cli("train", "--resume", "--run-dir", run)
    assert result.exit_code == 0, result.output
    steps = [int(r["step"]) for r in _csv(run / "steps.csv")]
    assert steps == sorted(set(steps)) and steps[-1] == 27  # no step logged twice
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["epoch"]) for r in _csv(run / "epochs.csv")] == [m["epoch"] for m in metrics] == [1, 2, 3]
    scalars = _scalars(run / "tensorboard")  # two event files now: TensorBoard shows every step once
    rows = _csv(run / "steps.csv")
    assert [step for step, _ in scalars["train/loss"]] == [int(r["step"]) for r in rows]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert [step for step, _ in scalars["epoch/val_acc"]] == [m["step"] for m in metrics]
    assert [v for _, v in scalars["epoch/val_acc"]] == pytest.approx([m["val_acc"] for m in metrics], rel=1e-6)
