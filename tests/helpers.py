"""What many tests share that is not a fixture: the CLI runner, a real-process runner, metrics rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# A few hundred steps of LeNet-5 on a slice of real Fashion-MNIST: enough to learn, seconds to run.
SMALL_LENET = ["--set", "data.limit=3000", "--set", "train.epochs=2", "--set", "train.batch_size=64",
               "--set", "train.log_every=10"]


def cli(*args: str):
    """Run `cnncli args...` in-process; returns the click Result (exit_code, stdout, stderr)."""
    from cnncli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def cli_process(*args: str, **kwargs) -> subprocess.Popen:
    """Start `python -m cnncli args...` as a real process (for signals)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "cnncli", *map(str, args)], cwd=kwargs.pop("cwd", REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def metric_rows(run_dir: Path, drop=("seconds", "img_per_s")) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]
