"""Robustness of a trained model: attack a split at several epsilons and measure what survives.

The jitted attack step slices a batch from device-resident uint8 arrays (like the eval step),
attacks it with the model in inference mode (batch norm uses its running statistics: the model is
attacked as deployed) and returns small per-example arrays; the host reduces them into one row per
epsilon. The last partial batch is padded and its padding dropped, so every example counts once.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnncli.adversarial import sanity
from cnncli.adversarial.attacks import ATTACKS, AttackConfig, check_config, check_eps, is_affine, run_attack
from cnncli.errors import UserError
from cnncli.models.layers.classifier import logits_and_aux
from cnncli.train.batched import Batched
from cnncli.train.evaluate import eval_batch
from cnncli.train.steps import forward, to_pixels

AFFINE_CHECK_SEED = 0
CHECK_BATCH = 250  # images the sanity checks look at (AutoAttack's default batch)


def logits_function(graphdef, params, rest) -> Callable:
    """pixels -> float32 logits of the model as deployed; with a key, its random streams (dropout left on, a
    noise layer) are reseeded from it, so that EOT samples differ. A deterministic model ignores the key."""

    def logits_fn(v, key=None):
        if key is None:
            return forward(graphdef, params, rest, v)[0]
        model = nnx.merge(graphdef, params, rest, copy=True)
        streams = sorted({s.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
        if streams:
            nnx.reseed(model, **{name: jax.random.fold_in(key, i) for i, name in enumerate(streams)})
        return logits_and_aux(model, v)[0].astype(jnp.float32)

    return logits_fn


def model_warnings(model, x: np.ndarray, y: np.ndarray) -> tuple[list[str], dict[str, Any]]:
    """AutoAttack's checks on the model (sanity.py) over the first CHECK_BATCH images: (warnings, measurements)."""
    xb = jnp.asarray(x[:CHECK_BATCH], jnp.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    yb = jnp.asarray(y[:CHECK_BATCH], jnp.int32)
    logits_fn = jax.jit(logits_function(model.eval_def, model.params, model.rest))
    stateful = jax.jit(lambda rest, v: forward(model.eval_def, model.params, rest, v))
    zero, zero_warning = sanity.zero_gradients(logits_fn, xb, yb)
    found = [sanity.probability_outputs(np.asarray(logits_fn(xb))), zero_warning,
             sanity.randomized(stateful, model.rest, xb, yb)]
    return [w for w in found if w], {"checked": int(xb.shape[0]), "zero_gradients": zero}


def make_attack_step(eval_def, cfg: AttackConfig, *, num_classes: int, batch_size: int, mesh,
                     use_predictions: bool = False) -> Batched:
    """The attack over a split as a `Batched`: consts (params, rest, eps, key), arrays (uint8 images, labels).

    Each batch returns per-example results; the carry, when given one (an array shaped like a batch
    of float images), ends as the first batch's adversarial images.

    Args:
        eval_def: the model's graphdef in eval mode.
        cfg: the attack.
        num_classes: the class count.
        batch_size: examples per step (a multiple of the device count).
        mesh: the device mesh; the batch is sharded along `data`.
        use_predictions: attack the model's clean predictions instead of the labels (no label leaking).
    """

    def fn(consts, first, batch, index):
        params, rest, eps, key = consts
        images, labels, _ = batch
        x = to_pixels(images)

        logits_fn = logits_function(eval_def, params, rest)
        clean_pred = jnp.argmax(logits_fn(x), -1)
        source = clean_pred if use_predictions else labels
        x_adv, clean_logits, targets = run_attack(logits_fn, x, source, eps, jax.random.fold_in(key, index), cfg,
                                                  num_classes)
        clean_prob, adv_prob = jax.nn.softmax(clean_logits), jax.nn.softmax(logits_fn(x_adv))
        delta = (x_adv - x).reshape(batch_size, -1)
        out = {"label": labels, "clean_pred": jnp.argmax(clean_prob, -1), "clean_conf": jnp.max(clean_prob, -1),
               "adv_pred": jnp.argmax(adv_prob, -1), "adv_conf": jnp.max(adv_prob, -1),
               "linf": jnp.max(jnp.abs(delta), -1), "l2": jnp.sqrt(jnp.sum(delta * delta, -1))}
        if cfg.targeted:
            pick = targets[:, None]
            out.update(target=targets, clean_target_prob=jnp.take_along_axis(clean_prob, pick, -1)[:, 0],
                       target_prob=jnp.take_along_axis(adv_prob, pick, -1)[:, 0])
        if first is not None:
            first = jnp.where(index == 0, x_adv, first)
        return first, out

    return Batched(fn, batch_size=batch_size, mesh=mesh)


@dataclass
class Examples:
    """The first batch's clean and adversarial images at one epsilon, for the figure."""

    eps: float
    x: np.ndarray  # float pixels (N, H, W, C)
    x_adv: np.ndarray
    results: dict[str, np.ndarray]  # per-example arrays as returned by the step


def attack_split(step: Batched, params, rest, x: np.ndarray, y: np.ndarray, eps: float, key, *,
                 progress: Callable[[int, int], None] | None = None, keep_first: bool = False):
    """Attack every example of (x, y) at `eps`; returns (per-example numpy arrays, first batch x_adv or None)."""
    first = jnp.zeros((step.batch_size, *x.shape[1:]), jnp.float32) if keep_first else None
    first, results = step((params, rest, jnp.float32(eps), key), (x, y.astype(np.int32)), first, progress)
    return results, (None if first is None else np.asarray(first)[:len(x)])


def attack_row(results: dict[str, np.ndarray], eps: float, targeted: bool) -> dict[str, Any]:
    """One table row from per-example results (fractions, not percentages).

    success_rate: untargeted, the fraction of correctly classified examples the attack flips; targeted,
    the fraction of examples whose label is not the target that end up predicted as the target.
    mean_conf_wrong: the model's mean top probability on its wrong adversarial predictions.
    """
    label, clean_pred, adv_pred = results["label"], results["clean_pred"], results["adv_pred"]
    wrong = adv_pred != label
    if targeted:
        attacked = results["target"] != label
        hits = adv_pred == results["target"]
    else:
        attacked = clean_pred == label
        hits = wrong
    row = {"eps": eps, "n": int(len(label)), "clean_accuracy": float(np.mean(clean_pred == label)),
           "accuracy": float(np.mean(~wrong)), "error_rate": float(np.mean(wrong)),
           "success_rate": _mean_or_none(hits[attacked]), "attacked": int(attacked.sum()),
           "mean_conf_wrong": _mean_or_none(results["adv_conf"][wrong]),
           "mean_linf": float(results["linf"].mean()), "max_linf": float(results["linf"].max()),
           "mean_l2": float(results["l2"].mean()), "max_l2": float(results["l2"].max())}
    if targeted:
        row.update(clean_target_prob=float(results["clean_target_prob"].mean()),
                   target_prob=float(results["target_prob"].mean()))
    return row


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def check_attackable(eval_def, params, rest, cfg: AttackConfig, image_shape) -> None:
    """Refuse an attack the model cannot take (linear-fool needs the network to be one affine map)."""
    if not ATTACKS.get(cfg.name).needs_affine:
        return

    def logits_fn(v):
        return forward(eval_def, params, rest, v)[0]

    if not is_affine(logits_fn, (2, *image_shape), jax.random.key(AFFINE_CHECK_SEED)):
        raise UserError(f"{cfg.name} needs a linear model (one affine map: softmax regression, model `linear`); "
                        "this model is not linear: use fgsm or pgd")


def robustness(model, x: np.ndarray, y: np.ndarray, class_names: list[str], cfg: AttackConfig, eps_values, *,
               batch_size: int, mesh, use_predictions: bool = False, seed: int = 0, examples: int = 0,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Attack (x, y) at every epsilon; returns {'attack': ..., 'rows': [...], 'examples': Examples or None}.

    Args:
        model: a train.loop.Model (eval_def, params, rest).
        x: uint8 images (N, H, W, C).
        y: integer labels.
        class_names: the model's classes.
        cfg: the attack.
        eps_values: epsilons (Linf: in [0, 1]).
        batch_size: requested batch (rounded to the split and the device count).
        mesh: the device mesh.
        use_predictions: attack the clean predictions instead of the labels.
        seed: randomness of pgd starts and random targets.
        examples: how many examples to keep for the figure (0: none).
        progress: callable(done, total) over batches.

    The result also holds `warnings`, AutoAttack's sanity flags on the model (sanity.py), and `checks`.
    """
    eps_values = check_eps(eps_values, cfg.norm)
    check_config(cfg, class_names)
    check_attackable(model.eval_def, model.params, model.rest, cfg, x.shape[1:])
    warnings, checks = model_warnings(model, x, y)
    batch = eval_batch(len(x), batch_size, mesh)
    step = make_attack_step(model.eval_def, cfg, num_classes=len(class_names), batch_size=batch, mesh=mesh,
                            use_predictions=use_predictions)
    total, done = len(eps_values) * (-(-len(x) // batch)), 0

    def tick(*_):  # counts batches over every epsilon
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    rows, candidates = [], []
    for j, eps in enumerate(eps_values):
        key = jax.random.fold_in(jax.random.key(seed), j)
        results, first = attack_split(step, model.params, model.rest, x, y, eps, key, progress=tick,
                                      keep_first=examples > 0)
        rows.append(attack_row(results, eps, cfg.targeted))
        if examples > 0:
            candidates.append(Examples(eps, x[:len(first)].astype(np.float32) / 255.0, first,
                                       {k: v[:len(first)] for k, v in results.items()}))
    return {"attack": _describe(cfg, use_predictions), "rows": rows, "warnings": warnings, "checks": checks,
            "examples": pick_examples(candidates, examples, cfg.targeted) if examples > 0 else None}


def _describe(cfg: AttackConfig, use_predictions: bool) -> dict[str, Any]:
    return {**describe(cfg), "target": cfg.target, "labels": "predictions" if use_predictions else "data"}


def describe(cfg: AttackConfig) -> dict[str, Any]:
    """The settings that define an attack's result, for reports."""
    attack = ATTACKS.get(cfg.name)
    out: dict[str, Any] = {"name": cfg.name, "norm": cfg.norm}
    if attack.iterative:
        out["steps"] = cfg.steps
        if not attack.auto_step:
            default = "eps/steps" if cfg.name == "mi-fgsm" else "2.5*eps/steps"
            out["step_size"] = cfg.step_size if cfg.step_size is not None else default
    if attack.random_start:
        out.update(restarts=cfg.restarts, random_start=True)
    if attack.sweeps_targets and not cfg.targeted:
        out["n_targets"] = cfg.targets
    extra = {"square": {"queries": cfg.queries}, "mi-fgsm": {"decay": cfg.decay},
             "cw-l2": {"c": cfg.c, "kappa": cfg.kappa}}.get(cfg.name, {})
    if cfg.name.startswith("apgd") and cfg.eot > 1:
        extra = {"eot": cfg.eot}
    return {**out, **extra}


def fooled(results: dict[str, np.ndarray], targeted: bool) -> np.ndarray:
    """Per example: correct on the clean image and successfully attacked."""
    correct = results["clean_pred"] == results["label"]
    success = (results["adv_pred"] == results["target"]) if targeted else (results["adv_pred"] != results["label"])
    return correct & success


def pick_examples(candidates: list[Examples], n: int, targeted: bool) -> Examples:
    """The lectures' picture: the smallest epsilon that fools the model on n correctly classified images.

    Falls back to the largest epsilon when none fools n of the first batch; the chosen examples are
    the fooled ones first, then the remaining correctly classified, then the rest.
    """
    chosen = next((c for c in candidates if c.eps > 0 and fooled(c.results, targeted).sum() >= n), candidates[-1])
    hit = fooled(chosen.results, targeted)
    correct = chosen.results["clean_pred"] == chosen.results["label"]
    order = np.lexsort((np.arange(len(hit)), ~correct, ~hit))[:n]
    return Examples(chosen.eps, chosen.x[order], chosen.x_adv[order], {k: v[order] for k, v in chosen.results.items()})


def make_robust_accuracy(eval_def, cfg: AttackConfig, *, num_classes: int, batch_size: int, mesh) -> Callable:
    """For validation during adversarial training: fn(params, rest, x, y, eps, key) -> robust accuracy."""
    step = make_attack_step(eval_def, cfg, num_classes=num_classes, batch_size=batch_size, mesh=mesh)

    def robust_accuracy(params, rest, x, y, eps, key) -> float:
        results, _ = attack_split(step, params, rest, x, y, eps, key)
        return float(np.mean(results["adv_pred"] == results["label"]))

    return robust_accuracy


def make_perturb(train_def, cfg: AttackConfig, eps: float) -> Callable:
    """The train step's hook: perturb(params, rest, x, labels, key) -> x_adv for adversarial training.

    The attack runs through the training-mode model (batch statistics, the step's dropout masks) and
    drops its state updates, so it attacks exactly the function the step then trains; `labels` are the
    step's (N, C) label distributions.
    """
    attack = ATTACKS.get(cfg.name)

    def perturb(params, rest, x, labels, key):
        def logits_fn(v):
            return forward(train_def, params, rest, v)[0]

        return attack.fn(logits_fn, x, labels, eps, key, cfg)

    return perturb
