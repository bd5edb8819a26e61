"""Live logs of a training run beside metrics.jsonl: TensorBoard event files and CSV files.

`RunLogs` wraps the loop's progress display: every progress update (train.log_every steps) becomes
a row of steps.csv and TensorBoard scalars train/loss, train/acc, train/lr, train/img_per_s,
train/grad_norm at its global step; every epoch's metrics row (validation, EMA, robust accuracy, ...)
becomes epoch/* scalars and a row of epochs.csv. metrics.jsonl stays the source of truth: epochs.csv
is rewritten from it each epoch, and a resumed run drops the step rows and TensorBoard events after
the checkpoint it resumes from (TensorBoard's purge_step). The TensorBoard writer is tensorboardX's
(no TensorFlow); without tensorboardX installed only the CSV files are written.
"""

import csv
import math
from typing import Any

from cnncli.run.rundir import RunDir

STEP_FIELDS = ("step", "epoch", "loss", "acc", "lr", "img_per_s", "grad_norm")


def tensorboard_writer(logdir, purge_step: int | None):
    """A tensorboardX SummaryWriter, or None when tensorboardX is not installed. TensorBoard hides the
    earlier events of `logdir` at steps >= `purge_step` (None: hide nothing)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=10)


class RunLogs:
    """A progress display that also writes the run's TensorBoard events and CSV logs (see the module)."""

    def __init__(self, display, run: RunDir):
        self.display = display
        self.run = run
        self.steps_per_epoch = 1
        self.writer = None

    def start(self, *, epochs: int, steps_per_epoch: int, first_epoch: int = 0, first_step: int = 0) -> None:
        self.steps_per_epoch = steps_per_epoch
        resumed_at = first_epoch * steps_per_epoch + first_step
        kept = [r for r in _read_csv(self.run.steps_csv) if int(r["step"]) <= resumed_at] if resumed_at else []
        _write_csv(self.run.steps_csv, STEP_FIELDS, kept)
        # TensorBoard drops the events at and after the purge step: the checkpoint's own step stays
        self.writer = tensorboard_writer(self.run.tensorboard, resumed_at + 1 if resumed_at else None)
        self.display.start(epochs=epochs, steps_per_epoch=steps_per_epoch, first_epoch=first_epoch,
                           first_step=first_step)

    def update(self, *, epoch: int, step: int, loss: float, acc: float, lr: float, img_per_s: float,
               grad_norm: float | None = None) -> None:
        self.display.update(epoch=epoch, step=step, loss=loss, acc=acc, lr=lr, img_per_s=img_per_s)
        row = {"step": epoch * self.steps_per_epoch + step, "epoch": epoch + 1, "loss": loss, "acc": acc, "lr": lr,
               "img_per_s": img_per_s, "grad_norm": grad_norm}
        with self.run.steps_csv.open("a", newline="") as f:
            csv.DictWriter(f, STEP_FIELDS).writerow(row)
        if self.writer is not None:
            for key in STEP_FIELDS[2:]:
                if row[key] is not None:
                    self.writer.add_scalar(f"train/{key}", row[key], row["step"])

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.display.epoch_done(row)
        rows = self.run.read_metrics()
        fields = list(dict.fromkeys(k for r in rows for k in r))
        _write_csv(self.run.epochs_csv, fields, rows)
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{key}", value, row["step"])
            self.writer.flush()

    def message(self, text: str) -> None:
        self.display.message(text)

    def finish(self) -> None:
        self.display.finish()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _read_csv(path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path, fields, rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
