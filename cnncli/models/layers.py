"""Building blocks shared by every model family.

Every block that should appear as a row of `cnncli summary` is a `Layer`: it knows its output
shape for an input shape (so builders can size the next layer and report impossible
configurations before anything runs), its multiply-accumulates, and its spatial window (for the
receptive field). When a `Recorder` is active (see `cnncli.analysis`), each layer reports itself as
it runs, so the per-layer table is derived from the real forward pass of every family, branches
and residual additions included. Outside a recorder the only cost is one context-variable lookup
at trace time; nothing changes in the compiled step.

Conventions (kept so that torchvision weights map over directly): images are NHWC, convolution
kernels HWIO, dense kernels (in, out), batch norm = `nnx.BatchNorm` (scale, bias, mean, var) with
PyTorch's momentum 0.1 and eps 1e-5.

Pooling note (measured on the 2-core CPU, see DESIGN.md): XLA's gradient of `reduce_window`
max-pooling (select-and-scatter) is ~3x slower than pooling written as reshape + max, so
non-overlapping pools take the reshape path (with its own gradient, `cnncli.ops.pool`) and
overlapping ones a max over strided slices; neither uses select-and-scatter. A convolution's ReLU
runs after the max-pool that follows it (`activates_after_pool`).
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from cnncli.errors import UserError
from cnncli.ops.conv import conv2d
from cnncli.ops.pool import window_max
from cnncli.registry import Registry

BN_MOMENTUM = 0.9  # flax's momentum is PyTorch's 1 - 0.1
BN_EPS = 1e-5
MAXOUT_PIECES = 2  # linear pieces per maxout unit (Goodfellow et al. 2013 used 2-5)
PRELU_INIT = 0.25  # He et al. 2015
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0  # AlexNet paper, section 3.3
LCN_SIZE, LCN_SIGMA = 9, 2.0  # Jarrett et al. 2009: 9x9 Gaussian window
LEAKY_SLOPE = 0.01

# Convolutions: He initialization over fan-out as torchvision's VGG/ResNet; dense layers: PyTorch's
# default uniform(+-1/sqrt(fan_in)), i.e. variance 1/(3 fan_in).
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
DENSE_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# ----------------------------------------------------------------------------- activations

ACTIVATIONS = Registry("activation")
ACTIVATIONS.register("relu", jax.nn.relu, help="max(0, x)")
ACTIVATIONS.register("sigmoid", jax.nn.sigmoid, help="1 / (1 + exp(-x))")
ACTIVATIONS.register("tanh", jnp.tanh, help="hyperbolic tangent")
ACTIVATIONS.register("leaky_relu", lambda x: jax.nn.leaky_relu(x, LEAKY_SLOPE), help="max(0.01 x, x)")
ACTIVATIONS.register("elu", jax.nn.elu, help="x if x > 0 else exp(x) - 1")
ACTIVATIONS.register("gelu", jax.nn.gelu, help="Gaussian error linear unit (tanh approximation)")
ACTIVATIONS.register("prelu", None, help="max(0, x) + a * min(0, x), one learned slope a per channel")
ACTIVATIONS.register("maxout", None, help=f"max over {MAXOUT_PIECES} linear pieces (the layer before "
                                          f"produces {MAXOUT_PIECES}x the channels)")
ACTIVATIONS.register("identity", lambda x: x, help="no activation")

NORMS = ("batch", "lrn", "lcn", "none")
POOLS = ("max", "avg", "l2", "conv")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise activation `name` (prelu and maxout need a layer: use `make_activation`)."""
    fn = ACTIVATIONS.get(name)
    if fn is None:
        raise UserError(f"activation '{name}' has parameters or changes the width; use it inside a layer")
    return fn


def act_pieces(name: str | None) -> int:
    """How many linear outputs the layer before activation `name` needs per output channel."""
    return MAXOUT_PIECES if name == "maxout" else 1


class PReLU(nnx.Module):
    """Parametric ReLU with one learned negative slope per channel (He et al. 2015)."""

    def __init__(self, channels: int):
        self.alpha = nnx.Param(jnp.full((channels,), PRELU_INIT, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.where(x >= 0, x, self.alpha[...] * x)


def maxout(x: jax.Array, pieces: int = MAXOUT_PIECES) -> jax.Array:
    """Max over groups of `pieces` consecutive channels: (..., C * pieces) -> (..., C)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // pieces, pieces).max(axis=-1)


def make_activation(name: str | None, channels: int):
    """An activation callable for a layer with `channels` outputs (after maxout's reduction)."""
    if name is None or name == "identity":
        return None
    if name == "prelu":
        return PReLU(channels)
    if name == "maxout":
        return maxout
    return activation(name)


# ----------------------------------------------------------------------------- normalization


class LRN(nnx.Module):
    """Local response normalization across channels, as in the AlexNet paper (section 3.3).

    b = a / (k + alpha * sum_{n neighbouring channels} a^2) ** beta. PyTorch's LocalResponseNorm
    divides alpha by n; the paper (and Caffe's AlexNet reproduction with alpha/n) differ only in
    that constant.
    """

    def __init__(self, size: int = LRN_SIZE, alpha: float = LRN_ALPHA, beta: float = LRN_BETA, k: float = LRN_K):
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def __call__(self, x: jax.Array) -> jax.Array:
        pad = (self.size // 2, (self.size - 1) // 2)
        sq = lax.reduce_window(x * x, 0.0, lax.add, (1, 1, 1, self.size), (1, 1, 1, 1),
                               ((0, 0), (0, 0), (0, 0), pad))
        return x / (self.k + self.alpha * sq) ** self.beta


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


class LCN(nnx.Module):
    """Local contrast normalization (Jarrett et al. 2009), used by ZFNet after its first layers.

    Subtractive step: remove the Gaussian-weighted local mean taken over all channels; divisive
    step: divide by the local standard deviation, floored at its mean over the image so that flat
    regions are not amplified. No parameters.
    """

    def __init__(self, size: int = LCN_SIZE, sigma: float = LCN_SIGMA):
        self.size, self.sigma = size, sigma

    def _smooth(self, x: jax.Array) -> jax.Array:
        window = jnp.asarray(_gaussian_window(self.size, self.sigma))[:, :, None, None]
        return lax.conv_general_dilated(x.mean(axis=-1, keepdims=True), window, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def __call__(self, x: jax.Array) -> jax.Array:
        v = x - self._smooth(x)
        sigma = jnp.sqrt(self._smooth(v * v) + 1e-12)
        floor = jnp.maximum(sigma.mean(axis=(1, 2, 3), keepdims=True), 1e-4)
        return v / jnp.maximum(sigma, floor)


def make_norm(kind: str | None, channels: int, rngs: nnx.Rngs):
    """A normalization module by name; `None`/'none' gives None."""
    if kind is None or kind == "none":
        return None
    if kind == "batch":
        return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPS, rngs=rngs)
    if kind == "lrn":
        return LRN()
    if kind == "lcn":
        return LCN()
    from cnncli.errors import suggest

    raise UserError(f"unknown norm '{kind}'{suggest(kind, NORMS)}; known: {', '.join(NORMS)}")


# ----------------------------------------------------------------------------- window geometry


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise UserError(f"expected one number or a pair [height, width], got {list(v)}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _padding_pair(p) -> tuple:
    if isinstance(p, str):
        p = p.lower()
        if p not in ("same", "valid"):
            raise UserError(f"padding must be 'same', 'valid' or a number of pixels, got '{p}'")
        return p, p
    return _pair(p)


@dataclass(frozen=True)
class Window:
    """The spatial footprint of a layer along one axis: what the receptive-field recursion needs.

    kernel is the effective (dilated) extent, pad the padding before the first pixel.
    """

    kernel: int
    stride: int
    pad: int


def resolve_axis(size: int, kernel: int, stride: int, dilation: int, padding, *, ceil: bool = False,
                 exact: bool = False) -> tuple[int, int, int]:
    """Output size and (low, high) padding of a window sliding along one axis.

    Follows out = (W - F + 2P) / S + 1 with the dilated extent F = (K - 1) * D + 1. A window that
    does not fit in the padded input is an error. By default the division floors (PyTorch,
    trailing pixels are dropped); `exact` makes a non-integer result an error, as the lectures
    demand; `ceil` rounds up as PyTorch's ceil_mode (the last window starts inside the input).
    'same' gives ceil(W / S) outputs, padding split as TensorFlow and XLA do.
    """
    extent = (kernel - 1) * dilation + 1
    if stride < 1 or kernel < 1 or dilation < 1:
        raise UserError(f"kernel, stride and dilation must be at least 1 (got {kernel}, {stride}, {dilation})")
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + extent - size, 0)
        return out, total // 2, total - total // 2
    pad = 0 if padding == "valid" else int(padding)
    span = size + 2 * pad - extent
    if span < 0:
        raise UserError(f"a {extent}-pixel window does not fit in {size} pixels padded by {pad} "
                        f"(W - F + 2P = {size} - {extent} + 2*{pad} = {span} < 0)")
    if exact and span % stride:
        raise UserError(f"(W - F + 2P)/S + 1 = ({size} - {extent} + 2*{pad})/{stride} + 1 = "
                        f"{span / stride + 1:.2f} is not an integer: the window does not tile the input; "
                        f"change the padding or the stride")
    if ceil:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + pad:  # PyTorch: the last window must start inside the input or left pad
            out -= 1
        return out, pad, max((out - 1) * stride + extent - size - pad, pad)
    return span // stride + 1, pad, pad


# ----------------------------------------------------------------------------- recording

_RECORDER: contextvars.ContextVar[Any] = contextvars.ContextVar("cnncli_layer_recorder", default=None)


def recording(recorder) -> contextvars.Token:
    """Make `recorder` receive `record(layer, inputs, output)` from every Layer call (see analysis).

    `record` returns None, or an array of the output's shape that the layer returns instead.
    """
    return _RECORDER.set(recorder)


def stop_recording(token: contextvars.Token) -> None:
    _RECORDER.reset(token)


def is_recording() -> bool:
    """True while the analysis traces the network (optional branches then show in its table)."""
    return _RECORDER.get() is not None


class Layer(nnx.Module):
    """A block that is one row of the per-layer analysis.

    Subclasses implement `forward`, `output_shape` (batched NHWC or (N, F) shapes), and where it
    applies `macs` and `windows` (None: the layer does not move or widen the receptive field).
    """

    kind = "layer"

    def __call__(self, *xs: jax.Array) -> jax.Array:
        y = self.forward(*xs)
        recorder = _RECORDER.get()
        if recorder is not None:
            # A recorder may return a replacement output (Grad-CAM adds a zero tap to take the
            # gradient with respect to this layer's output); None keeps the output as it is.
            replaced = recorder.record(self, xs, y)
            if replaced is not None:
                y = replaced
        return y

    def forward(self, *xs: jax.Array) -> jax.Array:
        raise NotImplementedError

    def output_shape(self, *shapes: tuple[int, ...]) -> tuple[int, ...]:
        return shapes[0]

    def macs(self, in_shapes: Sequence[tuple[int, ...]], out_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates per image."""
        return 0

    def windows(self, in_shape: tuple[int, ...]) -> tuple[Window, Window] | None:
        return None

    def describe(self) -> str:
        return self.kind


def _suffix(norm: str | None, act: str | None, dropout: float = 0.0) -> str:
    parts = []
    if dropout:
        parts.append(f"dropout {dropout:g} in")
    if norm and norm != "none":
        parts.append(norm if norm != "batch" else "bn")
    if act and act != "identity":
        parts.append(act)
    return (" +" + "+".join(parts)) if parts else ""


def _spatial(shape: tuple[int, ...], what: str) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise UserError(f"{what} needs an image-shaped input (H x W x C), got a flat vector of {shape[-1]}")
    return shape


class Conv(Layer):
    """Convolution unit: conv -> [batch norm] -> activation -> [LRN/LCN].

    Batch norm sits before the activation (Ioffe & Szegedy; torchvision); LRN and LCN after it, as
    AlexNet and ZFNet place them. With maxout the convolution produces `MAXOUT_PIECES` times
    `out_channels` and the activation reduces them. `exact` rejects a window that does not tile
    the input (the lectures' rule); by default trailing pixels are dropped as PyTorch does.
    """

    kind = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel=3, *, stride=1, padding="same", dilation=1,
                 groups: int = 1, bias: bool | None = None, norm: str | None = None, act: str | None = "relu",
                 exact: bool = False, rngs: nnx.Rngs):
        if in_channels % groups or out_channels % groups:
            raise UserError(f"groups={groups} must divide the input ({in_channels}) and output "
                            f"({out_channels}) channels")
        pieces = act_pieces(act)
        self.kernel_size, self.stride, self.dilation = _pair(kernel), _pair(stride), _pair(dilation)
        self.padding, self.groups, self.exact = _padding_pair(padding), groups, exact
        self.in_channels, self.out_channels, self.pieces = in_channels, out_channels, pieces
        self.norm_name, self.act_name = norm, act
        width = out_channels * pieces
        kh, kw = self.kernel_size
        self.kernel = nnx.Param(CONV_INIT(rngs.params(), (kh, kw, in_channels // groups, width), jnp.float32))
        use_bias = norm != "batch" if bias is None else bias  # a bias before batch norm is cancelled by it
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32)) if use_bias else None
        self.bn = make_norm(norm, width, rngs) if norm == "batch" else None
        self.post_norm = make_norm(norm, out_channels, rngs) if norm in ("lrn", "lcn") else None
        self.act = make_activation(act, out_channels)

    def _resolve(self, shape):
        n, h, w, _ = _spatial(shape, "a convolution")
        return [resolve_axis(size, k, s, d, p, exact=self.exact)
                for size, k, s, d, p in zip((h, w), self.kernel_size, self.stride, self.dilation, self.padding,
                                            strict=True)]

    def _check_channels(self, shape):
        if shape[-1] != self.in_channels:
            raise UserError(f"expects {self.in_channels} input channels, got {shape[-1]}")

    def output_shape(self, shape):
        self._check_channels(shape)
        (oh, _, _), (ow, _, _) = self._resolve(shape)
        return (shape[0], oh, ow, self.out_channels)

    def forward(self, x):
        y = self.pre_activation(x)
        if self.act is not None:
            y = self.act(y)
        if self.post_norm is not None:
            y = self.post_norm(y)
        return y

    def pre_activation(self, x):
        """The convolution, its bias and batch norm: everything before the activation."""
        (_, ph0, ph1), (_, pw0, pw1) = self._resolve(x.shape)
        y = conv2d(x, self.kernel[...], self.stride, ((ph0, ph1), (pw0, pw1)), self.dilation, self.groups)
        if self.bias is not None:
            y = y + self.bias[...]
        if self.bn is not None:
            y = self.bn(y)
        return y

    def macs(self, in_shapes, out_shape):
        kh, kw = self.kernel_size
        return out_shape[1] * out_shape[2] * self.out_channels * self.pieces * kh * kw * self.in_channels // self.groups

    def windows(self, in_shape):
        res = self._resolve(in_shape)
        return tuple(Window((k - 1) * d + 1, s, lo) for (_, lo, _), k, s, d in
                     zip(res, self.kernel_size, self.stride, self.dilation, strict=True))

    def describe(self):
        kh, kw = self.kernel_size
        extra = "".join([f"/{self.stride[0]}" if self.stride != (1, 1) else "",
                         f" dil {self.dilation[0]}" if self.dilation != (1, 1) else "",
                         f" groups {self.groups}" if self.groups > 1 else ""])
        return f"conv {kh}x{kw}{extra}, {self.out_channels}{_suffix(self.norm_name, self.act_name)}"


class SeparableConv(Conv):
    """Depthwise-separable convolution: a KxK depthwise conv then a 1x1 pointwise conv (one row)."""

    kind = "sepconv"

    def __init__(self, in_channels: int, out_channels: int, kernel=3, *, stride=1, padding="same", dilation=1,
                 bias: bool | None = None, norm: str | None = None, act: str | None = "relu", exact: bool = False,
                 rngs: nnx.Rngs):
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                         groups=1, bias=bias, norm=norm, act=act, exact=exact, rngs=rngs)
        kh, kw = self.kernel_size
        self.kernel = nnx.Param(CONV_INIT(rngs.params(), (kh, kw, 1, in_channels), jnp.float32))  # depthwise
        self.pointwise = nnx.Param(CONV_INIT(rngs.params(), (1, 1, in_channels, out_channels * self.pieces),
                                             jnp.float32))

    def pre_activation(self, x):
        (_, ph0, ph1), (_, pw0, pw1) = self._resolve(x.shape)
        y = lax.conv_general_dilated(x, self.kernel[...], self.stride, ((ph0, ph1), (pw0, pw1)),
                                     rhs_dilation=self.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=self.in_channels)
        y = jnp.einsum("nhwc,cd->nhwd", y, self.pointwise[0, 0])
        if self.bias is not None:
            y = y + self.bias[...]
        if self.bn is not None:
            y = self.bn(y)
        return y

    def macs(self, in_shapes, out_shape):
        kh, kw = self.kernel_size
        positions = out_shape[1] * out_shape[2]
        return positions * self.in_channels * (kh * kw + self.out_channels * self.pieces)

    def describe(self):
        return "separable " + super().describe()


class Dense(Layer):
    """Fully connected unit: [dropout on the input] -> linear -> [batch norm] -> activation.

    An image-shaped input is flattened first (NHWC order, so a torchvision FC kernel that follows a
    conv needs its input rows permuted from CHW to HWC when imported).
    """

    kind = "fc"

    def __init__(self, in_features: int, out_features: int, *, act: str | None = None, norm: str | None = None,
                 dropout: float = 0.0, bias: bool = True, rngs: nnx.Rngs):
        pieces = act_pieces(act)
        self.in_features, self.out_features, self.pieces = in_features, out_features, pieces
        self.act_name, self.norm_name, self.rate = act, norm, dropout
        self.kernel = nnx.Param(DENSE_INIT(rngs.params(), (in_features, out_features * pieces), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features * pieces,), jnp.float32)) if bias else None
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        if norm not in (None, "none", "batch"):
            raise UserError(f"a fully connected layer takes norm 'batch' or none, not '{norm}'")
        self.bn = make_norm(norm, out_features * pieces, rngs)
        self.act = make_activation(act, out_features)

    def output_shape(self, shape):
        features = math.prod(shape[1:])
        if features != self.in_features:
            raise UserError(f"expects {self.in_features} input features, got {features} "
                            f"({'x'.join(map(str, shape[1:]))})")
        return (shape[0], self.out_features)

    def forward(self, x):
        if x.ndim > 2:
            x = x.reshape(x.shape[0], -1)
        if self.dropout is not None:
            x = self.dropout(x)
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        if self.bn is not None:
            y = self.bn(y)
        if self.act is not None:
            y = self.act(y)
        return y

    def macs(self, in_shapes, out_shape):
        return self.in_features * self.out_features * self.pieces

    def windows(self, in_shape):
        return _global_windows(in_shape)

    def describe(self):
        return f"fc {self.out_features}{_suffix(self.norm_name, self.act_name, self.rate)}"


def _global_windows(in_shape):
    """A layer that sees the whole map (flatten, global pooling, FC on an image)."""
    if len(in_shape) != 4:
        return None
    return Window(in_shape[1], in_shape[1], 0), Window(in_shape[2], in_shape[2], 0)


# ----------------------------------------------------------------------------- pooling


def _pool_slices(x: jax.Array, window, stride, pads, out, init: float, combine) -> jax.Array:
    """Pool by combining the window's strided slices: no reduce_window, so no select-and-scatter
    in the gradient of max-pooling (slow on CPU, see the module docstring)."""
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
    return _pool(x, "max", _pair(window), _pair(window if stride is None else stride), _padding_pair(padding), ceil)


def avg_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding="valid", ceil: bool = False
             ) -> jax.Array:
    """Average pooling over NHWC; zero padding counts in the average (PyTorch's count_include_pad)."""
    return _pool(x, "avg", _pair(window), _pair(window if stride is None else stride), _padding_pair(padding), ceil)


def _resolve_pool(shape, window, stride, padding, ceil, exact):
    _, h, w, _ = _spatial(shape, "pooling")
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
        if kind not in POOLS:
            from cnncli.errors import suggest

            raise UserError(f"unknown pool '{kind}'{suggest(kind, POOLS)}; known: {', '.join(POOLS)}, global")
        self.pool_kind, self.window = kind, _pair(window)
        self.stride = self.window if stride is None else _pair(stride)
        self.padding, self.ceil, self.exact = _padding_pair(padding), ceil, exact
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
        n, _, _, c = _spatial(shape, "global pooling")
        return (n, c)

    def forward(self, x):
        return x.mean(axis=(1, 2)) if self.pool_kind == "avg" else x.max(axis=(1, 2))

    def windows(self, in_shape):
        return _global_windows(in_shape)

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
        n, _, _, c = _spatial(shape, "adaptive pooling")
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


def global_avg_pool(x: jax.Array) -> jax.Array:
    return x.mean(axis=(1, 2))


# ----------------------------------------------------------------------------- simple layers


class Act(Layer):
    """A standalone activation (for `sequential`); presets fold activations into their units."""

    kind = "act"

    def __init__(self, name: str, channels: int):
        self.name, self.pieces = name, act_pieces(name)
        self.fn = make_activation(name, channels // self.pieces)
        if channels % self.pieces:
            raise UserError(f"maxout needs a channel count divisible by {self.pieces}, got {channels}")

    def output_shape(self, shape):
        return (*shape[:-1], shape[-1] // self.pieces)

    def forward(self, x):
        return x if self.fn is None else self.fn(x)

    def describe(self):
        return self.name


class Norm(Layer):
    """A standalone normalization layer (batch, lrn, lcn)."""

    kind = "norm"

    def __init__(self, kind: str, channels: int, *, rngs: nnx.Rngs):
        self.name = kind
        self.norm = make_norm(kind, channels, rngs)

    def forward(self, x):
        return x if self.norm is None else self.norm(x)

    def describe(self):
        return {"batch": "batch norm", "lrn": "local response norm", "lcn": "local contrast norm"}.get(self.name,
                                                                                                         self.name)


class Dropout(Layer):
    """Standalone dropout: active in `model.train()` mode, the identity in `model.eval()` mode."""

    kind = "dropout"

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = rate
        self.dropout = nnx.Dropout(rate, rngs=rngs)

    def forward(self, x):
        return self.dropout(x)

    def describe(self):
        return f"dropout {self.rate:g}"


class Flatten(Layer):
    kind = "flatten"

    def output_shape(self, shape):
        return (shape[0], math.prod(shape[1:]))

    def forward(self, x):
        return x.reshape(x.shape[0], -1)

    def windows(self, in_shape):
        return _global_windows(in_shape)


class Concat(Layer):
    """Channel concatenation of parallel branches (Inception)."""

    kind = "concat"

    def output_shape(self, *shapes):
        if len({s[:-1] for s in shapes}) != 1:
            raise UserError(f"branches to concatenate have different sizes: {', '.join(map(str, shapes))}")
        return (*shapes[0][:-1], sum(s[-1] for s in shapes))

    def forward(self, *xs):
        return jnp.concatenate(xs, axis=-1)


class Add(Layer):
    """Residual addition followed by an optional activation (ResNet: relu(F(x) + shortcut))."""

    kind = "add"

    def __init__(self, act: str | None = "relu", channels: int = 0):
        self.act_name = act
        self.act = make_activation(act, channels) if act != "maxout" else None
        if act == "maxout":
            raise UserError("maxout cannot follow a residual addition (it would halve the channels)")

    def output_shape(self, *shapes):
        if len(set(shapes)) != 1:
            raise UserError(f"residual branches have different shapes: {', '.join(map(str, shapes))}")
        return shapes[0]

    def forward(self, *xs):
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return y if self.act is None else self.act(y)

    def describe(self):
        return f"add{_suffix(None, self.act_name)}"


class ShortcutA(Layer):
    """The ResNet paper's parameter-free shortcut (option A): subsample by the stride and pad the
    new channels with zeros."""

    kind = "shortcut"

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def output_shape(self, shape):
        n, h, w, _ = shape
        return (n, -(-h // self.stride), -(-w // self.stride), self.out_channels)

    def forward(self, x):
        x = x[:, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))

    def windows(self, in_shape):
        return Window(1, self.stride, 0), Window(1, self.stride, 0)

    def describe(self):
        return f"shortcut A /{self.stride}, {self.out_channels}"


# ----------------------------------------------------------------------------- containers


# Activations f with max(f(a), f(b)) == f(max(a, b)) exactly, in floating point too.
ORDER_PRESERVING = ("relu", "leaky_relu")


def activates_after_pool(layer: nnx.Module, following: nnx.Module) -> bool:
    """Whether a convolution's activation may run after the max-pool that follows it.

    The values are the same (the activation preserves order, so it commutes with the maximum), and
    the activation and its gradient then cover a quarter of the pixels. With the max-pool's own
    gradient (`cnncli.ops.pool`) LeNet-5 trained 1.16x faster: its first convolution is stored once
    for the pool's gradient instead of recomputed for the activation's. Not while a recorder
    watches, so that every layer reports its own output.
    """
    return (isinstance(layer, Conv) and isinstance(following, Pool) and following.pool_kind == "max"
            and layer.act_name in ORDER_PRESERVING and layer.post_norm is None and _RECORDER.get() is None)


class Stack(nnx.Module):
    """Named layers applied in order; the names become the layer names of the analysis."""

    def __init__(self, layers: Sequence[tuple[str, nnx.Module]]):
        names = []
        for name, layer in layers:
            if not name.isidentifier() or hasattr(self, name):
                raise ValueError(f"bad or duplicate layer name '{name}'")
            setattr(self, name, layer)
            names.append(name)
        self.order = tuple(names)

    def __call__(self, x: jax.Array) -> jax.Array:
        layers = [getattr(self, name) for name in self.order]
        i = 0
        while i < len(layers):
            if i + 1 < len(layers) and activates_after_pool(layers[i], layers[i + 1]):
                conv, pool = layers[i], layers[i + 1]
                x = conv.act(pool(conv.pre_activation(x)))
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x

    def output_shape(self, shape):
        for name in self.order:
            shape = getattr(self, name).output_shape(shape)
        return shape


class StackBuilder:
    """Builds a Stack layer by layer, tracking the shape so each layer is sized from the one before.

    A layer that cannot take the current shape raises a UserError naming it and the sizes.
    """

    def __init__(self, input_shape: tuple[int, int, int], *, context: str = "layer"):
        self.shape: tuple[int, ...] = (1, *input_shape)
        self.items: list[tuple[str, nnx.Module]] = []
        self.context = context

    @property
    def channels(self) -> int:
        return self.shape[-1]

    @property
    def features(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def spatial(self) -> tuple[int, int] | None:
        return tuple(self.shape[1:3]) if len(self.shape) == 4 else None

    def add(self, name: str, layer: nnx.Module, *, label: str | None = None) -> nnx.Module:
        """Append `layer` as `name`; errors call it `label` (default: '<context> <name>')."""
        label = label or f"{self.context} {name}"
        try:
            out = layer.output_shape(self.shape)
        except UserError as e:
            raise UserError(f"{label} (input {_fmt_shape(self.shape)}): {e}") from None
        if len(out) == 4 and (out[1] < 1 or out[2] < 1):
            raise UserError(f"{label}: the input {_fmt_shape(self.shape)} shrinks to "
                            f"{_fmt_shape(out)}; use a larger input or fewer downsampling layers")
        self.shape = out
        self.items.append((name, layer))
        return layer

    def build(self) -> Stack:
        return Stack(self.items)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape[1:]))


# ----------------------------------------------------------------------------- model boundary


class Constant(nnx.Variable):
    """A non-trainable array that belongs to the model and its checkpoint (e.g. input mean/std)."""


class Normalize(nnx.Module):
    """(x - mean) / std per channel: the first op of every cnncli model (inputs are pixels in [0, 1])."""

    def __init__(self, channels: int, mean=None, std=None):
        self.mean = Constant(jnp.broadcast_to(jnp.asarray(0.0 if mean is None else mean, jnp.float32), (channels,)))
        self.std = Constant(jnp.broadcast_to(jnp.asarray(1.0 if std is None else std, jnp.float32), (channels,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return (x - self.mean[...]) / self.std[...]


class Classifier(nnx.Module):
    """A network behind its input normalization: pixels in [0, 1] -> logits."""

    def __init__(self, net: nnx.Module, *, channels: int, mean=None, std=None):
        self.normalize = Normalize(channels, mean, std)
        self.net = net

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net(self.normalize(x))
