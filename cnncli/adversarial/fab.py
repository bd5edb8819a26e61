"""FAB, the fast adaptive boundary attack (Croce & Hein 2020, "Minimally distorted adversarial examples
with a fast adaptive boundary attack"), untargeted and targeted (FAB-T, AutoAttack's third attack).

Each step linearizes the decision boundary between the label and one other class (FAB-T: the target;
FAB: the closest in the linearization), projects both the current iterate and the clean image onto
that hyperplane inside the [0, 1] box (minimal Linf or L2 step: `project_linf` bisects the Linf budget,
`project_l2` is the reference's bisection on sorted coordinates), and moves to a convex combination of the two
projections, biased towards the clean image (alpha <= alpha_max), with a 5% overshoot. Once the
iterate is adversarial it remembers it if it is the smallest so far, and steps back towards the clean
image (beta). It minimizes the norm; a result counts only inside eps, as in AutoAttack. Written after the
reference code (fra31/auto-attack fab_pt.py; torchattacks 3.5 FAB), defaults from the AutoAttack
standard version.
"""

import math

import jax
import jax.numpy as jnp

from cnncli.adversarial.attacks import ATTACKS, TINY, Attack, AttackConfig, Run, clip_pixels, inside, ranked_class

ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9  # bias towards the clean image, overshoot, backward step
BIG = 1e10  # "no adversarial found yet" and the masked class of the untargeted linearization
MIN_STEP = 1e-8
WEIGHT_EPS = 1e-8  # coordinates with smaller hyperplane weights cannot move the point (the reference's cut-off)
R_MAX = 1e12
LINF_BISECTIONS = 24  # halvings of the Linf budget's bracket [0, 1]: float32's resolution


def _take(a, index):
    return jnp.take_along_axis(a, index, axis=1)


def project_linf(t, w, b):
    """Per row, the smallest-Linf d with w . (t + d) = b and t + d in [0, 1] (or the box's corner closest to it).

    With a budget lam every coordinate moves min(lam, room) towards the bound that brings w . t to b, which
    closes the gap by sum |w| min(lam, room): increasing and piecewise linear in lam. The reference sorts the
    rooms to find the piece where this reaches the gap; sorting is slow under XLA on CPU (it dominated FAB-T), so
    lam is bisected instead and then solved exactly on the linear piece above the lower bound.
    """
    gap = jnp.sum(w * t, 1) - b
    w = w * jnp.where(gap >= 0, 1.0, -1.0)[:, None]  # now every move lowers w . t by |w| per unit
    gap = jnp.abs(gap)
    towards_one = w < 0
    direction = jnp.where(towards_one, 1.0, -1.0)
    room = jnp.where(w != 0, jnp.where(towards_one, 1.0 - t, t), 0.0)
    weight = jnp.abs(w)

    def closed(lam):
        return jnp.sum(weight * jnp.minimum(lam[:, None], room), 1)

    lo, hi = jnp.zeros_like(gap), jnp.max(room, 1)
    for _ in range(LINF_BISECTIONS):
        mid = 0.5 * (lo + hi)
        enough = closed(mid) >= gap
        lo, hi = jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)
    saturated = room <= lo[:, None]
    lam = (gap - jnp.sum(jnp.where(saturated, weight * room, 0.0), 1)) / jnp.maximum(
        jnp.sum(jnp.where(saturated, 0.0, weight), 1), TINY)
    reachable = jnp.sum(weight * room, 1) >= gap
    return direction * jnp.where(reachable[:, None], jnp.minimum(lam[:, None], room), room)


def project_l2(t, w, b):
    """Per row, the smallest-L2 d with w . (t + d) = b and t + d in [0, 1] (or the closest point of the box)."""
    n, dim = t.shape
    c = jnp.sum(w * t, 1) - b
    sign = jnp.where(c >= 0, 1.0, -1.0)
    w, c = w * sign[:, None], c * sign
    small = jnp.abs(w) < WEIGHT_EPS
    r = jnp.clip(jnp.maximum(t / w, (t - 1) / w), -R_MAX, R_MAX)
    r = jnp.where(small | (r == -R_MAX), R_MAX, r)
    indr = jnp.argsort(r, axis=1)
    rs = _take(r, indr)
    rs2 = jnp.concatenate([rs[:, 1:], jnp.zeros((n, 1), rs.dtype)], 1)
    rs, rs2 = jnp.where(rs == R_MAX, 0.0, rs), jnp.where(rs2 == R_MAX, 0.0, rs2)
    w3s = _take(w * w, indr)
    w5 = jnp.sum(w3s, 1, keepdims=True)
    ws = w5 - jnp.cumsum(w3s, 1)
    d = -(r * w) * ~small
    s = jnp.concatenate([-w5 * rs[:, :1], jnp.cumsum((rs - rs2) * ws, 1) - w5 * rs[:, :1]], 1)
    c4 = s[:, 0] + c < 0
    c3 = jnp.sum(d * w, 1) + c > 0
    c2 = ~(c4 | c3)
    lb, ub = jnp.zeros(n), jnp.full(n, dim - 1.0)
    for _ in range(math.ceil(math.log2(dim))):
        mid = jnp.floor((lb + ub) / 2)
        above = _take(s, mid.astype(jnp.int32)[:, None])[:, 0] + c > 0
        lb, ub = jnp.where(above, mid, lb), jnp.where(above, ub, mid)
    k = lb.astype(jnp.int32)[:, None]
    ws_k = _take(ws, k)[:, 0]
    alpha2 = jnp.where(ws_k == 0, 0.0, (_take(s, k)[:, 0] + c) / ws_k + _take(rs, k)[:, 0])[:, None]
    c5 = (alpha2 > r).astype(t.dtype)
    d_2 = d * c5 - alpha2 * w * (1 - c5)
    d_4 = -(c / w5[:, 0])[:, None] * w
    d = jnp.where(c4[:, None], d_4, jnp.where(c2[:, None], d_2, d))
    return d * ~small


PROJECTIONS = {"linf": project_linf, "l2": project_l2}


def _flat_norm(v, norm):
    return jnp.max(jnp.abs(v), 1) if norm == "linf" else jnp.sqrt(jnp.sum(v * v, 1))


def _dual_norm(g, norm):
    """The norm that turns a logit gap into a distance: L1 of the gradient for Linf, L2 for L2."""
    return jnp.sum(jnp.abs(g), -1) if norm == "linf" else jnp.sqrt(jnp.sum(g * g, -1))


def fab(*, steps: int, norm: str, restarts: int = 1, sweep: bool = False, hit_targets: bool = False) -> Run:
    """FAB runs; each returns the smallest adversarial example found inside eps, else x.

    Args:
        steps: iterations.
        norm: 'linf' or 'l2'.
        restarts: runs per target class; every run but a class's first starts from x + a random perturbation
            of norm eps / 2 (the reference's later restarts).
        sweep: without given targets, target the top classes in turn (FAB-T: run `index` targets the class
            ranked 2 + index // restarts). Untargeted runs pick the closest boundary by the linearization,
            which needs the whole Jacobian: one backward pass per class.
        hit_targets: success means predicting the targets (a user-targeted attack), not misclassifying.
    """
    project = PROJECTIONS[norm]

    def success(logits_fn, s, v):
        pred = jnp.argmax(logits_fn(v), -1)
        return pred == s["targets"] if hit_targets else pred != s["labels"]

    def linearization(logits_fn, s, v):
        """(df, dg): logit gaps to the label's and their gradients, (N, K) and (N, K, D)."""
        n, labels, targets = v.shape[0], s["labels"], s["targets"]
        if targets is not None:
            def gap(u):
                z = logits_fn(u)
                diff = jnp.take_along_axis(z, targets[:, None], -1) - jnp.take_along_axis(z, labels[:, None], -1)
                return diff.sum(), diff

            g, df = jax.grad(gap, has_aux=True)(v)
            return df, g.reshape(n, 1, -1)
        z, vjp = jax.vjp(logits_fn, v)
        k = z.shape[-1]
        jac = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, z.shape))[0])(jnp.eye(k, dtype=z.dtype))  # (K, N, ...)
        jac = jnp.moveaxis(jac.reshape(k, n, -1), 0, 1)
        own = jax.nn.one_hot(labels, k, dtype=bool)
        df = jnp.where(own, BIG, z - jnp.take_along_axis(z, labels[:, None], -1))
        dg = jac - jnp.take_along_axis(jac, labels[:, None, None], 1)
        return df, dg

    def start(logits_fn, x, labels, targets, eps, key, index):
        if targets is None and sweep:
            targets = ranked_class(logits_fn(x), 2 + index // restarts)
        n = x.shape[0]
        x0 = x.reshape(n, -1)
        t = (jax.random.uniform(key, x.shape, minval=-1.0, maxval=1.0) if norm == "linf"
             else jax.random.normal(key, x.shape)).reshape(n, -1)
        shifted = clip_pixels(x0 + jnp.minimum(BIG, eps) * t / (_flat_norm(t, norm)[:, None] + TINY) * 0.5)
        return {"x": x, "labels": labels, "targets": targets, "eps": eps,
                "x1": jnp.where(index % restarts > 0, shifted, x0), "adv": x0, "best": jnp.full((n,), BIG, x.dtype)}

    def step(logits_fn, i, s):
        del i
        x1, x = s["x1"], s["x"]
        n, x0 = x.shape[0], x.reshape(x.shape[0], -1)
        df, dg = linearization(logits_fn, s, x1.reshape(x.shape))
        dist = jnp.abs(df) / (TINY + _dual_norm(dg, norm))
        pick = jnp.argmin(dist, 1)[:, None]
        w = jnp.take_along_axis(dg, pick[:, :, None], 1)[:, 0]
        b = -jnp.take_along_axis(df, pick, 1)[:, 0] + jnp.sum(w * x1, 1)
        d3 = project(jnp.concatenate([x1, x0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]))
        d1, d2 = d3[:n], d3[n:]
        a0 = jnp.maximum(_flat_norm(d3, norm), MIN_STEP)
        a1, a2 = a0[:n], a0[n:]
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, ALPHA_MAX)[:, None]
        x1 = clip_pixels((x1 + ETA * d1) * (1 - alpha) + (x0 + ETA * d2) * alpha)
        is_adv = success(logits_fn, s, x1.reshape(x.shape))
        size = _flat_norm(x1 - x0, norm)
        better = is_adv & (size < s["best"])
        return dict(s, adv=jnp.where(better[:, None], x1, s["adv"]), best=jnp.where(better, size, s["best"]),
                    x1=jnp.where(is_adv[:, None], x0 + (x1 - x0) * BETA, x1))

    def finish(logits_fn, s):
        # only correctly classified points are attacked; a found example counts only inside eps
        x = s["x"]
        attacked = ~success(logits_fn, s, x)
        adv = jnp.where((attacked & (s["best"] < BIG))[:, None], s["adv"], x.reshape(x.shape[0], -1))
        return inside(adv.reshape(x.shape), x, s["eps"], norm)

    return Run(start=start, step=step, finish=finish, steps=steps)


def _runs(cfg: AttackConfig, num_classes: int) -> int:
    return cfg.restarts


def _sweep_runs(cfg: AttackConfig, num_classes: int) -> int:
    return cfg.restarts if cfg.targeted else cfg.restarts * min(cfg.targets, num_classes - 1)


def _fab(sweep: bool):
    def run(cfg: AttackConfig) -> Run:
        return fab(steps=cfg.steps, norm=cfg.norm, restarts=cfg.restarts, sweep=sweep, hit_targets=cfg.targeted)

    return run


ATTACKS.register("fab", Attack(run=_fab(False), runs=_runs, iterative=True, random_start=True, default_steps=100,
                               auto_step=True, minimum_norm=True),
                 help="fast adaptive boundary (Croce & Hein 2020): minimum-norm, kept inside eps; one backward "
                      "pass per class")
ATTACKS.register("fab-t", Attack(run=_fab(True), runs=_sweep_runs, iterative=True, random_start=True,
                                 default_steps=100, auto_step=True, minimum_norm=True, sweeps_targets=True),
                 help="targeted FAB, one run per top class (--n-targets, 9 in AutoAttack)")
