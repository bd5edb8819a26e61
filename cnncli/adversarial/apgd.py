"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"): APGD-CE, APGD-DLR and the targeted APGD-T of the AutoAttack evaluation.

One run (a `Run`: start, 100 steps, finish) attacks a batch, following the reference code (fra31/auto-attack,
autopgd_base.py; torchattacks 3.5 APGD/APGDT) step for step:

- start: x + eps * t / max|t| with t uniform in [-1, 1] (Linf) or Gaussian, scaled to L2 norm eps;
- step size 2 * eps per example; momentum 0.75 from the second step on
  (x <- P(x + 0.75 (z - x) + 0.25 (x - x_prev)), z the projected steepest-ascent step);
- checkpoints after 22%, then windows shrinking by 3% of the iterations down to 6%: the step of an
  example is halved, and it restarts from its best point, when its loss rose in at most 75% of the
  window's steps, or when neither the step was halved nor the best loss improved since the last one;
- DLR loss -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), and its targeted form
  -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) for APGD-T, whose runs target the classes ranked
  2nd .. (targets + 1)th by the clean logits.

A run returns, per example, its last misclassified iterate, or (never fooled) its highest-loss iterate. Unlike
the reference, a run on a deterministic model (no EOT) stops once every example of its batch is fooled: the
robust accuracy cannot change after that, and on a model without defences it saves most of the steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnncli.adversarial.attacks import (
    ATTACKS,
    TINY,
    Attack,
    AttackConfig,
    Run,
    clip_pixels,
    l2_norm,
    linf_norm,
    project,
    ranked_class,
)

MOMENTUM = 0.75  # the paper's alpha
RHO = 0.75  # a window "oscillates" when the loss rose in at most this fraction of its steps
FIRST_CHECKPOINT, WINDOW_DECREASE, MIN_WINDOW = 0.22, 0.03, 0.06  # fractions of the iterations
INITIAL_STEP = 2.0  # times eps
DLR_EPS = 1e-12


# ----------------------------------------------------------------------------- losses (per example)


def cross_entropy(logits, labels, targets):
    del targets
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy_targeted(logits, labels, targets):
    del labels
    return -optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _pick(logits, classes):
    return jnp.take_along_axis(logits, classes[:, None], axis=-1)[:, 0]


def dlr(logits, labels, targets):
    """Difference of logits ratio: scale- and shift-invariant in the logits (needs 3 classes)."""
    del targets
    z = jnp.sort(logits, axis=-1)
    other = jnp.where(jnp.argmax(logits, -1) == labels, z[:, -2], z[:, -1])  # the best class other than y
    return -(_pick(logits, labels) - other) / (z[:, -1] - z[:, -3] + DLR_EPS)


def dlr_targeted(logits, labels, targets):
    """Targeted DLR: raises z_t against z_y (needs 4 classes)."""
    z = jnp.sort(logits, axis=-1)
    return -(_pick(logits, labels) - _pick(logits, targets)) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + DLR_EPS)


# ----------------------------------------------------------------------------- one run


def checkpoints(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per iteration: is it a checkpoint, and the length of the window it closes (the reference's schedule)."""
    window = max(int(FIRST_CHECKPOINT * steps), 1)
    decrease, smallest = max(int(WINDOW_DECREASE * steps), 1), max(int(MIN_WINDOW * steps), 1)
    is_check, length = np.zeros(steps, bool), np.zeros(steps, np.float32)
    since = 0
    for i in range(steps):
        since += 1
        if since == window:
            is_check[i], length[i] = True, window
            since, window = 0, max(window - decrease, smallest)
    return is_check, length


def _unit(v, norm):
    """v scaled to unit Linf or L2 norm per example."""
    size = linf_norm(v) if norm == "linf" else l2_norm(v)
    return v / (size + TINY)


def _l2_project(x, v, eps):
    """x + (v - x) shrunk to L2 norm at most eps, clipped to [0, 1] (the reference's L2 projection)."""
    d = v - x
    return clip_pixels(x + _unit(d, "l2") * jnp.minimum(eps, l2_norm(d)))


def apgd(untargeted_loss, targeted_loss, *, steps: int, norm: str, eot: int = 1, restarts: int = 1,
         sweep: bool = False, hit_targets: bool = False) -> Run:
    """APGD runs from a random start; each returns x_adv (see the module docstring).

    Args:
        untargeted_loss, targeted_loss: per-example losses loss(logits, labels, targets) to increase; the
            targeted one is used when the run has targets.
        steps: iterations.
        norm: 'linf' or 'l2'.
        eot: gradient samples averaged per step (expectation over transformation, for random models: the
            logits function is then called as logits_fn(v, key=k)).
        restarts: runs per target class (apgd-t: run `index` targets the class ranked 2 + index // restarts).
        sweep: without given targets, target the top classes in turn (apgd-t).
        hit_targets: success means predicting the targets (a user-targeted attack), not misclassifying.
    """
    is_check, length = (jnp.asarray(a) for a in checkpoints(steps))

    def loss_and_grad(logits_fn, s, v, i):
        loss = untargeted_loss if s["targets"] is None else targeted_loss

        def total(u, k):
            logits = logits_fn(u) if eot == 1 else logits_fn(u, key=k)
            per_example = loss(logits, s["labels"], s["targets"])
            return per_example.sum(), (per_example, logits)

        grad = jnp.zeros_like(v)
        for j in range(eot):  # the reference keeps the last sample's loss and logits
            (_, (per_example, logits)), g = jax.value_and_grad(total, has_aux=True)(
                v, jax.random.fold_in(jax.random.fold_in(s["k_eot"], i + 1), j))
            grad = grad + g
        return per_example, logits, grad / eot

    def success(s, logits):
        pred = jnp.argmax(logits, -1)
        return pred == s["targets"] if hit_targets else pred != s["labels"]

    def start(logits_fn, x, labels, targets, eps, key, index):
        if targets is None and sweep:
            targets = ranked_class(logits_fn(x), 2 + index // restarts)
        k_start, k_eot = jax.random.split(key)
        s = {"x0": x, "labels": labels, "targets": targets, "eps": eps, "k_eot": k_eot}
        if norm == "linf":
            noise = jax.random.uniform(k_start, x.shape, minval=-1.0, maxval=1.0)
        else:
            noise = jax.random.normal(k_start, x.shape)
        x_adv = clip_pixels(x + eps * _unit(noise, norm))
        loss0, logits0, grad = loss_and_grad(logits_fn, s, x_adv, -1)  # sample keys 0 (start), 1.. (steps)
        n = x.shape[0]
        return dict(s, x=x_adv, x_old=x_adv, grad=grad, x_best=x_adv, grad_best=grad, x_adv_best=x_adv,
                    loss_best=loss0, loss_prev=jnp.zeros_like(loss0), rises=jnp.zeros(n, jnp.int32),
                    loss_last_check=loss0, reduced=jnp.ones(n, bool), robust=~success(s, logits0),
                    step=jnp.full((n,), INITIAL_STEP, jnp.float32) * eps)

    def step(logits_fn, i, c):
        x, eps, x_adv, x_old, grad = c["x0"], c["eps"], c["x"], c["x_old"], c["grad"]
        bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
        a = jnp.where(i > 0, MOMENTUM, 1.0)
        size = c["step"].reshape(bshape)
        if norm == "linf":
            z = clip_pixels(x + project(x_adv + size * jnp.sign(grad) - x, eps, "linf"))
            x_new = clip_pixels(x + project(x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a) - x, eps, "linf"))
        else:
            z = _l2_project(x, x_adv + size * _unit(grad, "l2"), eps)
            x_new = _l2_project(x, x_adv + (z - x_adv) * a + (x_adv - x_old) * (1 - a), eps)
        per_example, logits, g = loss_and_grad(logits_fn, c, x_new, i)
        fooled = success(c, logits)
        improved = per_example > c["loss_best"]
        up = improved.reshape(bshape)
        c = dict(c, x_old=x_adv, robust=c["robust"] & ~fooled,
                 x_adv_best=jnp.where(fooled.reshape(bshape), x_new, c["x_adv_best"]),
                 x_best=jnp.where(up, x_new, c["x_best"]), grad_best=jnp.where(up, g, c["grad_best"]),
                 loss_best=jnp.where(improved, per_example, c["loss_best"]),
                 rises=c["rises"] + (per_example > c["loss_prev"]), loss_prev=per_example)
        # checkpoint: halve the step (and go back to the best point) where progress stalled
        check = is_check[i]
        oscillating = c["rises"] <= length[i] * RHO
        stalled = ~c["reduced"] & (c["loss_last_check"] >= c["loss_best"])
        reduce = check & (oscillating | stalled)
        back = reduce.reshape(bshape)
        return dict(c, x=jnp.where(back, c["x_best"], x_new), grad=jnp.where(back, c["grad_best"], g),
                    step=jnp.where(reduce, c["step"] / 2, c["step"]),
                    reduced=jnp.where(check, oscillating | stalled, c["reduced"]),
                    loss_last_check=jnp.where(check, c["loss_best"], c["loss_last_check"]),
                    rises=jnp.where(check, 0, c["rises"]))

    def finish(logits_fn, c):
        del logits_fn
        robust = c["robust"].reshape((-1,) + (1,) * (c["x0"].ndim - 1))
        return jnp.where(robust, c["x_best"], c["x_adv_best"])

    # a random model (eot > 1) fooled by one sample may not be by the next, so such runs take every step
    return Run(start=start, step=step, finish=finish, steps=steps,
               working=(lambda c: c["robust"]) if eot == 1 else None)


# ----------------------------------------------------------------------------- registered attacks


def _runs(cfg: AttackConfig, num_classes: int) -> int:
    return cfg.restarts


def _sweep_runs(cfg: AttackConfig, num_classes: int) -> int:
    """apgd-t without a target: restarts x the top `targets` classes (at most every other class)."""
    return cfg.restarts if cfg.targeted else cfg.restarts * min(cfg.targets, num_classes - 1)


def _apgd(untargeted_loss, targeted_loss, sweep: bool):
    def run(cfg: AttackConfig) -> Run:
        return apgd(untargeted_loss, targeted_loss, steps=cfg.steps, norm=cfg.norm, eot=cfg.eot,
                    restarts=cfg.restarts, sweep=sweep, hit_targets=cfg.targeted)

    return run


ATTACKS.register("apgd-ce", Attack(run=_apgd(cross_entropy, cross_entropy_targeted, False), runs=_runs,
                                   iterative=True, random_start=True, default_steps=100, auto_step=True),
                 help="Auto-PGD on the cross-entropy (Croce & Hein 2020): adaptive step, momentum, checkpoints")
ATTACKS.register("apgd-dlr", Attack(run=_apgd(dlr, dlr_targeted, False), runs=_runs, iterative=True,
                                    random_start=True, default_steps=100, auto_step=True, min_classes=3),
                 help="Auto-PGD on the difference-of-logits-ratio loss (scale invariant; Croce & Hein 2020)")
ATTACKS.register("apgd-t", Attack(run=_apgd(dlr_targeted, dlr_targeted, True), runs=_sweep_runs, iterative=True,
                                  random_start=True, default_steps=100, auto_step=True, min_classes=4,
                                  sweeps_targets=True),
                 help="targeted Auto-PGD, DLR loss, one run per top class (--n-targets, 9 in AutoAttack)")
