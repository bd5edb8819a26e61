"""What many tests share that is not a fixture: the CLI runner, a real-process runner, metrics rows."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
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


def image_folder(root: Path, *, classes=("cat", "dog", "fox"), per_class: int = 6, size=(40, 52),
                 test_per_class: int = 0, test_name: str = "test", fmt: str = "JPEG", seed: int = 0,
                 vary: bool = False) -> Path:
    """A folder dataset of generated images whose class shows in their colour (so a model can learn it):
    root/<class>/*.jpg, or root/train/<class>/* and root/<test_name>/<class>/* with `test_per_class`.
    `vary` gives each image its own size (up to 1.5x `size`), as photos have."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = {"train": per_class} | ({test_name: test_per_class} if test_per_class else {})
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for split, count in splits.items():
        base = root / split if test_per_class else root
        for c, name in enumerate(classes):
            (base / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = size
                if vary:
                    h, w = int(h * rng.uniform(1.0, 1.5)), int(w * rng.uniform(1.0, 1.5))
                img = rng.integers(0, 60, (h, w, 3)).astype(np.int32)
                img[..., c % 3] += 150  # the class's colour
                img[: h // 2, :, (c + 1) % 3] += 40 * (c // 3)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(base / name / f"{name}_{i:04d}.{ext}",
                                                                           format=fmt)
    return root


# Runs each command of argv[1] (a JSON list of argument lists) through the CLI and prints the outcomes as JSON.
_CLI_SCRIPT = """
import json, sys
from typer.testing import CliRunner
from cnncli.cli import app
out = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args)
    out.append({"exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr})
print(json.dumps(out))
"""


def cli_on_devices(devices: int, *commands) -> list[SimpleNamespace]:
    """Run several `cnncli` commands, one after the other, in one fresh process with `devices` CPU devices
    (XLA takes its device count once per process); returns each one's exit_code, stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    argv = json.dumps([[str(a) for a in command] for command in commands])
    proc = subprocess.run([sys.executable, "-c", _CLI_SCRIPT, argv], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [SimpleNamespace(**r) for r in json.loads(proc.stdout.splitlines()[-1])]
