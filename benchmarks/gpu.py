#!/usr/bin/env python3
"""Every GPU measurement of issue 21 in one run (started by benchmarks/gpu.sh; see its header).

Phases, in this order (each writes its own file under OUT, and summary.md is rewritten after each):
  env       the GPU, the package versions, what train.precision: auto resolves to      -> env.json
  wall      `cnncli train RECORD` as a new process, cold then warm compilation cache      -> wall.json
  record    `cnncli benchmark --recipe RECORD --seeds 5 --warmup-runs 1` (airbench timing) -> record.json
  tables    training img/s against the PyTorch peer, `side_by_side.py` pair by pair        -> tables.jsonl
  steps     train.steps_per_call and EMA on synthetic steps (`cnncli benchmark --set ...`) and on
            the record recipe; LeNet-5 inside `cnncli train` against `cnncli benchmark`    -> steps.jsonl
  autotune  --xla_gpu_autotune_level 0/1/2/4: cold wall time and steady img/s             -> autotune.jsonl
A phase (or an item inside one) that would start after BUDGET seconds is skipped and listed as skipped.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
CNNCLI = [PY, "-m", "cnncli"]
RECORD = "fast_fashion_mnist"
PHASES = ("env", "wall", "record", "tables", "steps", "autotune")
# (model, batch, timed steps for each side): about a second of timed work on an H200 at the rates
TABLE_ROWS = (("lenet5", 128, 2000), ("resnet18", 128, 300), ("vgg16", 128, 300), ("resnet18", 1024, 60),
              ("vgg16", 1024, 60))
PEERS = {"compiled": "--device cuda --channels-last --bf16 --compile",
         "eager bf16": "--device cuda --channels-last --bf16", "eager fp32": "--device cuda"}
AUTOTUNE_LEVELS = (0, 1, 2, 4)  # 4 is XLA's default
STEPS_PER_CALL = (1, 5, 10, 25, 50)
RECORD_EPOCHS = (8, 10)


class Run:
    def __init__(self, out: Path, budget: float, rounds: int):
        self.out, self.budget, self.rounds, self.t0 = out, budget, rounds, time.monotonic()
        self.skipped: list[str] = []
        self.log = (out / "log.txt").open("a")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def fits(self, what: str, seconds: float) -> bool:
        if self.left() >= seconds:
            return True
        self.skipped.append(f"{what} (needs about {seconds:.0f} s, {max(self.left(), 0):.0f} s left)")
        self.say(f"skipped: {self.skipped[-1]}")
        return False

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def sh(self, command: list[str] | str, env: dict | None = None, timeout: float | None = None) -> dict:
        """Run a command; its last JSON line (or None), wall seconds, exit code and the tail of its output."""
        args = shlex.split(command) if isinstance(command, str) else command
        self.say("$ " + " ".join(args))
        t = time.monotonic()
        try:
            done = subprocess.run(args, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                                  timeout=timeout if timeout is not None else max(self.left(), 30))
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            code, stdout, stderr = "timeout", out.decode() if isinstance(out, bytes) else out, ""
        wall = time.monotonic() - t
        lines = [line for line in stdout.strip().splitlines() if line.strip().startswith("{")]
        self.log.write(stdout[-3000:] + stderr[-3000:] + "\n")
        result = {"command": " ".join(args), "exit": code, "wall_seconds": round(wall, 2),
                  "json": json.loads(lines[-1]) if lines and code == 0 else None}
        if code != 0:
            result["error"] = (stderr or stdout)[-1500:]
            self.say(f"  failed ({code}): {(stderr or stdout).strip()[-300:]}")
        return result

    def write(self, name: str, data) -> None:
        path = self.out / name
        if name.endswith(".jsonl"):
            with path.open("a") as f:
                f.write(json.dumps(data) + "\n")
        else:
            path.write_text(json.dumps(data, indent=1))


def phase_env(r: Run) -> None:
    code = ("import json, jax, cnncli; from importlib.metadata import version as v; "
            "from cnncli.train.toolbox import resolve_precision as p; d = jax.devices()[0]; "
            "print(json.dumps({'devices': [str(x) for x in jax.devices()], 'kind': d.device_kind, "
            "'platform': d.platform, 'compute_capability': getattr(d, 'compute_capability', None), "
            "'auto_precision': p('auto'), 'versions': {n: v(n) for n in ('jax', 'jaxlib', 'flax', 'optax', "
            "'orbax-checkpoint', 'numpy', 'torch')}}))")
    env = r.sh([PY, "-c", code])
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        smi = "no nvidia-smi"
    r.write("env.json", {**(env["json"] or {"error": env.get("error")}), "nvidia_smi": smi, "cpus": os.cpu_count()})


def phase_wall(r: Run) -> None:
    if not r.fits("wall: cold and warm `cnncli train`", 150):
        return
    code = ("import json, sys; from cnncli.tools.benchmark import wall_times; "
            f"print(json.dumps(wall_times({RECORD!r})))")
    r.write("wall.json", r.sh([PY, "-c", code]))


def phase_record(r: Run) -> None:
    if not r.fits("record: 5 seeds", 120):
        return
    r.write("record.json", r.sh(CNNCLI + ["benchmark", "--recipe", RECORD, "--seeds", "5", "--warmup-runs", "1",
                                          "--json"]))
    for epochs in RECORD_EPOCHS:  # longer one-cycles, to choose the recipe that reaches 94% in 3 s
        if r.fits(f"record: 5 seeds of {epochs} epochs", 150):
            command = CNNCLI + ["benchmark", "--recipe", RECORD, "--seeds", "5", "--json", "--set",
                                f"train.epochs={epochs}"]
            r.write("record_epochs.jsonl", {"epochs": epochs, **r.sh(command)})


def phase_tables(r: Run) -> None:
    for model, batch, steps in TABLE_ROWS:
        ours = f"{shlex.join(CNNCLI)} benchmark --model {model} --batch-size {batch} --steps {steps} --warmup 5 --json"
        peer = f"{PY} benchmarks/torch_peer.py --model {model} --batch-size {batch} --steps {steps}"
        for name, flags in PEERS.items():
            if name == "eager fp32":  # the table: one run each, no ratio target
                if not r.fits(f"tables: {model} b{batch} fp32", 40):
                    continue
                for side, cmd in (("cnncli float32", f"{ours} --precision float32"),
                                  ("torch eager fp32", f"{peer} {flags}")):
                    r.write("tables.jsonl", {"model": model, "batch": batch, "side": side, **r.sh(cmd)})
                continue
            if not r.fits(f"tables: {model} b{batch} against {name}", 40 * r.rounds + 60 * (name == "compiled")):
                continue
            result = r.sh([PY, "benchmarks/side_by_side.py", "--rounds", str(r.rounds),
                           "--a", f"{ours} --precision auto", "--b", f"{peer} {flags}"])
            r.write("tables.jsonl", {"model": model, "batch": batch, "peer": name, **result})


def phase_steps(r: Run) -> None:
    for model in ("lenet5", "resnet18"):  # synthetic steps: dispatch cost, then EMA cost
        for sets in (["train.steps_per_call=1"], ["train.steps_per_call=10"], ["train.steps_per_call=50"],
                     ["train.steps_per_call=1", "train.ema=0.99", "train.ema_every=1"],
                     ["train.steps_per_call=1", "train.ema=0.99", "train.ema_every=5"],
                     ["train.steps_per_call=50", "train.ema=0.99", "train.ema_every=5"]):
            if not r.fits(f"steps: {model} {' '.join(sets)}", 20):
                continue
            command = CNNCLI + ["benchmark", "--model", model, "--json", "--steps", "200", "--warmup", "5"]
            r.write("steps.jsonl", {"model": model, "sets": sets,
                                    **r.sh(command + [arg for s in sets for arg in ("--set", s)])})
    for k in STEPS_PER_CALL:
        for every in (1, 5):
            if k % every or not r.fits(f"steps: steps_per_call={k} ema_every={every}", 40):
                continue
            result = r.sh(CNNCLI + ["benchmark", "--recipe", RECORD, "--seeds", "1", "--warmup-runs", "1", "--json",
                                    "--set", f"train.steps_per_call={k}", "--set", f"train.ema_every={every}"])
            r.write("steps.jsonl", {"recipe": RECORD, "steps_per_call": k, "ema_every": every, **result})
    for k in ("1", "auto"):
        if not r.fits(f"steps: lenet5 inside cnncli train, steps_per_call={k}", 60):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            result = r.sh(CNNCLI + ["train", "lenet5_fashion_mnist", "--run-dir", tmp, "--set", "train.epochs=3",
                                    "--set", f"train.steps_per_call={k}"])
            rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()] \
                if (Path(tmp) / "metrics.jsonl").is_file() else []
        r.write("steps.jsonl", {"recipe": "lenet5_fashion_mnist", "steps_per_call": k,
                                "img_per_s": [row["img_per_s"] for row in rows], **result})
    if r.fits("steps: lenet5 cnncli benchmark", 30):
        r.write("steps.jsonl", {"recipe": "lenet5 benchmark", **r.sh(CNNCLI + ["benchmark", "--model", "lenet5",
                                                                              "--steps", "2000", "--json"])})


def phase_autotune(r: Run) -> None:
    for level in AUTOTUNE_LEVELS:
        if not r.fits(f"autotune level {level}", 120):
            continue
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_autotune_level={level}".strip()
        code = ("import json, sys; from cnncli.tools.benchmark import wall_times; "
                f"print(json.dumps(wall_times({RECORD!r})))")
        wall = r.sh([PY, "-c", code], env={"XLA_FLAGS": flags})
        with tempfile.TemporaryDirectory() as cache:
            steady = r.sh(CNNCLI + ["benchmark", "--model", "resnet18", "--batch-size", "1024", "--steps", "100",
                                    "--json"], env={"XLA_FLAGS": flags, "JAX_COMPILATION_CACHE_DIR": cache})
        r.write("autotune.jsonl", {"level": level, "record_wall": wall, "resnet18_b1024": steady})


def summary(r: Run) -> None:
    """summary.md: the tables of the issue from whatever files exist so far."""
    def load(name):
        path = r.out / name
        if not path.is_file():
            return None
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return json.loads(path.read_text())

    md = ["# GPU measurements (benchmarks/gpu.sh)", ""]
    env = load("env.json")
    if env:
        md += [f"{env.get('nvidia_smi', '')}; JAX devices {env.get('devices')}, auto precision "
               f"{env.get('auto_precision')}; versions {env.get('versions')}", ""]
    record = load("record.json")
    if record and record.get("json"):
        j = record["json"]
        md += ["## Time to accuracy", "",
               "| recipe | seeds | test top-1 mean (std, min-max) | seconds per run (max) |", "|---|---|---|---|",
               f"| {j['recipe']} ({j['precision']}) | {j['seeds']} | {j['test_top1_mean']:.2%} "
               f"({j['test_top1_std']:.2%}, {j['test_top1_min']:.2%}-{j['test_top1_max']:.2%}) | "
               f"{j['seconds_mean']:.2f} ({j['seconds_max']:.2f}) |", ""]
    wall = load("wall.json")
    if wall and wall.get("json"):
        md += [f"`cnncli train {RECORD}` wall time: cold cache {wall['json']['cold']['wall_seconds']:.1f} s, warm "
               f"{wall['json']['warm']['wall_seconds']:.1f} s", ""]
    tables = load("tables.jsonl")
    if tables:
        md += ["## Training img/s against the PyTorch peer", "",
               "| model, batch | against | ratio (median) | cnncli img/s | peer img/s |", "|---|---|---|---|---|"]
        for row in tables:
            j = row.get("json")
            if "peer" in row and j:
                md.append(f"| {row['model']} b{row['batch']} | {row['peer']} | {j['ratio_median']}x | {j['a']} | "
                          f"{j['b']} |")
            elif j:
                md.append(f"| {row['model']} b{row['batch']} | {row['side']} (one run) | | "
                          f"{j['img_per_s']} | |")
        md.append("")
    for name, title in (("record_epochs.jsonl", "Record recipe, longer schedules"),
                        ("steps.jsonl", "Steps per call, EMA every k"), ("autotune.jsonl", "XLA GPU autotune level")):
        rows = load(name)
        if rows:
            md += [f"## {title}", "", "```"] + [json.dumps({k: v for k, v in row.items() if k != "error"})[:600]
                                                for row in rows] + ["```", ""]
    if r.skipped:
        md += ["## Skipped (time budget)", ""] + [f"- {s}" for s in r.skipped] + [""]
    (r.out / "summary.md").write_text("\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phases", nargs="*", metavar="PHASE", help=f"some of {', '.join(PHASES)} [default: all]")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "gpu-results"))
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET", 540)))
    p.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", 2)))
    a = p.parse_args()
    unknown = set(a.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phase {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    a.out.mkdir(parents=True, exist_ok=True)
    r = Run(a.out, a.budget, a.rounds)
    for phase in [ph for ph in PHASES if ph in (a.phases or PHASES)]:
        r.say(f"phase {phase} ({r.left():.0f} s left)")
        try:
            globals()[f"phase_{phase}"](r)
        except Exception as e:  # one broken phase must not lose the others' results
            r.say(f"phase {phase} failed: {e!r}")
        summary(r)
    print((a.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
