"""Minimum-norm attacks users know: Carlini & Wagner's L2 attack and DeepFool.

Both look for the smallest perturbation that changes the prediction, not for the worst one inside a
budget; within `cnncli adversarial` a result counts only where its norm is at most eps (as FAB's does
in AutoAttack), so a large eps gives their unbounded form.
"""

import jax
import jax.numpy as jnp
import optax

from cnncli.adversarial.attacks import ATTACKS, TINY, Attack, AttackConfig, Run, clip_pixels, inside, l2_norm

CW_LR = 0.01  # Adam's learning rate in C&W's code and torchattacks
TANH_SCALE = 0.999999  # C&W's own code: keeps atanh finite at pixels 0 and 1
OVERSHOOT = 0.02  # DeepFool's
DEEPFOOL_NUDGE = 1e-4  # DeepFool's reference code adds it to each step's length
BIG = 1e10


def _other_best(logits, own):
    """The highest logit of any class but `own`."""
    return jnp.max(jnp.where(jax.nn.one_hot(own, logits.shape[-1], dtype=bool), -jnp.inf, logits), -1)


def cw_l2(cfg: AttackConfig) -> Run:
    """Carlini & Wagner 2017, L2: Adam in tanh space on ||delta||^2 + c * max(z_y - max_other z, -kappa)."""
    opt = optax.adam(CW_LR)

    def cost(logits_fn, s, w):
        x, own = s["x"], s["own"]
        adv = 0.5 * (jnp.tanh(w) + 1.0)
        logits = logits_fn(adv)
        gap = jnp.take_along_axis(logits, own[:, None], -1)[:, 0] - _other_best(logits, own)
        f = jnp.maximum(gap if s["targets"] is None else -gap, -cfg.kappa)
        size = jnp.sum((adv - x).reshape(x.shape[0], -1) ** 2, -1)
        return jnp.sum(size) + cfg.c * jnp.sum(f), (adv, logits, size)

    def start(logits_fn, x, labels, targets, eps, key, index):
        del logits_fn, key, index
        w0 = jnp.arctanh((2.0 * x - 1.0) * TANH_SCALE)
        return {"x": x, "labels": labels, "targets": targets, "own": labels if targets is None else targets,
                "eps": eps, "w": w0, "opt": opt.init(w0), "best": x, "best_size": jnp.full((x.shape[0],), BIG, x.dtype)}

    def step(logits_fn, i, s):
        del i
        (_, (adv, logits, size)), g = jax.value_and_grad(lambda w: cost(logits_fn, s, w), has_aux=True)(s["w"])
        pred = jnp.argmax(logits, -1)
        fooled = pred != s["labels"] if s["targets"] is None else pred == s["targets"]
        better = fooled & (size < s["best_size"])
        updates, state = opt.update(g, s["opt"], s["w"])
        return dict(s, w=optax.apply_updates(s["w"], updates), opt=state,
                    best=jnp.where(better[:, None, None, None], adv, s["best"]),
                    best_size=jnp.where(better, size, s["best_size"]))

    def finish(logits_fn, s):
        del logits_fn
        return inside(clip_pixels(s["best"]), s["x"], s["eps"], "l2")

    return Run(start=start, step=step, finish=finish, steps=cfg.steps)


def deepfool(cfg: AttackConfig) -> Run:
    """Moosavi-Dezfooli et al. 2016: step to the nearest linearized boundary until the label flips, then overshoot."""

    def start(logits_fn, x, labels, targets, eps, key, index):
        del logits_fn, targets, key, index
        return {"x": x, "labels": labels, "eps": eps, "r_tot": jnp.zeros_like(x)}

    def step(logits_fn, i, s):
        del i
        x, labels, r_tot = s["x"], s["labels"], s["r_tot"]
        n = x.shape[0]
        bshape = (n,) + (1,) * (x.ndim - 1)
        x_i = clip_pixels(x + (1 + OVERSHOOT) * r_tot)
        z, vjp = jax.vjp(logits_fn, x_i)
        k = z.shape[-1]
        jac = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, z.shape))[0])(jnp.eye(k, dtype=z.dtype))  # (K, N, ...)
        jac = jnp.moveaxis(jac, 0, 1)  # (N, K, ...)
        own = jax.nn.one_hot(labels, k, dtype=bool)
        gaps = z - jnp.take_along_axis(z, labels[:, None], -1)
        w = jac - jnp.take_along_axis(jac, labels.reshape(n, 1, *([1] * (x.ndim - 1))), 1)
        flat = w.reshape(n, k, -1)
        size = jnp.sum(jnp.abs(flat), -1) if cfg.norm == "linf" else jnp.sqrt(jnp.sum(flat * flat, -1))
        dist = jnp.where(own, jnp.inf, jnp.abs(gaps) / (size + TINY))
        pick = jnp.argmin(dist, -1)
        w_l = jnp.take_along_axis(w, pick.reshape(n, 1, *([1] * (x.ndim - 1))), 1)[:, 0]
        length = jnp.take_along_axis(dist, pick[:, None], -1)[:, 0].reshape(bshape) + DEEPFOOL_NUDGE
        if cfg.norm == "linf":
            move = length * jnp.sign(w_l)
        else:
            move = length * w_l / (l2_norm(w_l) + TINY)
        still = (jnp.argmax(z, -1) == labels).reshape(bshape)  # fooled examples stop
        return dict(s, r_tot=jnp.where(still, r_tot + move, r_tot))

    def finish(logits_fn, s):
        del logits_fn
        x = s["x"]
        return inside(clip_pixels(x + (1 + OVERSHOOT) * s["r_tot"]), x, s["eps"], cfg.norm)

    return Run(start=start, step=step, finish=finish, steps=cfg.steps)


ATTACKS.register("cw-l2", Attack(run=cw_l2, norms=("l2",), iterative=True, default_steps=100, auto_step=True,
                                 minimum_norm=True),
                 help="Carlini & Wagner 2017, L2: Adam in tanh space, --cw-c and --kappa; kept inside eps")
ATTACKS.register("deepfool", Attack(run=deepfool, iterative=True, default_steps=50, auto_step=True,
                                    minimum_norm=True, untargeted_only=True),
                 help="DeepFool (Moosavi-Dezfooli et al. 2016): nearest linearized boundary, 2% overshoot; "
                      "kept inside eps")
