"""Throughput of the jitted train, eval and fgsm steps on synthetic data, in the PyTorch peer's JSON schema.

The models are the peer's exact architectures (benchmarks/torch_peer.py): LeNet-5 on 1x28x28,
CIFAR ResNet-18 and VGG-16 with batch norm (one linear layer on the 512 features) on 3x32x32, 10
classes; training is one SGD step (lr 0.1, Nesterov momentum 0.9, weight decay 5e-4); fgsm is one
FGSM example per image at eps 0.1 with the model in inference mode.
"""

import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnncli.adversarial.attacks import AttackConfig, fgsm
from cnncli.errors import UserError
from cnncli.inspect.summary import summarize
from cnncli.models import build_model
from cnncli.recipe import apply_override, validate
from cnncli.train import optim as optim_lib
from cnncli.train import toolbox
from cnncli.train.evaluate import init_eval_sums, make_eval_step
from cnncli.train.loop import steps_per_call
from cnncli.train.state import TrainState, build, init_totals
from cnncli.train.steps import StepOptions, data_mesh, forward, make_ema_update, make_train_step, replicate, to_pixels

NUM_CLASSES = 10
BENCH_SECONDS = 10.0  # calibrated duration of the timed loop, as in the peer
CHUNKS = 8  # the synthetic "epoch" holds this many batches; the slice index wraps around it
PEER_MODELS: dict[str, tuple[dict[str, Any], tuple[int, int, int]]] = {
    "lenet5": ({"name": "lenet5"}, (28, 28, 1)),
    "resnet18": ({"name": "resnet18"}, (32, 32, 3)),
    "vgg16": ({"name": "vgg16_bn", "args": {"classifier": "linear"}}, (32, 32, 3)),
}
MODES = ("train", "eval", "fgsm")
FGSM_EPS = 0.1  # the peer's fgsm mode
FORWARD_PASSES = {"train": 3, "eval": 1, "fgsm": 2}  # work per image in forward passes
PEAK_SIZES = (1024, 2048, 4096)  # square float32 matmuls; the fastest is the machine's peak


def benchmark_recipe(model: str, batch: int, precision: str = "float32", overrides: tuple[str, ...] = ()):
    """The recipe of the synthetic benchmark run; `overrides` (KEY=VALUE) set train.ema, train.ema_every or
    train.steps_per_call, which the train mode times too."""
    if model not in PEER_MODELS:
        raise UserError(f"unknown benchmark model '{model}'; choose one of {', '.join(PEER_MODELS)}")
    model_cfg, _ = PEER_MODELS[model]
    raw = {"name": f"bench_{model}", "model": model_cfg,
           "optim": {"name": "nesterov", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
           "train": {"batch_size": batch, "epochs": 1, "precision": precision}}
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate(raw, source="--precision / --set", overrides=list(overrides))


def _time(step, warmup: int, steps: int, budget: float = BENCH_SECONDS) -> tuple[float, int]:
    """Seconds for `steps` calls of step() after `warmup`; steps <= 0 calibrates to `budget` seconds.

    The timed loop dispatches its steps without waiting for them, as a training loop does between
    progress updates, and it runs once untimed first. With steps queued, XLA's CPU runtime holds the
    buffers of several steps at once, and the first time it does, the process's heap grows into fresh
    pages: VGG-16's first queued pass page-faulted 54,000 times per step (0.7 s of system time per
    0.8 s step). A training run pays that once; the throughput it sees afterwards is what we report.
    """
    for _ in range(warmup):
        jax.block_until_ready(step())
    if steps <= 0:
        t = time.perf_counter()
        jax.block_until_ready(step())
        steps = max(3, int(budget / max(time.perf_counter() - t, 1e-4)))
    _queued(step, steps)
    t = time.perf_counter()
    _queued(step, steps)
    return time.perf_counter() - t, steps


def _queued(step, steps: int) -> None:
    """`steps` calls of step(), dispatched one after another, then waited for."""
    out = None
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)


def run(model: str = "lenet5", batch: int = 128, mode: str = "train", steps: int = 0, warmup: int = 3,
        seed: int = 0, precision: str = "auto", overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Measure one model and mode in `precision` (float32, bfloat16 or auto); returns the peer's JSON fields,
    with `dtype` the precision the steps computed in and `precision` the setting asked for. In train mode
    `steps` counts calls of train.steps_per_call steps each (see `benchmark_recipe` for `overrides`)."""

    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    recipe = benchmark_recipe(model, batch, precision, overrides)
    train = recipe.train
    every = train.ema_every if train.ema is not None else 1
    # auto as a run with long epochs resolves it (progress every train.log_every steps)
    per_call = steps_per_call(train.steps_per_call, jax.default_backend(), steps_per_epoch=max(CHUNKS, train.log_every),
                              log_every=train.log_every, ema_every=every) if mode == "train" else 1
    chunks = -(-CHUNKS // per_call) * per_call  # the synthetic epoch: whole calls
    shape = PEER_MODELS[model][1]
    mesh = data_mesh()
    net = build(recipe, shape, NUM_CLASSES)
    rng = np.random.default_rng(seed)
    xs = replicate(jnp.asarray(rng.integers(0, 256, (chunks * batch, *shape), dtype=np.uint8)), mesh)
    ys = replicate(jnp.asarray(rng.integers(0, NUM_CLASSES, (chunks * batch,), dtype=np.int32)), mesh)

    if mode == "train":
        lr = optim_lib.learning_rate(recipe.optim, recipe.schedule, epochs=1, steps_per_epoch=chunks)
        tx = optim_lib.build_optimizer(recipe.optim, lr, net.params)
        options = StepOptions(ema_decay=train.ema, ema_every=every)
        step_fn = make_train_step(net.train_def, tx, num_classes=NUM_CLASSES, batch_size=batch, mesh=mesh,
                                  options=options, steps=per_call)
        ema_fn = make_ema_update(train.ema, every) if per_call == 1 and every > 1 else None
        ema = toolbox.init_ema(net.params, net.rest) if train.ema is not None else None
        carry = {"state": TrainState(net.params, net.rest, tx.init(net.params), jnp.zeros((), jnp.int32), ema),
                 "totals": init_totals(), "steps": 0}
        carry["state"], carry["totals"] = replicate((carry["state"], carry["totals"]), mesh)
        key = jax.random.key(seed)

        def step():
            done = carry["steps"]
            if done % chunks == 0:  # a new synthetic epoch: the batch index (step - epoch_start) wraps to 0
                carry["epoch_start"] = jnp.int32(done)
            carry["state"], carry["totals"] = step_fn(carry["state"], carry["totals"], xs, ys, carry["epoch_start"],
                                                      key)
            if ema_fn is not None and (done + 1) % every == 0:
                carry["state"] = ema_fn(carry["state"])
            carry["steps"] = done + per_call
            return carry["totals"]["loss"]
    elif mode == "fgsm":
        step_fn = _fgsm_step(net.eval_def, batch, mesh)
        carry = {"calls": 0}

        def step():
            x_adv = step_fn(net.params, net.rest, xs, ys, jnp.int32(carry["calls"] % CHUNKS))
            carry["calls"] += 1
            return x_adv
    else:
        step_fn = make_eval_step(net.eval_def, num_classes=NUM_CLASSES, batch_size=batch, mesh=mesh)
        batches = step_fn.put((np.asarray(xs), np.asarray(ys)))  # CHUNKS batches on the devices, masks of ones
        consts, sums = replicate(((net.params, net.rest), init_eval_sums(NUM_CLASSES)), mesh)
        carry = {"sums": sums, "calls": 0}
        indices = [jnp.int32(i) for i in range(CHUNKS)]

        def step():
            i = carry["calls"] % CHUNKS
            carry["sums"], _ = step_fn.step(consts, carry["sums"], batches[i], indices[i])
            carry["calls"] += 1
            return carry["sums"]["top1"]

    seconds, n = _time(step, warmup, steps)
    n *= per_call
    img_per_s = n * batch / seconds
    gflops = img_per_s * FORWARD_PASSES[mode] * forward_flops(recipe, shape) / 1e9
    peak = stored_peak()
    return {"impl": "cnncli", "model": model, "mode": mode, "batch": batch, "img_per_s": round(img_per_s, 2),
            "steps": n, "threads": os.cpu_count(), "device": jax.default_backend(), "dtype": net.precision,
            "precision": precision, "steps_per_call": per_call, "ema": train.ema if mode == "train" else None,
            "ema_every": every,
            "gflops": round(gflops, 1), "peak_gflops": peak, "peak_fraction": round(gflops / peak, 3) if peak else None}


def forward_flops(recipe, shape) -> int:
    """FLOPs of one image's forward pass (2 x multiply-accumulates), from the model's per-layer table."""

    return summarize(build_model(recipe.model, input_shape=shape, num_classes=NUM_CLASSES), shape).total_flops


def peak_file() -> Path:
    """Where `--peak` stores its measurement (next to the compilation cache), one entry per device kind."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).parent / "peak.json"


def _device_key() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}:{os.cpu_count()} threads"


def measure_peak(seconds: float = 2.0) -> float:
    """This machine's float32 matmul rate in GFLOP/s (the best of a few square sizes), stored for later runs."""
    matmul = jax.jit(lambda a: a @ a)
    best = 0.0
    for size in PEAK_SIZES:
        a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
        total, calls = _time(partial(matmul, a), warmup=1, steps=0, budget=seconds)
        best = max(best, calls * 2 * size**3 / total / 1e9)
    store = json.loads(peak_file().read_text()) if peak_file().exists() else {}
    store[_device_key()] = round(best, 1)
    peak_file().parent.mkdir(parents=True, exist_ok=True)
    peak_file().write_text(json.dumps(store, indent=1))
    return round(best, 1)


def stored_peak() -> float | None:
    """The peak `measure_peak` stored for this device, if any."""
    try:
        return json.loads(peak_file().read_text()).get(_device_key())
    except (OSError, ValueError):
        return None


def _fgsm_step(eval_def, batch: int, mesh):
    """The peer's fgsm mode: one FGSM example per image (forward, input gradient, x + eps*sign(g), clip)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P


    cfg = AttackConfig(name="fgsm")

    def step(params, rest, xs, ys, i):
        x = to_pixels(jax.lax.dynamic_slice_in_dim(xs, i * batch, batch))
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))
        y = jax.nn.one_hot(jax.lax.dynamic_slice_in_dim(ys, i * batch, batch), NUM_CLASSES)
        return fgsm(lambda v: forward(eval_def, params, rest, v)[0], x, y, FGSM_EPS, None, cfg)

    return jax.jit(step)


# ----------------------------------------------------------------------------- time to accuracy


def record(name: str, seeds: int = 5, overrides: tuple[str, ...] = (), warmup_runs: int = 0,
           progress=None) -> dict[str, Any]:
    """Train recipe `name` once per seed 0..seeds-1 in this process and report test accuracy and time.

    The airbench protocol: `warmup_runs` untimed runs first (seed 0); each run's time is its training
    steps plus its final test pass (TTA included where the recipe asks for it), with compilation and
    the per-epoch validation left out. The accuracy is the EMA weights' where the recipe keeps an EMA.
    `progress(text)` is told about each run.
    """
    import statistics
    import tempfile

    from cnncli import recipe as recipe_lib
    from cnncli.data.pipeline import load_splits
    from cnncli.run.rundir import RunDir
    from cnncli.train.loop import check_recipe, start_run, train

    base = recipe_lib.load(name, list(overrides))
    check_recipe(base)
    runs = []
    with tempfile.TemporaryDirectory(prefix="cnncli-record-") as tmp:
        for i, seed in enumerate([0] * warmup_runs + list(range(seeds))):
            timed = i >= warmup_runs
            recipe = base.model_copy(update={"seed": seed})
            splits = load_splits(recipe.data, recipe.seed)
            run = RunDir(Path(tmp) / f"run{i}")
            start_run(recipe, splits, run)
            t0 = time.perf_counter()
            summary = train(recipe, splits, run)
            wall = time.perf_counter() - t0
            test = summary.get("test_ema") or summary["test"]
            runs.append({"seed": seed, "timed": timed, "test_top1": test["top1"],
                         "weights": "ema" if "test_ema" in summary else "raw",
                         "seconds": round(summary["train_seconds"] + summary["test_seconds"], 3),
                         "train_seconds": summary["train_seconds"], "test_seconds": summary["test_seconds"],
                         "compile_seconds": summary["compile_seconds"], "wall_seconds": round(wall, 3),
                         "precision": summary["precision"]})
            if progress is not None:
                r = runs[-1]
                progress(f"{'seed ' + str(seed) if timed else 'warm-up run'}: test top-1 {r['test_top1']:.2%} "
                         f"({r['weights']} weights), {r['seconds']:.2f} s (train {r['train_seconds']:.2f} + test "
                         f"{r['test_seconds']:.2f}; compiling {r['compile_seconds']:.1f} s left out)")
    timed = [r for r in runs if r["timed"]]
    accs, secs = [r["test_top1"] for r in timed], [r["seconds"] for r in timed]
    device = jax.devices()[0]
    return {"impl": "cnncli", "recipe": base.name, "seeds": len(timed), "warmup_runs": warmup_runs,
            "device": jax.default_backend(), "device_kind": device.device_kind, "precision": timed[0]["precision"],
            "test_top1_mean": statistics.fmean(accs), "test_top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "test_top1_min": min(accs), "test_top1_max": max(accs), "seconds_mean": statistics.fmean(secs),
            "seconds_max": max(secs), "runs": runs}


def wall_times(name: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Wall time of `cnncli train NAME` as a new process, first with an empty compilation cache (cold), then
    again with the cache that run filled (warm); start-up, data loading and the test pass included."""
    import subprocess
    import sys
    import tempfile

    result = {}
    with tempfile.TemporaryDirectory(prefix="cnncli-wall-") as tmp:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "cache")}
        for which in ("cold", "warm"):
            run_dir = Path(tmp) / which
            command = [sys.executable, "-m", "cnncli", "train", name, "--run-dir", str(run_dir),
                       *(arg for o in overrides for arg in ("--set", o))]
            t0 = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                raise UserError(f"`cnncli train {name}` failed ({done.returncode}): {done.stderr.strip()[-500:]}")
            summary = json.loads((run_dir / "summary.json").read_text())
            result[which] = {"wall_seconds": round(wall, 3), "compile_seconds": summary["compile_seconds"],
                             "compile_cache": summary["compile_cache"]}
    return result
