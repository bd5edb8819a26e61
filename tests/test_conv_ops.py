"""The fast convolution (cnncli.ops.conv) against jax.grad of the plain lax convolution.

Every geometry the zoo's models use is covered: 1x1 (ResNet bottlenecks and shortcuts, GoogLeNet,
NiN), 3x3 stride 1 on maps of every tile remainder (Winograd weight gradient) and on maps where the
forward pass, the input gradient or both are Winograd convolutions, 3x3 and 1x1 stride 2
(ResNet downsampling), 5x5 (LeNet-5, GoogLeNet), 7x7 stride 2 (ResNet stem), 11x11 stride 4
(AlexNet), dilation 2, grouped and depthwise layers, asymmetric 'same' padding, the tiny maps
(1x1, 2x2 outputs) that take the im2col form, and narrow layers' input gradients both as banded
products and as col2im.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnncli.errors import UserError
from cnncli.ops import conv as conv_ops
from cnncli.ops.conv import Geometry, conv2d, xla_conv

# (input H=W, C in, C out, kernel, stride, padding per side (lo, hi), dilation, groups)
CASES = [
    (8, 16, 24, 1, 1, (0, 0), 1, 1),
    (9, 16, 32, 1, 2, (0, 0), 1, 1),
    (32, 16, 16, 3, 1, (1, 1), 1, 1),   # a large map: XLA's weight gradient
    (16, 16, 32, 3, 1, (1, 1), 1, 1),   # F(4x4) weight gradient
    (14, 32, 16, 3, 1, (1, 1), 1, 1),   # 14 = 3 tiles of 4 + remainder
    (7, 16, 16, 3, 1, (1, 1), 1, 1),
    (4, 16, 32, 3, 1, (1, 1), 1, 1),    # F(2x2) weight gradient
    (10, 16, 16, 3, 1, (0, 0), 1, 1),   # 'valid'
    (10, 16, 16, 3, 1, (2, 2), 1, 1),   # padding 2 (dilated 'same' without dilation)
    (3, 16, 16, 3, 1, (1, 1), 1, 1),    # 3x3 output: F(2x2) over a partial tile
    (16, 64, 128, 3, 1, (1, 1), 1, 1),  # Winograd forward, input gradient and weight gradient
    (32, 64, 64, 3, 1, (1, 1), 1, 1),   # Winograd forward and input gradient, XLA's weight gradient
    (10, 64, 64, 3, 1, (0, 0), 1, 1),   # 'valid': Winograd forward (8x8 out), XLA's input gradient (10x10)
    (8, 128, 64, 3, 1, (2, 2), 1, 1),   # padding 2: XLA's forward (10x10 out), Winograd input gradient
    (2, 32, 48, 3, 1, (1, 1), 1, 1),    # tiny: VGG's last block on 32x32 inputs
    (1, 32, 16, 3, 1, (1, 1), 1, 1),    # tiny: 1x1 map, only the centre tap sees data
    (4, 16, 16, 3, 2, (1, 1), 1, 1),    # tiny through stride
    (16, 16, 32, 3, 2, (1, 1), 1, 1),   # ResNet downsampling
    (16, 16, 16, 3, 2, (0, 1), 1, 1),   # asymmetric 'same' for stride 2
    (28, 1, 6, 5, 1, (2, 2), 1, 1),     # LeNet-5 conv1: a single input channel
    (28, 1, 24, 3, 2, (1, 1), 1, 1),    # single channel, strided
    (12, 1, 8, 3, 1, (2, 2), 2, 1),     # single channel, dilated
    (14, 6, 16, 5, 1, (0, 0), 1, 1),    # LeNet-5 conv2
    (32, 3, 16, 7, 2, (3, 3), 1, 1),    # ResNet stem
    (67, 3, 16, 11, 4, (2, 2), 1, 1),   # AlexNet conv1
    (16, 3, 64, 3, 1, (1, 1), 1, 1),    # an RGB stem: col2im
    (15, 3, 8, 3, 2, (0, 1), 1, 1),     # banded: strided, asymmetric padding, the last padded row unseen
    (12, 3, 8, 3, 1, (2, 2), 2, 1),     # banded and dilated
    (12, 16, 16, 3, 1, (2, 2), 2, 1),   # dilation 2
    (12, 16, 32, 3, 1, (1, 1), 1, 4),   # grouped
    (12, 16, 16, 3, 1, (1, 1), 1, 16),  # depthwise
    (6, 16, 16, 3, 1, (1, 1), 1, 16),   # depthwise on a small map
]


def _case_arrays(hw, cin, cout, k, groups, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)) / np.sqrt(k * k * cin), jnp.float32)
    return x, w


@pytest.mark.parametrize("case", CASES, ids=lambda c: "hw{}_{}to{}_k{}s{}p{}d{}g{}".format(*c))
def test_fast_conv_matches_plain_values_and_gradients(case):
    hw, cin, cout, k, stride, pad, dil, groups = case
    x, w = _case_arrays(hw, cin, cout, k, groups)
    _assert_matches_plain(x, w, stride, pad, dil, groups)


def test_a_large_input_read_through_stored_matches_plain():
    """Inputs from STORE_MIN_ELEMENTS up reach the weight gradient through `stored`."""
    x, w = _case_arrays(32, 16, 16, 3, 1)
    x = jnp.tile(x, (32, 1, 1, 1))
    assert x.size >= conv_ops.STORE_MIN_ELEMENTS
    _assert_matches_plain(x, w, 1, (1, 1), 1, 1)


def _assert_matches_plain(x, w, stride, pad, dil, groups):
    geom = Geometry((stride, stride), (pad, pad), (dil, dil), groups)
    args = ((stride, stride), (pad, pad), (dil, dil), groups)
    y_fast = jax.jit(lambda x, w: conv2d(x, w, *args))(x, w)
    y_ref = xla_conv(x, w, geom)
    assert y_fast.shape == y_ref.shape
    probe = jnp.asarray(np.random.default_rng(1).standard_normal(y_ref.shape), jnp.float32)

    def loss(conv):
        return lambda x, w: jnp.sum(conv(x, w) * probe)

    gx_fast, gw_fast = jax.jit(jax.grad(loss(lambda x, w: conv2d(x, w, *args)), argnums=(0, 1)))(x, w)
    gx_ref, gw_ref = jax.grad(loss(lambda x, w: xla_conv(x, w, geom)), argnums=(0, 1))(x, w)
    for fast, ref in ((y_fast, y_ref), (gx_fast, gx_ref), (gw_fast, gw_ref)):
        scale = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=2e-5 * scale + 1e-6, rtol=0)


def test_each_fast_formulation_is_used_where_intended():
    tiny, large, pointwise, strided = (Geometry(padding=((1, 1), (1, 1))),) * 2 + (Geometry(), Geometry((2, 2)))
    assert conv_ops.is_tiny((8, 2, 2, 32), (3, 3, 32, 32), tiny)
    assert not conv_ops.is_tiny((8, 4, 4, 32), (3, 3, 32, 32), large)
    assert conv_ops.winograd_weight_grad_applies(large, (3, 3, 32, 64), (16, 16))
    assert not conv_ops.winograd_weight_grad_applies(large, (3, 3, 32, 64), (32, 32))  # XLA's is faster on large maps
    assert not conv_ops.winograd_weight_grad_applies(large, (3, 3, 3, 64), (16, 16))  # an RGB stem: too narrow
    assert not conv_ops.winograd_weight_grad_applies(strided, (3, 3, 32, 64), (8, 8))
    assert not conv_ops.winograd_weight_grad_applies(pointwise, (1, 1, 32, 64), (16, 16))
    # Winograd forward passes and input gradients: ResNet-18's and VGG-16's 32x32 to 8x8 layers
    for side, cin, cout in ((32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 256, 256)):
        assert conv_ops.winograd_conv_applies(large, (3, 3, cin, cout), (side, side))
    assert not conv_ops.winograd_conv_applies(large, (3, 3, 512, 512), (4, 4))  # too small a map
    assert not conv_ops.winograd_conv_applies(large, (3, 3, 64, 64), (64, 64))  # larger than any whole model measured
    assert not conv_ops.winograd_conv_applies(large, (3, 3, 512, 512), (14, 14))  # a partial tile
    assert not conv_ops.winograd_conv_applies(large, (3, 3, 96, 96), (16, 16))  # not a multiple of 64
    assert not conv_ops.winograd_conv_applies(large, (3, 3, 3, 64), (32, 32))  # an RGB stem
    assert not conv_ops.winograd_conv_applies(strided, (3, 3, 64, 64), (16, 16))
    assert conv_ops.is_single_channel((5, 5, 1, 6), Geometry())
    assert not conv_ops.is_single_channel((3, 3, 1, 16), Geometry(groups=16))  # depthwise: XLA's
    assert conv_ops.is_narrow((5, 5, 6, 16), Geometry()) and conv_ops.is_narrow((7, 7, 3, 64), strided)
    assert not conv_ops.is_narrow((3, 3, 16, 32), large)  # XLA's input gradient is faster from 16 channels
    assert not conv_ops.is_narrow((3, 3, 1, 8), Geometry(groups=8))
    # banded products for LeNet-5's layers (5x5, few outputs on small maps), col2im for RGB stems
    assert conv_ops.is_banded((128, 14, 14, 6), (5, 5, 6, 16), Geometry())
    assert conv_ops.is_banded((128, 28, 28, 1), (5, 5, 1, 6), Geometry(padding=((2, 2), (2, 2))))
    assert not conv_ops.is_banded((128, 32, 32, 3), (3, 3, 3, 64), Geometry(padding=((1, 1), (1, 1))))
    assert not conv_ops.is_banded((128, 7, 7, 6), (5, 5, 6, 128), Geometry(padding=((2, 2), (2, 2))))
    assert not conv_ops.is_banded((128, 14, 14, 16), (5, 5, 16, 16), Geometry())  # not narrow


@pytest.mark.parametrize(("hw", "pad", "expected"), [
    (16, 1, [(2, 16, 16, 64), (2, 16, 16, 64)]),  # 'same': forward and input gradient
    (10, 0, [(2, 10, 10, 64)]),                   # 'valid': forward only (the input gradient is 10x10)
    (8, 2, [(2, 10, 10, 64)]),                    # padding 2: input gradient only (the output is 10x10)
])
def test_winograd_computes_the_passes_its_rule_admits(monkeypatch, hw, pad, expected):
    calls = []
    real = conv_ops.winograd.conv3x3

    def spy(x, w, padding):
        calls.append(x.shape)
        return real(x, w, padding)

    monkeypatch.setattr(conv_ops.winograd, "conv3x3", spy)
    x, w = _case_arrays(hw, 64, 64, 3, 1)

    def loss(x, w):
        return jnp.sum(conv2d(x, w, padding=((pad, pad), (pad, pad))) ** 2)

    jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w)  # tracing is enough to see which passes call it
    assert calls == expected


def test_the_plain_mode_is_selectable_and_a_bad_mode_is_an_error(monkeypatch):
    x, w = _case_arrays(2, 16, 16, 3, 1)
    monkeypatch.setenv("CNNCLI_CONV", "xla")
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w, padding=((1, 1), (1, 1))))(x, w))
    assert "conv_general_dilated" in jaxpr and "custom_vjp" not in jaxpr
    monkeypatch.setenv("CNNCLI_CONV", "fast")
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w, padding=((1, 1), (1, 1))))(x, w))
    assert "custom_vjp" in jaxpr
    monkeypatch.setenv("CNNCLI_CONV", "winograd")
    with pytest.raises(UserError, match="CNNCLI_CONV=winograd is not a convolution mode; use one of fast, xla"):
        conv2d(x, w)


def test_bfloat16_takes_the_plain_convolution():
    x, w = _case_arrays(8, 16, 16, 3, 1)
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv2d(x, w, padding=((1, 1), (1, 1))))(x.astype(jnp.bfloat16),
                                                                                   w.astype(jnp.bfloat16)))
    assert "custom_vjp" not in jaxpr


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["true branch", "false branch"])
def test_stored_returns_its_input_bit_for_bit_whichever_branch_runs(sign):
    x = jnp.array([[0.5, -0.0, jnp.inf], [-jnp.inf, jnp.nan, 1e-45]], jnp.float32)  # signed zero, inf, nan, denormal
    w = jnp.full((3, 3), sign, jnp.float32)  # the predicate reads the first weight
    out = jax.jit(conv_ops.stored)(x, w)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint32), np.asarray(x).view(np.uint32))


def test_the_weight_gradient_reads_a_stored_input_on_large_maps():
    """The fusion barrier is still in XLA's compiled program: if an XLA upgrade resolves or removes the
    conditional, the weight gradient recomputes the layer's input inside its transposed copy again.
    Small inputs (below STORE_MIN_ELEMENTS) go without it."""
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16), jnp.float32)
    scale = jnp.linspace(0.5, 1.5, 16)

    def loss(w, x):  # the input is elementwise work, as a batch-norm + ReLU output is
        return jnp.sum(conv2d(jax.nn.relu(x * scale + 1.0), w, padding=((1, 1), (1, 1))) ** 2)

    def compiled(batch):
        x = jnp.zeros((batch, 32, 32, 16), jnp.float32)
        return jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()

    assert 64 * 32 * 32 * 16 >= conv_ops.STORE_MIN_ELEMENTS > 2 * 32 * 32 * 16
    assert " conditional(" in compiled(64)
    assert " conditional(" not in compiled(2)
