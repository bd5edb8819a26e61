"""Convolution units: conv -> [batch norm] -> activation -> [LRN/LCN], and the depthwise-separable form."""

from __future__ import annotations

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

