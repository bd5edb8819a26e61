"""The models' 2-D convolution (NHWC input, HWIO kernel) with a custom gradient that is fast on CPU.

`conv2d` is `lax.conv_general_dilated` with a `jax.custom_vjp` that picks, per layer and per
pass, the formulation that measured fastest on the 2-core CPU. Each choice is one predicate or
constant below, and docs/performance.md ("The rules") gives the measurements behind each by name:

- `is_tiny`: outputs with a side of at most `TINY_MAP` pixels are one matrix product of the windows
  every kernel tap sees (im2col), forward and both gradients, because XLA's CPU convolution
  collapses on such maps;
- `is_single_channel`: a one-channel input (a grayscale stem) is a sum over taps of broadcast
  multiply-adds, because XLA's convolution vectorises over input channels and there is one;
- `is_banded` / `is_narrow`: the input gradient of a layer with few input channels is banded
  products or one product and a sum (col2im), for the same reason in XLA's transposed convolution;
- `winograd_conv_applies`: the forward pass and input gradient of 3x3 stride-1 layers with wide,
  whole 4x4-tiled maps are Winograd F(4x4, 3x3) (`winograd.conv3x3`), a quarter of the
  multiplications;
- `winograd_weight_grad_applies`: the weight gradient of 3x3 stride-1 layers on small maps is
  Winograd too (`winograd.weight_grad3x3`), because XLA computes it slower than its forward pass;
- a 1x1 layer's weight gradient is one matrix product;
- everything else is XLA's own convolution, already near this machine's matmul rate; its input gradient is
  spelled out as the transposed convolution XLA's CPU library takes (`transposed_conv`), because XLA makes
  that rewrite itself only outside loops, and attacks loop.

A large input is read by its weight gradient as the forward pass stored it (`stored`), so that XLA
does not recompute the producers of that input inside its transposed copy.

`CNNCLI_CONV=xla` selects the plain `lax` convolution everywhere, differentiated by JAX, with XLA's
default CPU library (see `cnncli.runtime`): the baseline the fast path is measured and tested
against. The fast path is float32 only; other dtypes (bfloat16 training) take the plain
convolution, as do devices other than the CPU, whose libraries (cuDNN, TPU) choose their own
algorithms.
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnncli.errors import UserError
from cnncli.ops import winograd
from cnncli.runtime import CONV_MODE_ENV as MODE_ENV

MODES = ("fast", "xla")
_PLAIN = contextvars.ContextVar("cnncli_plain_convolutions", default=False)
DIMENSIONS = ("NHWC", "HWIO", "NHWC")
TINY_MAP = 2  # output sides up to this take im2col: XLA is fast again from 4x4 maps up
# Narrower layers (an RGB stem) leave Winograd's per-position products too small to pay for its transforms.
WINOGRAD_MIN_CHANNELS = 16
# From 32x32 maps up XLA's own weight gradient is faster: the transforms' memory traffic outweighs the savings.
WINOGRAD_MAX_MAP = 24
# Winograd forward passes pay only with per-position products at least this wide (multiples of it)...
WINOGRAD_CONV_CHANNELS = 64
# ...and on whole 4x4 tiles of maps in this range: on 4x4 maps VGG-16's step lost what the layer gained.
WINOGRAD_CONV_MAPS = (8, 32)
# Below this many input channels XLA's transposed convolution runs at a fraction of its rate.
NARROW_INPUT = 16
# The banded form does 2 * O * padded width / KW flops per element of col2im's product; above this it loses.
BANDED_MAX_FLOPS = 128
# Below this many input elements recomputing a layer's input costs less than the conditional of `stored`.
STORE_MIN_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Geometry:
    """Everything about a convolution but its arrays (hashable: it is a static argument of the VJP)."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def padded_hw(self, in_hw) -> tuple[int, int]:
        return tuple(size + lo + hi for size, (lo, hi) in zip(in_hw, self.padding, strict=True))

    def output_hw(self, in_hw, kernel_hw) -> tuple[int, int]:
        return tuple((size + lo + hi - d * (k - 1) - 1) // s + 1 for size, (lo, hi), d, k, s
                     in zip(in_hw, self.padding, self.dilation, kernel_hw, self.stride, strict=True))


@contextmanager
def plain_convolutions():
    """Trace every convolution as the plain `lax` op inside this block, whatever CNNCLI_CONV says.

    For exports (ONNX, StableHLO): other runtimes and devices should see one standard convolution, not
    the forms that are fastest on this CPU.
    """
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


def conv_mode() -> str:
    """'fast' (default) or 'xla', from the CNNCLI_CONV environment variable ('xla' inside `plain_convolutions`)."""
    if _PLAIN.get():
        return "xla"
    mode = os.environ.get(MODE_ENV, "fast")
    if mode not in MODES:
        raise UserError(f"{MODE_ENV}={mode} is not a convolution mode; use one of {', '.join(MODES)}")
    return mode


def conv2d(x: jax.Array, w: jax.Array, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1),
           groups: int = 1) -> jax.Array:
    """Cross-correlation of x (N, H, W, C) with w (KH, KW, C / groups, O); padding is ((low, high), (low, high))."""
    geom = Geometry(tuple(stride), tuple(tuple(p) for p in padding), tuple(dilation), groups)
    if conv_mode() == "xla" or x.dtype != jnp.float32 or w.dtype != jnp.float32 or jax.default_backend() != "cpu":
        return xla_conv(x, w, geom)
    return _conv(x, w, geom)


def xla_conv(x: jax.Array, w: jax.Array, geom: Geometry) -> jax.Array:
    """The plain convolution, differentiated by JAX."""
    return lax.conv_general_dilated(x, w, geom.stride, geom.padding, rhs_dilation=geom.dilation,
                                    dimension_numbers=DIMENSIONS, feature_group_count=geom.groups)


def tap_windows(x: jax.Array, geom: Geometry, kernel_hw, out_hw):
    """(i, j, the part of the padded x that kernel tap (i, j) sees) for every tap; x is (N, H, W, ...)."""
    (kh, kw), (oh, ow) = kernel_hw, out_hw
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (*geom.padding[0], 0), (*geom.padding[1], 0)]
                 + [(0, 0, 0)] * (x.ndim - 3))
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]


def im2col_conv(x: jax.Array, w: jax.Array, geom: Geometry) -> jax.Array:
    """The convolution as one matrix product: the input windows of all kernel taps side by side, times
    the kernel as a (KH * KW * C, O) matrix (one product rather than one per tap: fewer, larger matmuls)."""
    kh, kw, cin, out = w.shape
    oh, ow = geom.output_hw(x.shape[1:3], (kh, kw))
    cols = jnp.concatenate([seen for _, _, seen in tap_windows(x, geom, (kh, kw), (oh, ow))], axis=-1)
    y = cols.reshape(-1, kh * kw * cin) @ w.reshape(kh * kw * cin, out)
    return y.reshape(x.shape[0], oh, ow, out)


def single_channel_conv(x: jax.Array, w: jax.Array, geom: Geometry) -> jax.Array:
    """A one-channel input's convolution as a sum over taps of the window the tap sees times w[i, j, 0].

    Built channel-major, (O, N, OH, OW) with the output pixels minor, then transposed to NHWC, so
    that XLA vectorises the multiply-adds along the image rows; built NHWC with the few output
    channels minor, XLA fused the sum into the max-pool after it and ran it unvectorised.
    """
    kh, kw, _, out = w.shape
    oh, ow = geom.output_hw(x.shape[1:3], (kh, kw))
    y = None
    for i, j, seen in tap_windows(x[..., 0], geom, (kh, kw), (oh, ow)):
        tap = seen[None] * w[i, j, 0][:, None, None, None]
        y = tap if y is None else y + tap
    return y.transpose(1, 2, 3, 0)


def col2im_input_grad(x: jax.Array, w: jax.Array, g: jax.Array, geom: Geometry) -> jax.Array:
    """d(sum(conv * g)) / dx for a narrow input: the transpose of `im2col_conv`, built channel-major.

    One matrix product of the kernel and the output gradient, (KH * KW * C, O) x (O, N * OH * OW),
    is what every kernel tap sends back to the pixel it saw; the taps' parts are then padded into
    place and summed (col2im), each kernel row's taps first, then the rows. Channel-major,
    (C, N, H, W), the sums run along the image rows rather than over a few channels. The sum is
    stored: read by a max-pool's gradient, XLA would recompute it once per window position.
    """
    kh, kw, c, out = w.shape
    n, oh, ow, _ = g.shape
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    (top, bottom), (left, right) = geom.padding
    hp, wp = geom.padded_hw(x.shape[1:3])
    sent = lax.dot_general(w.reshape(-1, out), g.reshape(-1, out), (((1,), (1,)), ((), ())))
    sent = sent.reshape(kh, kw, c, n, oh, ow)
    row_sums = [sum(_placed(sent[i, j], 3, j, wp, sw, dw) for j in range(kw)) for i in range(kh)]
    padded = sum(_placed(row, 2, i, hp, sh, dh) for i, row in enumerate(row_sums))
    return stored(padded[:, :, top:hp - bottom, left:wp - right].transpose(1, 2, 3, 0), w)


def banded_input_grad(x: jax.Array, w: jax.Array, g: jax.Array, geom: Geometry) -> jax.Array:
    """d(sum(conv * g)) / dx for a narrow layer on a small map: one matrix product per image row.

    A kernel row i sends each output row back to one padded input row, through a banded matrix
    B_i[(ox, o), (x, c)] = w[i, j, c, o] where x = ox * stride + j * dilation (zero elsewhere).
    One product of the output gradient's rows, (N * OH, OW * O), with all KH bands side by side
    gives every input row's parts; the KH parts of a row are then summed. The bands are mostly
    zeros, but the product is one well-shaped matmul and the sum adds whole rows instead of
    KH * KW shifted taps. The sum is stored, as col2im's is.
    """
    kh, kw, c, out = w.shape
    n, oh, ow, _ = g.shape
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    (top, bottom), (left, right) = geom.padding
    hp, wp = geom.padded_hw(x.shape[1:3])
    seen_by = np.zeros((kw, ow, wp), np.float32)  # seen_by[j, ox, x]: tap j of output column ox reads x
    for j in range(kw):
        seen_by[j, np.arange(ow), np.arange(ow) * sw + j * dw] = 1.0
    bands = jnp.einsum("jax,ijco->aoixc", seen_by, w)
    rows = g.reshape(n * oh, ow * out) @ bands.reshape(ow * out, kh * wp * c)
    rows = rows.reshape(n, oh, kh, wp * c)
    padded = sum(_placed(rows[:, :, i], 1, i, hp, sh, dh) for i in range(kh))
    return stored(padded.reshape(n, hp, wp, c)[:, top:hp - bottom, left:wp - right], w)


def _placed(part: jax.Array, axis: int, tap: int, size: int, stride: int, dilation: int) -> jax.Array:
    """A kernel tap's part spread along `axis` to the positions, of `size` padded ones, that the tap saw."""
    config = [(0, 0, 0)] * part.ndim
    config[axis] = (tap * dilation, size - tap * dilation - (part.shape[axis] - 1) * stride - 1, stride - 1)
    return lax.pad(part, jnp.zeros((), part.dtype), config)


def is_tiny(x_shape, w_shape, geom: Geometry) -> bool:
    return geom.groups == 1 and min(geom.output_hw(x_shape[1:3], w_shape[:2])) <= TINY_MAP


def is_single_channel(w_shape, geom: Geometry) -> bool:
    return geom.groups == 1 and w_shape[2] == 1


def is_narrow(w_shape, geom: Geometry) -> bool:
    """Whether the layer has too few input channels for XLA's input gradient (`col2im_input_grad`)."""
    return geom.groups == 1 and w_shape[2] < NARROW_INPUT


def is_banded(x_shape, w_shape, geom: Geometry) -> bool:
    """Whether a narrow layer's input gradient is cheaper as banded products than as col2im."""
    kw, out = w_shape[1], w_shape[3]
    padded_width = geom.padded_hw(x_shape[1:3])[1]
    return is_narrow(w_shape, geom) and 2 * out * padded_width / kw <= BANDED_MAX_FLOPS


def _unit_stride_3x3(geom: Geometry, w_shape: tuple[int, ...]) -> bool:
    """A 3x3, stride-1, undilated, ungrouped layer padded by at most 2: the layers Winograd's tiles fit."""
    return (tuple(w_shape[:2]) == (3, 3) and geom.stride == (1, 1) and geom.dilation == (1, 1)
            and geom.groups == 1 and all(0 <= p <= 2 for pair in geom.padding for p in pair))


def winograd_weight_grad_applies(geom: Geometry, w_shape: tuple[int, ...], out_hw: tuple[int, int]) -> bool:
    """Whether a 3x3 stride-1 layer's weight gradient, for output `out_hw`, runs as `winograd.weight_grad3x3`."""
    return (_unit_stride_3x3(geom, w_shape) and min(out_hw) < WINOGRAD_MAX_MAP
            and min(w_shape[2:]) >= WINOGRAD_MIN_CHANNELS)


def winograd_conv_applies(geom: Geometry, w_shape: tuple[int, ...], out_hw: tuple[int, int]) -> bool:
    """Whether a 3x3 stride-1 layer's forward pass (or input gradient) runs as F(4x4, 3x3) (`winograd.conv3x3`).

    The forward pass is asked with the layer's output size, the input gradient with its input size.
    """
    return (_unit_stride_3x3(geom, w_shape) and all(c % WINOGRAD_CONV_CHANNELS == 0 for c in w_shape[2:])
            and all(side % 4 == 0 and WINOGRAD_CONV_MAPS[0] <= side <= WINOGRAD_CONV_MAPS[1] for side in out_hw))


def _forward(x, w, geom):
    if winograd_conv_applies(geom, w.shape, geom.output_hw(x.shape[1:3], w.shape[:2])):
        return winograd.conv3x3(x, w, geom.padding)
    if is_single_channel(w.shape, geom):
        return single_channel_conv(x, w, geom)
    if is_tiny(x.shape, w.shape, geom):
        return im2col_conv(x, w, geom)
    return xla_conv(x, w, geom)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, geom):
    return _forward(x, w, geom)


def _conv_fwd(x, w, geom):
    return _forward(x, w, geom), (x, w)


def _conv_bwd(geom, residuals, g):
    x, w = residuals
    if is_tiny(x.shape, w.shape, geom):
        return jax.vjp(lambda x_, w_: im2col_conv(x_, w_, geom), x, w)[1](g)
    x_seen = stored(x, w) if x.size >= STORE_MIN_ELEMENTS else x
    return input_grad(x, w, g, geom), weight_grad(x_seen, w, g, geom)


def stored(x: jax.Array, anchor: jax.Array) -> jax.Array:
    """x as the buffer the forward pass wrote, never recomputed inside the gradient's loops.

    A layer's input is usually cheap elementwise work on earlier buffers (batch norm, ReLU, and in a
    ResNet the residual sums of a whole stage). XLA's CPU fusion recomputes such producers inside
    every consumer, including the transposed copy its weight-gradient convolution makes of x, which
    then gathers a dozen strided inputs per element.

    XLA does not fuse across a conditional, and it cannot resolve this one at compile time: its
    predicate reads the first element of `anchor`, an array computed before x is needed (the
    convolution passes its kernel, which data-parallel steps replicate, so the predicate needs no
    communication; the max-pool passes its output). Both branches return x exactly (x * 1.0 is x
    bit for bit, infinities, zeros' signs and quiet NaNs included), so the predicate's value does
    not matter.
    `lax.optimization_barrier` would say this directly, but XLA's CPU pipeline removes it before
    fusion.
    """
    return lax.cond(anchor.reshape(-1)[0] > 0, lambda v: v, lambda v: v * 1.0, x)


_conv.defvjp(_conv_fwd, _conv_bwd)


def input_grad(x, w, g, geom: Geometry) -> jax.Array:
    """d(sum(conv * g)) / dx: XLA's own (its transposed convolution runs at the forward's rate), but for
    Winograd's layers (the same Winograd convolution of g) and narrow inputs (banded products or col2im)."""
    if winograd_conv_applies(geom, w.shape, x.shape[1:3]):
        (top, bottom), (left, right) = geom.padding
        return winograd.conv3x3(g, flipped_kernel(w), ((2 - top, 2 - bottom), (2 - left, 2 - right)))
    if is_banded(x.shape, w.shape, geom):
        return banded_input_grad(x, w, g, geom)
    if is_narrow(w.shape, geom):
        return col2im_input_grad(x, w, g, geom)
    if geom.groups == 1:
        return transposed_conv(w, g, geom, x.shape[1:3])
    return jax.vjp(lambda x_: xla_conv(x_, w, geom), x)[1](g)[0]


def flipped_kernel(w: jax.Array) -> jax.Array:
    """The kernel of the transposed convolution: taps reversed, input and output channels swapped (KH, KW, O, C)."""
    return w[::-1, ::-1].transpose(0, 1, 3, 2)


def transposed_conv(w, g, geom: Geometry, in_hw) -> jax.Array:
    """The input gradient as XLA's CPU convolution wants it: g dilated by the stride, correlated with the flipped
    kernel whose channel axes are swapped in memory (padding as in JAX's transpose rule).

    JAX's own transpose passes the kernel as (KH, KW, O, C) and leaves the swap to XLA, whose CPU compiler makes it
    only in a program's top level (its convolution canonicalization skips loop bodies): inside an attack's compiled
    loop that convolution took a generic path, and a ResNet-20 input gradient ran 7x slower (docs/adversarial.md).
    """
    pads = []
    for size, k, stride, dilation, (low, _), out in zip(in_hw, w.shape[:2], geom.stride, geom.dilation,
                                                         geom.padding, g.shape[1:3], strict=True):
        reach = dilation * (k - 1) + 1
        before = reach - 1 - low
        pads.append((before, size + reach - 1 - (stride * (out - 1) + 1) - before))
    return lax.conv_general_dilated(g, flipped_kernel(w), (1, 1), pads, lhs_dilation=geom.stride,
                                    rhs_dilation=geom.dilation, dimension_numbers=DIMENSIONS)


def weight_grad(x, w, g, geom: Geometry) -> jax.Array:
    """d(sum(conv * g)) / dw."""
    if winograd_weight_grad_applies(geom, w.shape, g.shape[1:3]):
        return winograd.weight_grad3x3(x, g, geom.padding)
    if w.shape[:2] == (1, 1) and geom.groups == 1:
        return _pointwise_weight_grad(x, g, geom).reshape(w.shape)
    return jax.vjp(lambda w_: xla_conv(x, w_, geom), w)[1](g)[0]


def _pointwise_weight_grad(x, g, geom: Geometry) -> jax.Array:
    """A 1x1 kernel's gradient: the input pixels the kernel saw, transposed, times the output gradient.

    XLA computes it as a convolution over a transposed copy of x; one matrix product reads x once.
    """
    ((_, _, seen),) = tap_windows(x, geom, (1, 1), g.shape[1:3])
    return lax.dot_general(seen.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
