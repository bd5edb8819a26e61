"""The run directory: what `cnncli train` writes and every other command reads.

    runs/<name>/
      recipe.yaml       the resolved recipe (after --set overrides)
      data.json         class names, image shape and the normalization statistics of the run
      metrics.jsonl     one JSON object per epoch
      checkpoints/      Orbax checkpoints + index.json (latest, best)
      summary.json      final results (best epoch, test metrics)
      calibration.json  temperatures fitted by `cnncli eval --temperature`, per checkpoint and weights
      tensorboard/      TensorBoard event files (with tensorboardX installed); steps.csv, epochs.csv: the same as CSV
      plots/            figures
"""

import json
import os
from pathlib import Path
from typing import Any

from cnncli.errors import UserError

DEFAULT_ROOT = Path("runs")


class RunDir:
    writes = True  # this process writes the run directory (see FollowerRun)

    def __init__(self, path: Path | str):
        self.path = Path(path)

    recipe = property(lambda self: self.path / "recipe.yaml")
    data = property(lambda self: self.path / "data.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    summary = property(lambda self: self.path / "summary.json")
    plots = property(lambda self: self.path / "plots")
    calibration = property(lambda self: self.path / "calibration.json")
    tensorboard = property(lambda self: self.path / "tensorboard")
    steps_csv = property(lambda self: self.path / "steps.csv")
    epochs_csv = property(lambda self: self.path / "epochs.csv")

    def has_run(self) -> bool:
        return (self.checkpoints / "index.json").is_file() or self.metrics.is_file()

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: ignore it
                continue
        return rows

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric rows after `last_epoch` (written after the checkpoint a resume starts from)."""
        rows = [r for r in self.read_metrics() if r.get("epoch", 0) <= last_epoch]
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write_json(self, path: Path, obj: Any) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text())


def numbered_runs(root: Path, name: str) -> list[RunDir]:
    """root/name, root/name-2, root/name-3, ... as far as they exist, in that order."""
    runs, k = [RunDir(root / name)], 2
    while (root / f"{name}-{k}").exists():
        runs.append(RunDir(root / f"{name}-{k}"))
        k += 1
    return runs


def default_run_dir(root: Path, name: str) -> RunDir:
    """root/name, or the first of root/name-2, root/name-3, ... that holds no run when it is taken."""
    runs = numbered_runs(root, name)
    free = next((r for r in runs if not r.has_run()), None)
    return free or RunDir(root / f"{name}-{len(runs) + 1}")


def latest_run_dir(root: Path, name: str) -> RunDir:
    """The newest of root/name, root/name-2, ... that holds a run (what `--resume` without --run-dir means)."""
    held = [r for r in numbered_runs(root, name) if r.has_run()]
    return held[-1] if held else RunDir(root / name)


class FollowerRun(RunDir):
    """A run as the processes other than 0 of a multi-process run see it: they write nothing.

    Process 0 writes the run directory (which the others may not even see). Every process computes
    the same metrics rows, so the followers keep theirs in memory: decisions taken from the history
    (early stopping, plateau lr drops) come out alike on every process.
    """

    writes = False

    def __init__(self, path: Path | str):
        super().__init__(path)
        self._rows: list[dict[str, Any]] = []

    def set_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Start from the rows process 0 read (a resumed run)."""
        self._rows = list(rows)

    def append_metrics(self, row: dict[str, Any]) -> None:
        self._rows.append(row)

    def read_metrics(self) -> list[dict[str, Any]]:
        return list(self._rows)

    def truncate_metrics(self, last_epoch: int) -> None:
        self._rows = [r for r in self._rows if r.get("epoch", 0) <= last_epoch]

    def write_json(self, path: Path, obj: Any) -> None:
        pass


def resolve(path: Path | str) -> RunDir:
    """A run directory given by the user (for eval & co.); a path that is not one is a user error."""
    run = RunDir(path)
    if not run.path.exists():
        raise UserError(f"{run.path} does not exist: give a run directory written by `cnncli train`")
    return run
