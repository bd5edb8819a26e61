"""AutoAttack (Croce & Hein 2020): the standard robustness evaluation of RobustBench, in JAX.

The evaluation runs a sequence of attacks; each attack sees only the points every earlier one failed
on, and a point counts as robust only if it is classified correctly and survives them all:

    standard  apgd-ce (100 steps), apgd-t (9 target classes x 100 steps), fab-t (9 x 100), square (5000 queries)
    plus      apgd-ce and apgd-dlr (5 restarts each), fab (5 restarts), square, apgd-t, fab-t
    rand      apgd-ce and apgd-dlr with expectation over 20 transformations, for random models
    custom    any registered attacks, in the order given

The settings are those of fra31/auto-attack's `set_version` (torchattacks' AutoAttack, by contrast,
keeps its attacks' default of 10 steps). Each run of each attack (one restart, one target class) is
one jitted program over a batch of the still-robust points, padded to one of a few sizes so that only a
few shapes compile; fooled points leave the pool before the next run, as in the reference.
"""

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cnncli.adversarial import sanity
from cnncli.adversarial.attacks import ATTACKS, AttackConfig, check_config, check_eps
from cnncli.adversarial.robustness import describe, logits_function, model_warnings
from cnncli.errors import UserError
from cnncli.train.batched import Batched
from cnncli.train.steps import forward, replicate

VERSIONS = ("standard", "plus", "rand", "custom")
STEPS = 100
TARGETS = 9
QUERIES = 5000
PLUS_RESTARTS = 5
EOT_SAMPLES = 20
MIN_BUCKET = 16  # the smallest padded batch: below it, padding costs less than another compilation
BUCKET_STEP = 64  # larger chunks pad to a multiple of this: powers of two wasted up to half of every attack's work


def version_attacks(version: str, norm: str = "linf", attacks: list[str] | None = None) -> list[AttackConfig]:
    """The attacks of a version, configured as in the reference (fra31/auto-attack `set_version`)."""
    if version not in VERSIONS:
        raise UserError(f"unknown AutoAttack version '{version}'; use {', '.join(VERSIONS)}")
    if attacks and version != "custom":
        raise UserError(f"--attacks sets the attacks of --version custom; the {version} version has its own")
    base = {"norm": norm, "steps": STEPS, "targets": TARGETS, "queries": QUERIES}
    if version == "standard":
        names, extra = ("apgd-ce", "apgd-t", "fab-t", "square"), {}
    elif version == "plus":
        names = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
        extra = {"apgd-ce": {"restarts": PLUS_RESTARTS}, "apgd-dlr": {"restarts": PLUS_RESTARTS},
                 "fab": {"restarts": PLUS_RESTARTS}}
    elif version == "rand":
        names, extra = ("apgd-ce", "apgd-dlr"), {n: {"eot": EOT_SAMPLES} for n in ("apgd-ce", "apgd-dlr")}
    else:
        if not attacks:
            raise UserError("--version custom needs --attacks, e.g. --attacks apgd-ce,apgd-t")
        names, extra = tuple(attacks), {}
        base = {"norm": norm, "targets": TARGETS, "queries": QUERIES}
    configs = []
    for name in names:
        spec = ATTACKS.get(name)
        settings = {**base, **extra.get(name, {})}
        settings.setdefault("steps", spec.default_steps)
        configs.append(AttackConfig(name=name, **settings))
    return configs


def _bucket(n: int, batch: int, devices: int) -> int:
    """The padded size of a chunk of n points: the next power of two from MIN_BUCKET up to BUCKET_STEP, then the
    next multiple of BUCKET_STEP, at most `batch`."""
    size = MIN_BUCKET
    while size < min(n, BUCKET_STEP):
        size *= 2
    if n > BUCKET_STEP:
        size = -(-n // BUCKET_STEP) * BUCKET_STEP
    size = min(size, batch)
    return -(-size // devices) * devices


def make_run_step(eval_def, cfg: AttackConfig, num_classes: int, mesh) -> Callable:
    """A jitted step(params, rest, x, labels, eps, key, index) -> (x_adv, adversarial predictions) for one run."""
    attack = ATTACKS.get(cfg.name)
    batch_sharding = NamedSharding(mesh, P("data"))

    def step(params, rest, x, labels, eps, key, index):
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
        logits_fn = logits_function(eval_def, params, rest)
        x_adv = attack.apply(logits_fn, x, labels, None, eps, key, cfg, index, num_classes)
        return x_adv, jnp.argmax(logits_fn(x_adv), -1)

    return jax.jit(step)


def _predict(eval_def, params, rest, x: np.ndarray, batch: int, mesh) -> np.ndarray:
    """Clean predictions of float pixels x, in batches of `batch`."""

    def fn(consts, carry, arrays, index):
        images, _ = arrays
        return carry, jnp.argmax(forward(eval_def, *consts, images)[0], -1)

    return Batched(fn, batch_size=batch, mesh=mesh)((params, rest), [x])[1]


def _norms(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = delta.reshape(len(delta), -1)
    return np.abs(flat).max(1), np.sqrt((flat.astype(np.float64) ** 2).sum(1))


def autoattack(model, x: np.ndarray, y: np.ndarray, class_names: list[str], eps_values, *, version: str = "standard",
               norm: str = "linf", attacks: list[str] | None = None, configs: list[AttackConfig] | None = None,
               batch_size: int = 500, mesh, seed: int = 0, keep_examples: bool = True,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the AutoAttack evaluation of (x, y) at every epsilon.

    Args:
        model: a train.state.Model (eval_def, params, rest).
        x: uint8 images (N, H, W, C) or float pixels in [0, 1].
        y: integer labels.
        class_names: the model's classes.
        eps_values: radii (Linf: in [0, 1]).
        version: standard, plus, rand or custom.
        norm: linf or l2.
        attacks: the attack names of the custom version.
        configs: explicit attack settings instead of a version's (tests, benchmarks).
        batch_size: the largest batch of points one run attacks at once.
        mesh: the device mesh; batches are sharded along `data`.
        seed: randomness of every run.
        keep_examples: return the adversarial images (float32) per epsilon.
        progress: callable(done, total) over (epsilon, attack, run) steps.

    Returns:
        {'attack': {...}, 'rows': one per eps with the clean accuracy, the cumulative robust accuracy after each
        attack ('stages', with seconds and points fooled), perturbation norms and pixel range;
        'warnings': the sanity flags; 'x_adv': per eps the adversarial images (with keep_examples)}.
    """
    eps_values = check_eps(eps_values, norm)
    configs = configs or version_attacks(version, norm, attacks)
    for cfg in configs:
        if cfg.targeted:
            raise UserError("AutoAttack measures untargeted robust accuracy: drop --targeted")
        check_config(cfg, class_names)
    num_classes = len(class_names)
    devices = mesh.devices.size
    batch = -(-max(batch_size, devices) // devices) * devices
    pixels = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    params, rest = replicate((model.params, model.rest), mesh)
    warnings, checks = model_warnings(model, pixels, y)
    clean = _predict(model.eval_def, params, rest, pixels, batch, mesh) == y
    # a second pass batched differently (odd size, another padding) must agree: randomness or batch statistics
    second = _predict(model.eval_def, params, rest, pixels, max(devices, batch // 2 + devices), mesh) == y
    warnings.append(sanity.inconsistent_accuracy(clean, second))
    steps = [make_run_step(model.eval_def, cfg, num_classes, mesh) for cfg in configs]
    runs = [ATTACKS.get(cfg.name).num_runs(cfg, num_classes) for cfg in configs]
    total, done = len(eps_values) * sum(runs), 0
    sharding = NamedSharding(mesh, P("data"))
    rows, examples = [], []
    for e, eps in enumerate(eps_values):
        robust, x_adv = clean.copy(), pixels.copy()
        stages = [{"attack": "clean", "robust_accuracy": float(robust.mean()), "fooled": 0, "seconds": 0.0}]
        for a, (cfg, step) in enumerate(zip(configs, steps)):
            start, before = time.perf_counter(), int(robust.sum())
            for r in range(runs[a]):
                pool = np.flatnonzero(robust)
                for c, first in enumerate(range(0, len(pool), batch) if eps > 0 else ()):
                    index = pool[first:first + batch]
                    size = _bucket(len(index), batch, devices)
                    padded = np.concatenate([index, np.repeat(index[:1], size - len(index))])
                    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
                        jax.random.fold_in(jax.random.key(seed), e), a), r), c)
                    adv, pred = step(params, rest, jax.device_put(pixels[padded], sharding),
                                     jax.device_put(y[padded], sharding), jnp.float32(eps), key, jnp.int32(r))
                    adv, pred = np.asarray(adv)[:len(index)], np.asarray(pred)[:len(index)]
                    fooled = pred != y[index]
                    robust[index[fooled]] = False
                    x_adv[index[fooled]] = adv[fooled]
                done += 1
                if progress is not None:
                    progress(done, total)
            stages.append({"attack": cfg.name, "robust_accuracy": float(robust.mean()),
                           "fooled": before - int(robust.sum()), "seconds": time.perf_counter() - start})
        linf, l2 = _norms(x_adv - pixels)
        warnings.append(sanity.square_beats_white_box(stages))
        rows.append({"eps": eps, "n": len(y), "clean_accuracy": float(clean.mean()),
                     "robust_accuracy": float(robust.mean()), "stages": stages,
                     "seconds": sum(s["seconds"] for s in stages), "max_linf": float(linf.max()),
                     "max_l2": float(l2.max()), "min_pixel": float(x_adv.min()), "max_pixel": float(x_adv.max())})
        if keep_examples:
            examples.append({"eps": eps, "x_adv": x_adv, "robust": robust})
    return {"attack": {"name": "autoattack", "version": version,
                       "norm": norm, "attacks": [describe(cfg) for cfg in configs]},
            "rows": rows, "warnings": list(dict.fromkeys(w for w in warnings if w)), "checks": checks,
            "examples": examples if keep_examples else None}


def with_overrides(configs: list[AttackConfig], **changes) -> list[AttackConfig]:
    """The configs with some settings replaced (those given as not None)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return [replace(cfg, **changes) for cfg in configs]
