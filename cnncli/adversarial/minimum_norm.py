"""Minimum-norm attacks users know: Carlini & Wagner's L2 attack and DeepFool.

Both look for the smallest perturbation that changes the prediction, not for the worst one inside a
budget; within `cnncli adversarial` a result counts only where its norm is at most eps (as FAB's does
in AutoAttack), so a large eps gives their unbounded form.
"""

import jax
import jax.numpy as jnp
import optax

from cnncli.adversarial.attacks import ATTACKS, TINY, Attack, AttackConfig, clip_pixels, inside, l2_norm

CW_LR = 0.01  # Adam's learning rate in C&W's code and torchattacks
TANH_SCALE = 0.999999  # C&W's own code: keeps atanh finite at pixels 0 and 1
OVERSHOOT = 0.02  # DeepFool's
DEEPFOOL_NUDGE = 1e-4  # DeepFool's reference code adds it to each step's length
BIG = 1e10


def _other_best(logits, own):
    """The highest logit of any class but `own`."""
    return jnp.max(jnp.where(jax.nn.one_hot(own, logits.shape[-1], dtype=bool), -jnp.inf, logits), -1)


def cw_l2(logits_fn, x, labels, targets, eps, key, cfg: AttackConfig, index):
    """Carlini & Wagner 2017, L2: Adam in tanh space on ||delta||^2 + c * max(z_y - max_other z, -kappa)."""
    del key, index
    w0 = jnp.arctanh((2.0 * x - 1.0) * TANH_SCALE)
    opt = optax.adam(CW_LR)
    own = labels if targets is None else targets

    def cost(w):
        adv = 0.5 * (jnp.tanh(w) + 1.0)
        logits = logits_fn(adv)
        gap = jnp.take_along_axis(logits, own[:, None], -1)[:, 0] - _other_best(logits, own)
        f = jnp.maximum(gap if targets is None else -gap, -cfg.kappa)
        size = jnp.sum((adv - x).reshape(x.shape[0], -1) ** 2, -1)
        return jnp.sum(size) + cfg.c * jnp.sum(f), (adv, logits, size)

    def body(_, carry):
        w, state, best, best_size = carry
        (_, (adv, logits, size)), g = jax.value_and_grad(cost, has_aux=True)(w)
        pred = jnp.argmax(logits, -1)
        fooled = pred != labels if targets is None else pred == targets
        better = fooled & (size < best_size)
        best = jnp.where(better[:, None, None, None], adv, best)
        updates, state = opt.update(g, state, w)
        return optax.apply_updates(w, updates), state, best, jnp.where(better, size, best_size)

    carry = (w0, opt.init(w0), x, jnp.full((x.shape[0],), BIG, x.dtype))
    _, _, best, _ = jax.lax.fori_loop(0, cfg.steps, body, carry)
    return inside(clip_pixels(best), x, eps, "l2")


def deepfool(logits_fn, x, labels, targets, eps, key, cfg: AttackConfig, index):
    """Moosavi-Dezfooli et al. 2016: step to the nearest linearized boundary until the label flips, then overshoot."""
    del targets, key, index
    n = x.shape[0]
    bshape = (n,) + (1,) * (x.ndim - 1)

    def body(_, r_tot):
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
            step = length * jnp.sign(w_l)
        else:
            step = length * w_l / (l2_norm(w_l) + TINY)
        still = (jnp.argmax(z, -1) == labels).reshape(bshape)  # fooled examples stop
        return jnp.where(still, r_tot + step, r_tot)

    r_tot = jax.lax.fori_loop(0, cfg.steps, body, jnp.zeros_like(x))
    return inside(clip_pixels(x + (1 + OVERSHOOT) * r_tot), x, eps, cfg.norm)


ATTACKS.register("cw-l2", Attack(run=cw_l2, norms=("l2",), iterative=True, default_steps=100, auto_step=True,
                                 minimum_norm=True),
                 help="Carlini & Wagner 2017, L2: Adam in tanh space, --cw-c and --kappa; kept inside eps")
ATTACKS.register("deepfool", Attack(run=deepfool, iterative=True, default_steps=50, auto_step=True,
                                    minimum_norm=True, untargeted_only=True),
                 help="DeepFool (Moosavi-Dezfooli et al. 2016): nearest linearized boundary, 2% overshoot; "
                      "kept inside eps")
