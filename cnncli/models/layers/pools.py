"""Pooling layers: max, average, L2 and strided-convolution pools, global and adaptive pooling.

XLA's gradient of `reduce_window` max-pooling (select-and-scatter) is slow on CPU (see
docs/performance.md), so non-overlapping pools take the reshape path (with its own gradient,
`cnncli.ops.pool`) and overlapping ones a max over strided slices; neither uses select-and-scatter.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from cnncli.models.layers.core import (
    CONV_INIT,
    Layer,
    Window,
    global_windows,
    padding_pair,
    pair,
    resolve_axis,
    spatial_shape,
)
from cnncli.ops.pool import window_max
from cnncli.registry import Registry

# The pooling kinds `Pool` takes by name, each registered with whether it has learned weights.
POOLS = Registry("pool")
POOLS.register("max", False, help="maximum over the window")
POOLS.register("avg", False, help="mean over the window (zero padding counts)")
POOLS.register("l2", False, help="square root of the sum of squares over the window")
POOLS.register("conv", True, help="a learned strided convolution with the pool's window, keeping the channels")


def _pool_slices(x: jax.Array, window, stride, pads, out, init: float, combine) -> jax.Array:
    """Pool by combining the window's strided slices: no reduce_window, so no select-and-scatter
    in the gradient of max-pooling (slow on CPU)."""
    (kh, kw), (sh, sw) = window, stride
    (ph0, ph1), (pw0, pw1) = pads
    if any((ph0, ph1, pw0, pw1)):
        x = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)), constant_values=init)
    oh, ow = out
    acc = None
    for i in range(kh):
        for j in range(kw):
            s = x[:, i: i + (oh - 1) * sh + 1: sh, j: j + (ow - 1) * sw + 1: sw]
            acc = s if acc is None else combine(acc, s)
    return acc


def max_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding="valid", ceil: bool = False
             ) -> jax.Array:
    """Max pooling over NHWC (square window); padding never wins the max."""
    return _pool(x, "max", pair(window), pair(window if stride is None else stride), padding_pair(padding), ceil)


def avg_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding="valid", ceil: bool = False
             ) -> jax.Array:
    """Average pooling over NHWC; zero padding counts in the average (PyTorch's count_include_pad)."""
    return _pool(x, "avg", pair(window), pair(window if stride is None else stride), padding_pair(padding), ceil)


def _resolve_pool(shape, window, stride, padding, ceil, exact):
    _, h, w, _ = spatial_shape(shape, "pooling")
    return [resolve_axis(size, k, s, 1, p, ceil=ceil, exact=exact)
            for size, k, s, p in zip((h, w), window, stride, padding, strict=True)]


def _pool(x, kind, window, stride, padding, ceil, exact=False):
    (oh, ph0, ph1), (ow, pw0, pw1) = _resolve_pool(x.shape, window, stride, padding, ceil, exact)
    n, h, w, c = x.shape
    if kind == "l2":
        summed = _pool(x * x, "avg", window, stride, padding, ceil) * (window[0] * window[1])
        return jnp.sqrt(summed + 1e-12)
    init = -jnp.inf if kind == "max" else 0.0
    if window == stride and ph0 == pw0 == 0:
        # Non-overlapping: crop (floor) or pad (ceil) to whole windows, then reshape and reduce.
        th, tw = oh * window[0], ow * window[1]
        x = x[:, :min(h, th), :min(w, tw)]
        if th > h or tw > w:
            x = jnp.pad(x, ((0, 0), (0, max(th - h, 0)), (0, max(tw - w, 0)), (0, 0)), constant_values=init)
        x = x.reshape(n, oh, window[0], ow, window[1], c)
        return window_max(x) if kind == "max" else x.mean(axis=(2, 4))
    combine = jnp.maximum if kind == "max" else jnp.add
    y = _pool_slices(x, window, stride, ((ph0, ph1), (pw0, pw1)), (oh, ow), init, combine)
    return y if kind == "max" else y / (window[0] * window[1])


class Pool(Layer):
    """Spatial pooling: max, avg, l2 (sqrt of the sum of squares), or conv (a learned strided
    convolution with the pool's window and stride, keeping the channel count)."""

    kind = "pool"

    def __init__(self, kind: str = "max", window=2, stride=None, *, padding=0, ceil: bool = False,
                 exact: bool = False, channels: int | None = None, rngs: nnx.Rngs | None = None):
        POOLS.get(kind)
        self.pool_kind, self.window = kind, pair(window)
        self.stride = self.window if stride is None else pair(stride)
        self.padding, self.ceil, self.exact = padding_pair(padding), ceil, exact
        if kind == "conv":
            if channels is None or rngs is None:
                raise ValueError("a strided-convolution pool needs channels and rngs")
            kh, kw = self.window
            self.kernel = nnx.Param(CONV_INIT(rngs.params(), (kh, kw, channels, channels), jnp.float32))
            self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def _resolve(self, shape):
        return _resolve_pool(shape, self.window, self.stride, self.padding, self.ceil, self.exact)

    def output_shape(self, shape):
        (oh, _, _), (ow, _, _) = self._resolve(shape)
        return (shape[0], oh, ow, shape[3])

    def forward(self, x):
        if self.pool_kind != "conv":
            return _pool(x, self.pool_kind, self.window, self.stride, self.padding, self.ceil, self.exact)
        (oh, ph0, ph1), (ow, pw0, pw1) = self._resolve(x.shape)
        y = lax.conv_general_dilated(x, self.kernel[...], self.stride, ((ph0, ph1), (pw0, pw1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...]

    def macs(self, in_shapes, out_shape):
        if self.pool_kind != "conv":
            return 0
        return math.prod(out_shape[1:]) * self.window[0] * self.window[1] * out_shape[3]

    def windows(self, in_shape):
        resolved = self._resolve(in_shape)
        return tuple(Window(k, s, lo) for (_, lo, _), k, s in zip(resolved, self.window, self.stride, strict=True))

    def describe(self):
        kh, kw = self.window
        name = "conv-pool" if self.pool_kind == "conv" else f"{self.pool_kind}pool"
        return f"{name} {kh}x{kw}/{self.stride[0]}{' ceil' if self.ceil else ''}"


class GlobalPool(Layer):
    """Global average (or max) pooling: (N, H, W, C) -> (N, C)."""

    kind = "gap"

    def __init__(self, kind: str = "avg"):
        self.pool_kind = kind

    def output_shape(self, shape):
        n, _, _, c = spatial_shape(shape, "global pooling")
        return (n, c)

    def forward(self, x):
        return x.mean(axis=(1, 2)) if self.pool_kind == "avg" else x.max(axis=(1, 2))

    def windows(self, in_shape):
        return global_windows(in_shape)

    def describe(self):
        return f"global {self.pool_kind}pool"


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging weights of torchvision's adaptive pooling along one axis: output i averages
    inputs floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1 (bins overlap or repeat when needed)."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-(i + 1) * n_in // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class AdaptiveAvgPool(Layer):
    """Average pooling to a fixed output size, as torchvision's AdaptiveAvgPool2d: the identity when the
    sizes already match (the usual 224-pixel case), plain pooling for multiples of the size, and
    torchvision's overlapping or repeating bins otherwise (so imported VGGs take any input size)."""

    kind = "pool"

    def __init__(self, size: int):
        self.size = size

    def output_shape(self, shape):
        n, _, _, c = spatial_shape(shape, "adaptive pooling")
        return (n, self.size, self.size, c)

    def forward(self, x):
        h, w = x.shape[1:3]
        if (h, w) == (self.size, self.size):
            return x
        if h == w and h % self.size == 0:
            return avg_pool(x, h // self.size)
        rows, cols = adaptive_pool_matrix(h, self.size), adaptive_pool_matrix(w, self.size)
        return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x)

    def windows(self, in_shape):
        return tuple(Window(-(-n // self.size), max(n // self.size, 1), 0) for n in in_shape[1:3])

    def describe(self):
        return f"adaptive avgpool {self.size}x{self.size}"
