"""Stride-1 3x3 convolutions and their weight gradients by Winograd minimal filtering (Lavin & Gray 2016).

Winograd F(m x m, 3 x 3) computes a 3x3 convolution tile by tile: each (m + 2) x (m + 2) input
tile d and the kernel g are transformed (V = B^T d B, U = G g G^T), multiplied pointwise over the
(m + 2)^2 transform positions, which over channels is one matrix product per position, and
transformed back (Y = A^T M A) into an m x m output tile. F(2x2, 3x3) needs 16 products per 4
outputs where direct convolution needs 36; F(4x4, 3x3) needs 36 per 16 outputs instead of 144.
The weight gradient is the same algorithm transposed: dU[u, v] = sum over tiles of V[u, v]^T dM[u, v],
with dM the output gradient through the adjoint of the output transform, then dW = G^T dU G.

Where each applies is `cnncli.ops.conv`'s choice (`winograd_conv_applies`,
`winograd_weight_grad_applies`); docs/performance.md ("The rules") has the measurements. XLA's
direct convolution runs near the machine's matmul rate, so the transforms' memory traffic decides
where fewer multiplications pay: with wide channels on small and middle-sized maps.

Everything is written as strided slices, signed sums and per-position matrix products, so XLA
fuses each transform into a few loops and calls its matmul for the products; the transforms'
coefficients are small exact constants. The error stays within float32 rounding of the direct
form's (F(4x4)'s about 1e-5 of the output's scale); tests compare against `jax.grad` of
`lax.conv_general_dilated`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclass(frozen=True)
class Transform:
    """The matrices of F(m x m, 3 x 3): input B^T (a x a), kernel G (a x 3), output A^T (m x a), a = m + 2."""

    m: int
    bt: np.ndarray
    g: np.ndarray
    at: np.ndarray

    @property
    def a(self) -> int:
        return self.m + 2


# Lavin & Gray's matrices; F(4x4) uses the interpolation points 0, +-1, +-2 (their section 4).
TRANSFORMS = {
    2: Transform(2,
                 bt=np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
                 g=np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], np.float64),
                 at=np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: Transform(4,
                 bt=np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
                 g=np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
                 at=np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                              [0, 1, -1, 8, -8, 1]], np.float64)),
}
# Output sides up to which the weight gradient takes F(2x2): on 4x4 maps F(4x4)'s 6x6 tile is mostly padding.
SMALL_MAP = 4


def weight_grad_tile(out_hw: tuple[int, int]) -> int:
    """The tile size m for the weight gradient of an output of this size."""
    return 2 if min(out_hw) <= SMALL_MAP else 4


def _combine(coefs: np.ndarray, part: Callable[[int], jax.Array]) -> jax.Array:
    """sum_k coefs[k] * part(k), unrolled over the nonzero coefficients."""
    acc = None
    for k, coef in enumerate(coefs):
        if coef == 0:
            continue
        term = part(k)
        if coef == -1:
            term = -term
        elif coef != 1:
            term = term * np.float32(coef)
        acc = term if acc is None else acc + term
    return acc


def _signed_sum(rows: np.ndarray, cols: np.ndarray, part: Callable[[int, int], jax.Array]) -> jax.Array:
    """sum_rs rows[r] * cols[s] * part(r, s), unrolled over the nonzero coefficients."""
    return _combine(np.outer(rows, cols).ravel(), lambda k: part(*divmod(k, len(cols))))


def _tiles(size: int, m: int) -> int:
    return -(-size // m)


def _pad_to(x: jax.Array, low: tuple[int, int], length: tuple[int, int]) -> jax.Array:
    """x (N, H, W, C) padded with `low` zeros before and padded or cropped after to `length` pixels."""
    cfg = [(0, 0, 0)]
    for lo, n, size in zip(low, length, x.shape[1:3], strict=True):
        cfg.append((lo, n - size - lo, 0))
    return lax.pad(x, jnp.zeros((), x.dtype), [*cfg, (0, 0, 0)])


def weight_grad3x3(x: jax.Array, g: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """The gradient of conv3x3 with respect to its kernel: (3, 3, C, O) from x (N, H, W, C) and g (N, OH, OW, O).

    The transposed algorithm: dU[u, v] = V[u, v]^T dM[u, v] summed over tiles, with V the input
    tiles' transform and dM the output gradient through the adjoint of the output transform, then
    dW = G^T dU G.
    """
    (ph0, _), (pw0, _) = padding
    _, oh, ow, _ = g.shape
    t = TRANSFORMS[weight_grad_tile((oh, ow))]
    m, a = t.m, t.a
    th, tw = _tiles(oh, m), _tiles(ow, m)
    xp = _pad_to(x, (ph0, pw0), (th * m + 2, tw * m + 2))
    gp = _pad_to(g, (0, 0), (th * m, tw * m))

    def window(r, s):
        return xp[:, r: r + m * (th - 1) + 1: m, s: s + m * (tw - 1) + 1: m]

    def phase(p, q):  # output pixel (p, q) of every tile
        return gp[:, p::m, q::m]

    du = []
    for u in range(a):
        for v in range(a):
            plane = _signed_sum(t.bt[u], t.bt[v], window).reshape(-1, x.shape[-1])
            grad = _signed_sum(t.at[:, u], t.at[:, v], phase).reshape(-1, g.shape[-1])
            # contract over every tile of every image: (C, O)
            du.append(lax.dot_general(plane, grad, (((0,), (0,)), ((), ()))))
    rows = [jnp.stack([_signed_sum(t.g[:, i], t.g[:, j], lambda u, v: du[u * a + v]) for j in range(3)])
            for i in range(3)]
    return jnp.stack(rows)


def conv3x3(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """A stride-1 3x3 cross-correlation by F(4x4, 3x3): x (N, H, W, C), w (3, 3, C, O) -> (N, OH, OW, O).

    The input gradient of such a layer is the same operation on the output gradient (the kernel
    flipped, its channels swapped, the padding 2 - p), so `cnncli.ops.conv` uses this for both.
    Unlike the weight gradient above, the transforms here run in two separable stages (rows, then
    columns: 22 + 132 terms per tile for B^T d B instead of 484) and the 36 per-position products are
    one batched product, which is what made the forward pass faster than XLA's (the weight gradient
    measured slower in this form, so it keeps its 2-D sums).
    """
    t = TRANSFORMS[4]
    m, a = t.m, t.a
    (top, bottom), (left, right) = padding
    n, h, wd, c = x.shape
    oh, ow = h + top + bottom - 2, wd + left + right - 2
    th, tw = _tiles(oh, m), _tiles(ow, m)
    xp = _pad_to(x, (top, left), (th * m + 2, tw * m + 2))
    # B^T d B: every tile's rows combined (a, N, th, padded W, C), then their columns (a, a, N, th, tw, C)
    row_mix = jnp.stack([_combine(t.bt[u], lambda r: xp[:, r: r + m * (th - 1) + 1: m]) for u in range(a)])
    tiles = jnp.stack([_combine(t.bt[v], lambda s: row_mix[:, :, :, s: s + m * (tw - 1) + 1: m]) for v in range(a)],
                      axis=1)
    # G w G^T per channel pair, as signed sums XLA fuses into one pass: as an einsum with G, XLA made
    # its 3-long contractions dot products, several times slower
    kernel_rows = [_combine(t.g[u], lambda i: w[i]) for u in range(a)]
    kernel = jnp.stack([_combine(t.g[v], row.__getitem__) for row in kernel_rows for v in range(a)])
    prod = lax.dot_general(tiles.reshape(a * a, -1, c), kernel, (((2,), (1,)), ((0,), (0,))))
    prod = prod.reshape(a, a, n, th, tw, -1)
    # A^T M A: columns first (a, m, N, th, tw, O), then rows (m, m, N, th, tw, O), then into place
    col_mix = jnp.stack([_combine(t.at[q], lambda v: prod[:, v]) for q in range(m)], axis=1)
    out = jnp.stack([_combine(t.at[p], lambda u: col_mix[u]) for p in range(m)])
    out = out.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, -1)
    return out[:, :oh, :ow]
