"""The models' 2-D convolution (NHWC input, HWIO kernel) with a custom gradient that is fast on CPU.

`conv2d` is `lax.conv_general_dilated` with a `jax.custom_vjp` that picks, per layer and per
pass, the formulation that measured fastest on the 2-core CPU (one thread per core, batch 128,
figures in docs/performance.md):

- tiny outputs (a side of at most `TINY_MAP` pixels, e.g. VGG's last block on 32x32 images): XLA's
  CPU convolution falls off a cliff there (a 3x3 512->512 layer on 2x2 maps took 1.9 s forward,
  1 GFLOP/s); written as one matrix product of the windows every kernel tap sees, side by side
  (im2col), with the kernel, forward + both gradients take 27 ms, all matmuls;
- single-channel inputs (the first layer of every grayscale model): XLA's convolution of a 1-channel
  image runs at a few GFLOP/s (LeNet-5's conv1: 5.9 ms forward at batch 128); as a sum over taps of
  broadcast multiply-adds, built channel-major (`single_channel_conv`), 0.4 ms, and 0.7 ms with the
  ReLU and max-pool after it (LeNet-5 evaluation ran 3.3x faster); the weight gradient stays XLA's;
- the input gradient of a layer with fewer than `NARROW_INPUT` input channels (RGB stems;
  adversarial attacks need the first layer's): one matrix product of the output gradient
  and the kernel, and a sum of its taps' parts (col2im), where XLA's transposed convolution, which
  vectorises over the input channels, runs at a fraction of its rate; with few output channels on
  a small map (LeNet-5's two layers), one product per image row with a banded matrix of the
  kernel instead (`banded_input_grad`);
- the forward pass and input gradient of a 3x3 stride-1 layer with channel counts that are multiples
  of 64 on maps from 8x8 to 32x32 that tile into 4x4 blocks (CIFAR ResNet-18's and VGG-16's layers
  but the stems and the 4x4 and 2x2 maps): Winograd F(4x4, 3x3) (`winograd.conv3x3`), a quarter of
  the direct form's multiplications (VGG-16 trained 1.22-1.24x faster, evaluated 1.12x, attacked
  with FGSM 1.27x; ResNet-18 1.05-1.17x, 1.15x, 1.17x);
- the weight gradient of a 3x3 stride-1 layer on maps below 24x24: Winograd F(m x m, 3 x 3) (see
  `cnncli.ops.winograd`), fewer multiplications than the direct form, which XLA computes slower
  than its forward pass;
- the weight gradient of a 1x1 layer: one matrix product of the (subsampled) input and the output
  gradient;
- everything else (the forward pass and input gradient of other 3x3 layers, strided, dilated, grouped
  layers): XLA's own convolution, already near this machine's matmul rate.

The weight gradient of a layer with a large input reads that input as the forward pass stored it
(`stored`), rather than letting XLA recompute the batch norm, ReLU and residual sums before it inside
its transposed copy (ResNet-18 trained 1.2x faster).

`CNNCLI_CONV=xla` selects the plain `lax` convolution everywhere, differentiated by JAX, with XLA's
default CPU library (see `cnncli.runtime`): the baseline the fast path is measured and tested
against. The fast path is float32 only; other dtypes (bfloat16 training) take the plain
convolution, as do devices other than the CPU, whose libraries (cuDNN, TPU) choose their own
algorithms.
"""

from __future__ import annotations

import os
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
DIMENSIONS = ("NHWC", "HWIO", "NHWC")
TINY_MAP = 2  # output sides up to this take the im2col form (4x4 maps are faster in XLA)
# Narrower layers (an RGB stem) leave Winograd's per-position products too small to pay for its
# transforms; XLA's direct weight gradient is as fast there.
WINOGRAD_MIN_CHANNELS = 16
# On large maps (32x32) XLA's own weight gradient was faster than Winograd's (126 against 55 GFLOP/s
# for 64 channels, docs/conv_layers.py); from 16x16 down Winograd is as fast or faster.
WINOGRAD_MAX_MAP = 24
# The forward pass and input gradient of 3x3 stride-1 layers whose channel counts are multiples of 64
# and whose maps tile exactly into 4x4 blocks between 8x8 and 32x32 run as Winograd F(4x4, 3x3)
# (`winograd.conv3x3`). Forward alone against XLA's, batch 128: 8x8 x 256 2.2x, 16x16 x 128 1.9x,
# 32x32 x 64 1.08x; not taken: 12x12 x 96 0.99x, 14x14 x 96 0.92x, 28x28 x 48 0.98x, 6x6 x 128 0.73x.
# 4x4 x 512 alone ran 1.6-1.8x, but VGG-16 then trained 1.09x faster than with no Winograd forward
# pass, against 1.24x without its 4x4 layers (alternated in one process). Larger or partially tiled
# maps ran 1.05-1.8x alone (56x56 x 128, 224x224 x 64, 14x14 x 512) but no whole model has tried them.
WINOGRAD_CONV_CHANNELS = 64
WINOGRAD_CONV_MAPS = (8, 32)
# Below this many input channels the input gradient is one matrix product and a sum (col2im_input_grad).
NARROW_INPUT = 16
# A narrow layer's input gradient is one banded product per image row (`banded_input_grad`) where
# that product does at most this many flops per element of col2im's product (2 * O * padded
# width / KW): LeNet-5's conv2 (90) and conv1 (77) ran 1.2-1.4x faster; a 5x5 layer with 64
# outputs (256) 0.93x, 3x3 RGB stems (170-1450) 0.2-0.7x.
BANDED_MAX_FLOPS = 128
# Below this many input elements (LeNet-5's layers: 150,000) recomputing a layer's input inside its
# weight gradient costs less than the conditional that prevents it (`stored`).
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


def conv_mode() -> str:
    """'fast' (default) or 'xla', from the CNNCLI_CONV environment variable."""
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
    the kernel as a (KH * KW * C, O) matrix.

    On VGG-16's 2x2 maps (batch 128, 512 channels) forward + both gradients took 27 ms, against 43 ms
    for a sum over taps of one window times w[i, j] each (nine small products and the sums of their
    padded gradients).
    """
    kh, kw, cin, out = w.shape
    oh, ow = geom.output_hw(x.shape[1:3], (kh, kw))
    cols = jnp.concatenate([seen for _, _, seen in tap_windows(x, geom, (kh, kw), (oh, ow))], axis=-1)
    y = cols.reshape(-1, kh * kw * cin) @ w.reshape(kh * kw * cin, out)
    return y.reshape(x.shape[0], oh, ow, out)


def single_channel_conv(x: jax.Array, w: jax.Array, geom: Geometry) -> jax.Array:
    """A one-channel input's convolution as a sum over taps of the window the tap sees times w[i, j, 0].

    Built channel-major, (O, N, OH, OW) with the output pixels minor, then transposed to NHWC: XLA
    vectorises the multiply-adds along the image rows. Built NHWC with the O (6 in LeNet-5) output
    channels minor, the same sum fused into the max-pool after it and ran 7x slower.
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
    place and summed (col2im), each kernel row's taps first, then the rows. XLA's transposed
    convolution vectorises over the C input channels, so with few of them it runs at a fraction of
    its rate: LeNet-5's conv2 (6 channels) 2.4 against 1.2 ms, an RGB stem's 15 against 4.8 ms
    (batch 128). Channel-major, (C, N, H, W), the sums run along the image rows rather than over
    C channels: 1.0 against 1.5 ms for LeNet-5's conv2 (the LeNet-5 step: train 1.09x, FGSM 1.17x,
    before its layers took `banded_input_grad`). The sum is stored: read by a max-pool's gradient,
    XLA recomputed it once per window position (LeNet-5 trained 1.2x faster with it stored, 0.94x
    without).
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
    zeros (LeNet-5's conv2: 5 of every 14 columns), but the product is a well-shaped matmul and the
    sum adds whole rows: LeNet-5's conv2 0.88 against 1.19 ms for `col2im_input_grad` (the LeNet-5
    step: train 1.08x, FGSM 1.09x). The sum is stored, as col2im's is.
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


def winograd_applies(geom: Geometry, w_shape: tuple[int, ...], out_hw: tuple[int, int]) -> bool:
    """Whether the layer is a 3x3 stride-1 convolution whose weight gradient Winograd computes."""
    return (_unit_stride_3x3(geom, w_shape) and min(out_hw) < WINOGRAD_MAX_MAP
            and min(w_shape[2:]) >= WINOGRAD_MIN_CHANNELS)


def winograd_conv_applies(geom: Geometry, w_shape: tuple[int, ...], out_hw: tuple[int, int]) -> bool:
    """Whether a 3x3 stride-1 convolution producing out_hw runs as Winograd F(4x4, 3x3) (`winograd.conv3x3`).

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
    every consumer, including the transposed copy its weight-gradient convolution makes of x: that
    copy then gathered a dozen strided inputs per element (ResNet-18's 32x32 stage: 70-90 ms per
    copy against 7 ms for a plain transpose; a sixth of the training step's CPU time).

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
        flipped = w[::-1, ::-1].transpose(0, 1, 3, 2)  # (3, 3, O, C)
        return winograd.conv3x3(g, flipped, ((2 - top, 2 - bottom), (2 - left, 2 - right)))
    if is_banded(x.shape, w.shape, geom):
        return banded_input_grad(x, w, g, geom)
    if is_narrow(w.shape, geom):
        return col2im_input_grad(x, w, g, geom)
    return jax.vjp(lambda x_: xla_conv(x_, w, geom), x)[1](g)[0]


def weight_grad(x, w, g, geom: Geometry) -> jax.Array:
    """d(sum(conv * g)) / dw."""
    if winograd_applies(geom, w.shape, g.shape[1:3]):
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
