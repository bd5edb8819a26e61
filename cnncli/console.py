"""Rich consoles shared by every command: results go to stdout, messages and progress to stderr."""

import json
import math
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def finite(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None (null in JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def to_json(obj: Any, **kwargs) -> str:
    """Strict JSON (what `--json`, metrics.jsonl and summary.json hold): NaN and infinities become null,
    since a bare NaN is not JSON and strict readers (jq, JSON.parse) reject the whole line."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def fmt_count(n: float) -> str:
    """1234567 -> '1.23M' (for parameter counts, MACs and memory)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


COMPILING = "compiling the training step…"


class TrainDisplay:
    """Live training progress: a Rich bar per epoch on a terminal, plain lines otherwise (logs, CI)."""

    def __init__(self, console: Console = err_console):
        self.console = console
        self.live = console.is_terminal
        self._progress = None
        self._task = None

    def start(self, *, epochs: int, steps_per_epoch: int, first_epoch: int = 0, first_step: int = 0) -> None:
        self.epochs, self.steps = epochs, steps_per_epoch
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[stats]}", markup=False), TimeRemainingColumn(),
            console=self.console, transient=False)
        self._progress.start()
        # until the first progress update the step is being compiled: no loss yet (not a divergence)
        self._new_task(first_epoch, first_step, stats=COMPILING)

    def _new_task(self, epoch: int, completed: int = 0, stats: str = "") -> None:
        self._task = self._progress.add_task("train", total=self.steps, completed=completed, epoch=epoch + 1,
                                             epochs=self.epochs, stats=stats)

    def update(self, *, epoch: int, step: int, loss: float, acc: float, lr: float, img_per_s: float,
               grad_norm: float | None = None) -> None:
        if self._progress is not None:
            stats = f"loss {loss:.4f} acc {acc:.2%}  lr {lr:.2e}  {img_per_s:,.0f} img/s"
            self._progress.update(self._task, completed=step, stats=stats)

    def epoch_done(self, row: dict) -> None:
        val = f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}" if "val_acc" in row else ""
        if "val_robust_acc" in row:
            val += f" robust {row['val_robust_acc']:.2%}"
        if "val_pgd_acc" in row:  # single-step adversarial training: its PGD check for catastrophic overfitting
            val += f" pgd {row['val_pgd_acc']:.2%}"
        if "val_ema_acc" in row:
            val += f" (EMA {row['val_ema_acc']:.2%})"
        if "old_val_acc" in row:  # fine-tuning that kept the old head: how much of the old task remains
            val += f"  old-task val acc {row['old_val_acc']:.2%}"
        line = (f"epoch {row['epoch']}/{self.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}"
                f"{val}  lr {row['lr']:.2e}  {row['img_per_s']:,.0f} img/s  {row['seconds']:.1f}s")
        if self._progress is not None:
            self._progress.console.print(line, highlight=False)
            self._progress.remove_task(self._task)
            if row["epoch"] < self.epochs:
                self._new_task(row["epoch"])
        else:
            self.console.print(line, highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)  # one line in logs, however long

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class progress_bar:  # noqa: N801 - used like a function: `with progress_bar("eval") as advance:`
    """A context giving advance(done, total) that drives a transient Rich bar on a terminal (no-op elsewhere)."""

    def __init__(self, description: str, disable: bool = False, console: Console = err_console):
        self.description = description
        self.enabled = console.is_terminal and not disable
        self.console = console

    def __enter__(self):
        if not self.enabled:
            return lambda done, total: None
        from rich.progress import Progress

        self._progress = Progress(console=self.console, transient=True)
        self._progress.start()
        task = self._progress.add_task(self.description, total=None)
        return lambda done, total: self._progress.update(task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.enabled:
            self._progress.stop()
