"""`hog_mlp`: the traditional pipeline the lectures compare learned features against.

Histograms of oriented gradients (Dalal & Triggs 2005) are a fixed, hand-crafted first layer
(no parameters, nothing learned), followed by an MLP. Per image: centred gradients of the gray
image; each pixel votes its gradient magnitude into the two nearest of `bins` unsigned orientation
bins (0-180 degrees); votes are summed over `cell` x `cell` pixel cells; each 2x2 block of cells is
L2-Hys normalized (L2, clip at 0.2, L2 again). The features are recomputed inside the step rather
than cached once per dataset: they cost a few elementwise passes, far less than the MLP, and stay
correct under augmentation.
"""

import math

import jax
import jax.numpy as jnp

from cnncli.errors import UserError
from cnncli.models.layers import Dense, Layer, StackBuilder, global_windows
from cnncli.models.registry import DEFAULT_INPUTS, MNIST_INPUT, MODELS

BINS = 9
BLOCK = 2  # cells per block side
HYS_CLIP = 0.2
EPS = 1e-6  # keeps sqrt differentiable at zero gradient (attacks differentiate through the features)
NORM_EPS = 1e-2  # block normalization floor: a flat region stays ~0 instead of amplifying rounding noise
SMALL_CELL, LARGE_CELL = 4, 8  # 4-pixel cells up to 32-pixel images (7x7 cells on 28x28), else Dalal-Triggs' 8


def gradient_votes(x: jax.Array, bins: int) -> jax.Array:
    """(N, H, W, bins): each pixel's gradient magnitude split between its two nearest orientation bins."""
    g = x.mean(axis=-1)
    gx = jnp.pad(g[:, :, 2:] - g[:, :, :-2], ((0, 0), (0, 0), (1, 1)))
    gy = jnp.pad(g[:, 2:, :] - g[:, :-2, :], ((0, 0), (1, 1), (0, 0)))
    magnitude = jnp.sqrt(gx * gx + gy * gy + EPS * EPS) - EPS  # exactly 0 on flat regions
    angle = jnp.mod(jnp.arctan2(gy, gx), math.pi)
    pos = angle / (math.pi / bins) - 0.5  # bin centres at (k + 0.5) * 180/bins degrees
    lo = jnp.floor(pos)
    frac = pos - lo
    lo = jnp.mod(lo, bins).astype(jnp.int32)
    return (jax.nn.one_hot(lo, bins) * (magnitude * (1 - frac))[..., None]
            + jax.nn.one_hot((lo + 1) % bins, bins) * (magnitude * frac)[..., None])


def cell_histograms(votes: jax.Array, cell: int, stride: int) -> jax.Array:
    """Votes summed over `cell` x `cell` windows every `stride` pixels (stride divides cell): (N, ch, cw, bins)."""
    n, h, w, bins = votes.shape
    hs, ws = h // stride, w // stride
    blocks = votes[:, : hs * stride, : ws * stride].reshape(n, hs, stride, ws, stride, bins).sum(axis=(2, 4))
    k = cell // stride  # a cell is k x k stride blocks
    ch, cw = hs - k + 1, ws - k + 1
    return sum(blocks[:, i: i + ch, j: j + cw] for i in range(k) for j in range(k))


def block_descriptors(hist: jax.Array, step: int) -> jax.Array:
    """L2-Hys normalized BLOCK x BLOCK groups of cells `step` cells apart: (N, bh, bw, BLOCK^2 * bins)."""
    _, ch, cw, _ = hist.shape
    bh, bw = ch - (BLOCK - 1) * step, cw - (BLOCK - 1) * step
    blocks = jnp.concatenate([hist[:, i * step: i * step + bh, j * step: j * step + bw]
                              for i in range(BLOCK) for j in range(BLOCK)], axis=-1)
    blocks = blocks / jnp.sqrt(jnp.sum(blocks**2, axis=-1, keepdims=True) + NORM_EPS**2)
    blocks = jnp.minimum(blocks, HYS_CLIP)
    return blocks / jnp.sqrt(jnp.sum(blocks**2, axis=-1, keepdims=True) + NORM_EPS**2)


class HoG(Layer):
    """Fixed HoG feature extractor: (N, H, W, C) -> (N, blocks * BLOCK^2 * bins)."""

    kind = "hog"

    def __init__(self, cell: int = SMALL_CELL, bins: int = BINS):
        self.cell, self.bins = cell, bins

    def _cells(self, shape):
        _, h, w, _ = shape
        ch, cw = h // self.cell, w // self.cell
        if ch < BLOCK or cw < BLOCK:
            raise UserError(f"a {h}x{w} image has fewer than {BLOCK}x{BLOCK} cells of {self.cell} pixels; "
                            f"use a smaller cell")
        return ch, cw

    def output_shape(self, shape):
        ch, cw = self._cells(shape)
        return (shape[0], (ch - BLOCK + 1) * (cw - BLOCK + 1) * BLOCK * BLOCK * self.bins)

    def forward(self, x):
        ch, cw = self._cells(x.shape)
        hist = cell_histograms(gradient_votes(x, self.bins), self.cell, self.cell)[:, :ch, :cw]
        return block_descriptors(hist, 1).reshape(x.shape[0], -1)

    def windows(self, in_shape):
        return global_windows(in_shape)

    def describe(self):
        return f"HoG {self.cell}px cells, {self.bins} bins, {BLOCK}x{BLOCK} blocks"


@MODELS.register("hog_mlp", help="hand-crafted HoG features (fixed) + MLP: the pre-deep-learning baseline")
def hog_mlp(*, input_shape, num_classes, rngs, cell=None, bins=BINS, hidden=(256,), activation="relu",
            dropout=0.0):
    cell = cell or (SMALL_CELL if max(input_shape[:2]) <= 32 else LARGE_CELL)
    b = StackBuilder(input_shape)
    b.add("hog", HoG(cell, bins))
    for i, width in enumerate(hidden, start=1):
        b.add(f"fc{i}", Dense(b.features, int(width), act=activation, dropout=dropout if i > 1 else 0.0, rngs=rngs))
    b.add(f"fc{len(hidden) + 1}", Dense(b.features, num_classes, dropout=dropout if hidden else 0.0, rngs=rngs))
    return b.build()


DEFAULT_INPUTS["hog_mlp"] = MNIST_INPUT
