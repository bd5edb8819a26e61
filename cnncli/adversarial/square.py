"""Square attack (Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search"): AutoAttack's fourth attack, which never looks at a gradient.

It starts from a random vertex of the Linf ball (vertical stripes of +-eps) or a pattern of random
L2 blobs, then proposes one random square at a time (Linf: the square set to +-eps per channel; L2:
mass moved between two squares, shaped by the paper's centred pattern; a Linf square that would change
no pixel is redrawn) and keeps a proposal when it lowers the margin z_y - max_{i != y} z_i, until the
margin is negative (fooled) or the queries run out.
The square's side shrinks on the paper's schedule (p_init = 0.8 of the image, halved after 10, 50,
200, 500, 1000, 2000, 4000, 6000 and 8000 queries: the schedule AutoAttack runs without rescaling).
Written after the reference code (fra31/auto-attack square.py; torchattacks 3.5 Square). One run (a `Run`,
one query per step) attacks a batch, each example drawing its own squares, and ends once every example is fooled.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cnncli.adversarial.attacks import ATTACKS, TINY, Attack, AttackConfig, Run, clip_pixels, l2_norm

P_INIT = 0.8
SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # queries after which the square's area halves
L2_MIN_SIDE = 3
L2_INIT_TILES = 5  # the L2 start tiles the image with blobs of side H // 5
NO_CHANGE = 1e-7  # a pixel moved by less is unchanged (the reference's threshold)
MAX_REDRAWS = 32  # a bound for eps = 0, where no sign changes anything


def margin_and_loss(logits, labels, targets):
    """(margin, loss) to drive below zero: z_y - max_other untargeted, max_{i != t} z_i - z_t targeted."""
    own = labels if targets is None else targets
    z_own = jnp.take_along_axis(logits, own[:, None], -1)[:, 0]
    others = jnp.max(jnp.where(jax.nn.one_hot(own, logits.shape[-1], dtype=bool), -jnp.inf, logits), -1)
    margin = z_own - others if targets is None else others - z_own
    return margin, margin


def side(i, n_features: int, channels: int, minimum: int):
    """The square's side at query i (traced): sqrt(p * pixels), p halved on SCHEDULE."""
    halvings = jnp.sum(i > jnp.asarray(SCHEDULE))
    p = P_INIT / 2.0 ** halvings
    s = jnp.maximum(jnp.round(jnp.sqrt(p * n_features / channels)).astype(jnp.int32), minimum)
    return s if minimum < L2_MIN_SIDE else s + (s % 2 == 0)  # the L2 squares have odd sides


def _corner(key, n, length, s):
    """Per example, a random corner in [0, length - s) (the reference's range; 0 when the square fills the side)."""
    return jnp.floor(jax.random.uniform(key, (n,)) * jnp.maximum(length - s, 0)).astype(jnp.int32)


def _window(vh, vw, s, h, w):
    """(N, H, W, 1) masks of the squares of side s at corners (vh, vw)."""
    rows = jnp.arange(h)[None, :, None, None] - vh[:, None, None, None]
    cols = jnp.arange(w)[None, None, :, None] - vw[:, None, None, None]
    return (rows >= 0) & (rows < s) & (cols >= 0) & (cols < s), rows, cols


def harmonic_squares(length: int) -> jax.Array:
    """table[m] = sum_{k < m} 1 / (k + 1)^2 for m = 0..length."""
    return jnp.asarray(np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, length + 1) ** 2)]), jnp.float32)


def _rectangle(u, v, rows, cols, inside, table):
    """The reference's eta_rectangles(rows, cols) at local coordinates (u, v): nested rectangles around the
    centre, the k-th weighted 1 / (k + 1)^2, normalized to unit L2 over the rectangle."""
    depth = jnp.maximum(jnp.abs(u - rows // 2), jnp.abs(v - cols // 2))
    top = jnp.maximum(rows // 2 + 1, cols // 2 + 1)
    last = table.shape[0] - 1
    value = jnp.where(inside, table[jnp.clip(top, 0, last)] - table[jnp.clip(depth, 0, last)], 0.0)
    size = jnp.sqrt(jnp.sum(value * value, axis=(1, 2), keepdims=True))
    return value / (size + TINY)


def blob(rows, cols, s, flip):
    """The reference's eta(s) laid on the canvas: +rectangle on the top half of the square, -rectangle on the
    bottom half, unit L2; rows/cols are local coordinates (N, H, W, 1), flip transposes it (per example)."""
    table = harmonic_squares(max(rows.shape[1], cols.shape[2]) + 1)
    flip = flip[:, None, None, None]
    u, v = jnp.where(flip, cols, rows), jnp.where(flip, rows, cols)
    inside = (u >= 0) & (u < s) & (v >= 0) & (v < s)
    half = s // 2
    upper = _rectangle(u, v, half, s, inside & (u < half), table)
    lower = _rectangle(u - half, v, s - half, s, inside & (u >= half), table)
    value = upper - lower
    return value / (jnp.sqrt(jnp.sum(value * value, axis=(1, 2), keepdims=True)) + TINY)


def _l2_start(x, eps, key):
    """The L2 start: tiles of side H // 5, each a random-signed blob per channel, scaled to norm eps."""
    n, h, w, c = x.shape
    s = max(h // L2_INIT_TILES, 1)
    first = (h - s * L2_INIT_TILES) // 2
    delta = jnp.zeros_like(x)
    tile = 0
    for vh in range(first, h, s):
        for vw in range(first, w, s):
            if vh + s > h or vw + s > w:
                continue
            k_flip, k_sign = jax.random.split(jax.random.fold_in(key, tile))
            _, rows, cols = _window(jnp.full(n, vh), jnp.full(n, vw), s, h, w)
            flip = jax.random.bernoulli(k_flip, 0.5, (n,))
            sign = jnp.sign(jax.random.uniform(k_sign, (n, 1, 1, c), minval=-1.0, maxval=1.0))
            delta = delta + blob(rows, cols, s, flip) * sign
            tile += 1
    return clip_pixels(x + delta / (l2_norm(delta) + TINY) * eps)


def changing_sign(x, x_best, window, sign, eps, key):
    """Per example, the window's signs redrawn until setting the window to x + eps * sign changes some pixel (the
    reference redraws a proposal that would leave x_best as it is, which would waste a query)."""
    n, c = x.shape[0], x.shape[-1]

    def unchanged(sign):
        moved = window & (jnp.abs(clip_pixels(x + eps * sign) - x_best) >= NO_CHANGE)
        return ~jnp.any(moved, axis=(1, 2, 3))

    if c == 1:  # the only other proposal, the opposite sign, always changes a pixel (eps > 0): no redrawing needed
        return jnp.where(unchanged(sign)[:, None, None, None], -sign, sign)

    def redraw(carry):
        tries, sign = carry
        fresh = jnp.sign(jax.random.uniform(jax.random.fold_in(key, tries), (n, 1, 1, c), minval=-1.0, maxval=1.0))
        return tries + 1, jnp.where(unchanged(sign)[:, None, None, None], fresh, sign)

    def again(carry):
        tries, sign = carry
        return (tries < MAX_REDRAWS) & jnp.any(unchanged(sign))

    return jax.lax.while_loop(again, redraw, (jnp.int32(0), sign))[1]


def square(*, queries: int, norm: str) -> Run:
    """Square runs; each returns the best example found (fooled, or the lowest margin reached).

    Args:
        queries: proposals per example (each one forward pass): the run's steps.
        norm: 'linf' or 'l2'.

    A run's targets, when given, are aimed at instead of moving away from the labels. Only the model's
    outputs are used.
    """

    def margin(logits_fn, s, v):
        return margin_and_loss(logits_fn(v), s["labels"], s["targets"])

    def start(logits_fn, x, labels, targets, eps, key, index):
        del index
        n, _, w, c = x.shape
        k_init, k_loop = jax.random.split(key)
        if norm == "linf":
            stripes = jnp.sign(jax.random.uniform(k_init, (n, 1, w, c), minval=-1.0, maxval=1.0))
            x_best = clip_pixels(x + eps * stripes)
        else:
            x_best = _l2_start(x, eps, k_init)
        s = {"x": x, "labels": labels, "targets": targets, "eps": eps, "key": k_loop, "x_best": x_best}
        s["margin"], s["loss"] = margin(logits_fn, s, x_best)
        return s

    def propose(s, i):
        x, x_best, eps = s["x"], s["x_best"], s["eps"]
        n, h, w, c = x.shape
        keys = jax.random.split(jax.random.fold_in(s["key"], i), 6)
        side_i = side(i, h * w * c, c, 1 if norm == "linf" else L2_MIN_SIDE)
        vh, vw = _corner(keys[0], n, h, side_i), _corner(keys[1], n, w, side_i)
        sign = jnp.sign(jax.random.uniform(keys[2], (n, 1, 1, c), minval=-1.0, maxval=1.0))
        window, rows, cols = _window(vh, vw, side_i, h, w)
        if norm == "linf":
            sign = changing_sign(x, x_best, window, sign, eps, keys[3])
            return jnp.where(window, clip_pixels(x + eps * sign), x_best)
        delta = x_best - x
        other, _, _ = _window(_corner(keys[3], n, h, side_i), _corner(keys[4], n, w, side_i), side_i, h, w)
        in_window = jnp.sqrt(jnp.sum(jnp.where(window, delta * delta, 0.0), axis=(1, 2), keepdims=True))
        image = l2_norm(delta)
        both = l2_norm(jnp.where(window | other, delta, 0.0))
        new = (blob(rows, cols, side_i, jax.random.bernoulli(keys[5], 0.5, (n,))) * sign
               + jnp.where(window, delta, 0.0) / (TINY + in_window))
        new_size = jnp.sqrt(jnp.sum(new * new, axis=(1, 2), keepdims=True))
        new = new / (TINY + new_size) * jnp.sqrt(jnp.maximum(eps * eps - image * image, 0.0) / c + both * both)
        delta = jnp.where(window, new, jnp.where(other, 0.0, delta))
        return clip_pixels(x + delta / (l2_norm(delta) + TINY) * eps)

    def step(logits_fn, i, s):
        x_new = propose(s, i)
        m_new, l_new = margin(logits_fn, s, x_new)
        active = s["margin"] > 0  # fooled examples stop
        lower = active & (l_new < s["loss"])
        take = active & (lower | (m_new <= 0))
        return dict(s, x_best=jnp.where(take[:, None, None, None], x_new, s["x_best"]),
                    margin=jnp.where(take, m_new, s["margin"]), loss=jnp.where(lower, l_new, s["loss"]))

    return Run(start=start, step=step, finish=lambda logits_fn, s: s["x_best"], steps=queries,
               working=lambda s: s["margin"] > 0)


def _runs(cfg: AttackConfig, num_classes: int) -> int:
    return cfg.restarts


def _square(cfg: AttackConfig) -> Run:
    return square(queries=cfg.queries, norm=cfg.norm)


ATTACKS.register("square", Attack(run=_square, runs=_runs, random_start=True, auto_step=True, black_box=True),
                 help="Square (Andriushchenko et al. 2020): black-box random search, --queries per run (5000 in "
                      "AutoAttack)")
