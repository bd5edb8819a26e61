"""Convolution units: conv -> [batch norm] -> activation -> [LRN/LCN], the depthwise-separable form, and the
locally connected layer (a convolution's windows without weight sharing)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from cnncli.errors import UserError
from cnncli.models.layers.activations import act_pieces, make_activation
from cnncli.models.layers.core import (
    CONV_INIT,
    Layer,
    Window,
    describe_suffix,
    padding_pair,
    pair,
    resolve_axis,
    spatial_shape,
)
from cnncli.models.layers.norms import make_norm
from cnncli.ops.conv import conv2d


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
        self.kernel_size, self.stride, self.dilation = pair(kernel), pair(stride), pair(dilation)
        self.padding, self.groups, self.exact = padding_pair(padding), groups, exact
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
        n, h, w, _ = spatial_shape(shape, "a convolution")
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
        return f"conv {kh}x{kw}{extra}, {self.out_channels}{describe_suffix(self.norm_name, self.act_name)}"


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



def window_patches(x: jax.Array, kernel: tuple[int, int], stride: tuple[int, int], pads, out_hw) -> jax.Array:
    """(N, oh, ow, C * kh * kw) windows of NHWC `x`, channel-major as `lax.conv_general_dilated_patches`.

    Made of kh * kw strided slices: conv_general_dilated_patches is a convolution with a one-hot filter,
    (kh kw C)^2 multiplications per position for a copy (benchmarks/local_patches.py, docs/curriculum.md).
    """
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out_hw
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    cols = [xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw, :] for i in range(kh) for j in range(kw)]
    return jnp.stack(cols, axis=-1).reshape(*x.shape[:1], oh, ow, x.shape[-1] * kh * kw)


class LocallyConnected(Layer):
    """A locally connected layer: a convolution's windows, but a different filter at every output position.

    The lectures' contrast with a convolution: both are local, neither shares weights here, so a
    200x200 input with 10x10 windows and one output map (40K hidden units) has 40K x 100 = 4M
    weights, against 100 x 100 = 10K for 100 shared 10x10 filters. The kernel is (out_h, out_w,
    kh * kw * in_channels, out_channels) with the window's features in channel-major order (what
    `lax.conv_general_dilated_patches` produces); the bias is per position and channel, as in
    Keras' LocallyConnected2D. Same windows, MACs and receptive field as the convolution.
    """

    kind = "local"

    def __init__(self, in_channels: int, out_channels: int, kernel=3, *, input_hw: tuple[int, int], stride=1,
                 padding="same", bias: bool = True, norm: str | None = None, act: str | None = "relu",
                 exact: bool = False, rngs: nnx.Rngs):
        if norm not in (None, "none"):
            raise UserError(f"a locally connected layer takes no norm (got '{norm}'): add a norm layer after it")
        self.kernel_size, self.stride, self.padding = pair(kernel), pair(stride), padding_pair(padding)
        self.in_channels, self.out_channels, self.exact, self.act_name = in_channels, out_channels, exact, act
        (oh, _, _), (ow, _, _) = self._resolve((1, *input_hw, in_channels))
        self.out_hw = (oh, ow)
        kh, kw = self.kernel_size
        fan_in = kh * kw * in_channels
        # He initialization over fan-out, as a convolution's (CONV_INIT): one filter per position.
        std = (2.0 / (kh * kw * out_channels)) ** 0.5
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (oh, ow, fan_in, out_channels), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((oh, ow, out_channels), jnp.float32)) if bias else None
        self.act = make_activation(act, out_channels)
        if act_pieces(act) != 1:
            raise UserError("maxout is not supported after a locally connected layer")

    def _resolve(self, shape):
        n, h, w, _ = spatial_shape(shape, "a locally connected layer")
        return [resolve_axis(size, k, s, 1, p, exact=self.exact)
                for size, k, s, p in zip((h, w), self.kernel_size, self.stride, self.padding, strict=True)]

    def output_shape(self, shape):
        if shape[-1] != self.in_channels:
            raise UserError(f"expects {self.in_channels} input channels, got {shape[-1]}")
        (oh, _, _), (ow, _, _) = self._resolve(shape)
        if (oh, ow) != self.out_hw:
            raise UserError(f"was built for a {self.out_hw[0]}x{self.out_hw[1]} output (unshared weights fix the "
                            f"input size), got an input of {shape[1]}x{shape[2]}")
        return (shape[0], oh, ow, self.out_channels)

    def forward(self, x):
        (_, ph0, ph1), (_, pw0, pw1) = self._resolve(x.shape)
        patches = window_patches(x, self.kernel_size, self.stride, ((ph0, ph1), (pw0, pw1)), self.out_hw)
        y = jnp.einsum("nhwk,hwkc->nhwc", patches, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y if self.act is None else self.act(y)

    def macs(self, in_shapes, out_shape):
        kh, kw = self.kernel_size
        return out_shape[1] * out_shape[2] * self.out_channels * kh * kw * self.in_channels

    def windows(self, in_shape):
        return tuple(Window(k, s, lo) for (_, lo, _), k, s in zip(self._resolve(in_shape), self.kernel_size,
                                                                     self.stride, strict=True))

    def describe(self):
        kh, kw = self.kernel_size
        extra = f"/{self.stride[0]}" if self.stride != (1, 1) else ""
        return f"local {kh}x{kw}{extra}, {self.out_channels} (unshared){describe_suffix(None, self.act_name)}"
