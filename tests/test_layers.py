"""Layer blocks: output sizes, pooling paths against XLA's reduce_window, normalizations, HoG, locally connected."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from cnncli.errors import UserError
from cnncli.models.hog import HoG
from cnncli.models.layers import (
    LRN,
    Conv,
    Dense,
    LocallyConnected,
    Pool,
    SeparableConv,
    Stack,
    activates_after_pool,
    avg_pool,
    max_pool,
    resolve_axis,
)


@pytest.mark.parametrize("args,kwargs,expected", [
    ((227, 11, 4, 1, 0), {}, (55, 0, 0)),          # AlexNet conv1
    ((224, 11, 4, 1, 0), {}, (54, 0, 0)),          # floors like PyTorch
    ((224, 11, 4, 1, 2), {}, (55, 2, 2)),          # torchvision's padding 2
    ((7, 3, 2, 1, "same"), {}, (4, 1, 1)),         # ceil(7/2), padding split evenly
    ((8, 3, 2, 1, "same"), {}, (4, 0, 1)),         # XLA puts the odd pixel at the end
    ((112, 3, 2, 1, 0), {"ceil": True}, (56, 0, 1)),  # GoogLeNet's ceil-mode pool
    ((13, 3, 2, 1, 0), {"ceil": True}, (6, 0, 0)),
    ((32, 3, 1, 2, 0), {}, (28, 0, 0)),            # dilation 2: a 5-pixel window
])
def test_resolve_axis(args, kwargs, expected):
    assert resolve_axis(*args, **kwargs) == expected


def test_resolve_axis_exact_and_impossible():
    with pytest.raises(UserError, match=r"\(7 - 3 \+ 2\*0\)/3 \+ 1 = 2.33 is not an integer"):
        resolve_axis(7, 3, 3, 1, 0, exact=True)
    assert resolve_axis(7, 3, 2, 1, 0, exact=True) == (3, 0, 0)
    with pytest.raises(UserError, match="does not fit"):
        resolve_axis(2, 3, 1, 1, 0)


def _reference_pool(x, kind, window, stride, pads):
    padding = ((0, 0), *pads, (0, 0))
    if kind == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), padding)
    summed = lax.reduce_window(x, 0.0, lax.add, (1, window, window, 1), (1, stride, stride, 1), padding)
    return summed / (window * window)


@pytest.mark.parametrize("kind,size,window,stride,padding,ceil", [
    ("max", 8, 2, 2, 0, False), ("max", 7, 2, 2, 0, False), ("max", 7, 2, 2, 0, True),
    ("max", 9, 3, 2, 1, False), ("max", 10, 3, 2, 0, True), ("max", 6, 3, 1, 1, False),
    ("avg", 8, 2, 2, 0, False), ("avg", 9, 3, 2, 1, False), ("avg", 10, 3, 3, 0, False),
])
def test_pool_paths_match_reduce_window_in_value_and_gradient(kind, size, window, stride, padding, ceil):
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    fn = max_pool if kind == "max" else avg_pool
    out, lo, hi = resolve_axis(size, window, stride, 1, padding, ceil=ceil)
    pads = ((lo, hi), (lo, hi))

    def ours(x):
        return fn(x, window, stride, padding=padding, ceil=ceil)

    def ref(x):
        return _reference_pool(x, kind, window, stride, pads)[:, :out, :out]

    assert ours(x).shape == (2, out, out, 3)
    np.testing.assert_allclose(ours(x), ref(x), atol=1e-6)
    w = jax.random.normal(jax.random.key(2), (2, out, out, 3))
    g_ours = jax.grad(lambda x: jnp.sum(ours(x) * w))(x)
    g_ref = jax.grad(lambda x: jnp.sum(ref(x) * w))(x)
    np.testing.assert_allclose(g_ours, g_ref, atol=1e-5)


def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window_as_in_pytorch():
    """Small integers make most windows tie; JAX's own gradient would split among the ties."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (2, 6, 7, 3)).astype(np.float32)  # 7 wide: the last column is dropped
    probe = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    ours = jax.grad(lambda x: jnp.sum(max_pool(x, 2) * probe))(jnp.asarray(x))
    xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    (torch.nn.functional.max_pool2d(xt, 2) * torch.tensor(probe).permute(0, 3, 1, 2)).sum().backward()
    np.testing.assert_array_equal(np.asarray(ours), xt.grad.permute(0, 2, 3, 1).numpy())


def test_max_pool_gradient_of_a_nan_window_goes_to_the_nan():
    x = jnp.array([[1.0, 5.0], [jnp.nan, 2.0]]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda x: max_pool(x, 2)[0, 0, 0, 0])(x)
    assert jnp.isnan(max_pool(x, 2)).all()
    np.testing.assert_array_equal(np.asarray(g).ravel(), [0.0, 0.0, 1.0, 0.0])


def test_max_pool_gradient_reads_the_stored_input():
    """The pool's backward pass reads its input through `stored`'s conditional; without it XLA recomputes
    the input's producer once per window position (LeNet-5's first convolution: 9,800 against 16,800
    img/s, docs/performance.md item 5)."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))

    def loss(x):  # the pooled map is elementwise work, as a convolution's single-channel form is
        return jnp.sum(max_pool(jnp.sin(x) * 2.0, 2) ** 2)

    assert " conditional(" in jax.jit(jax.grad(loss)).lower(x).compile().as_text()


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_a_stack_activates_after_the_max_pool_with_the_same_values_and_gradients(act):
    conv, pool = Conv(3, 4, 3, act=act, rngs=nnx.Rngs(0)), Pool("max", 2)
    stack = Stack([("conv", conv), ("pool", pool)])
    assert activates_after_pool(conv, pool)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    np.testing.assert_array_equal(stack(x), pool(conv(x)))
    probe = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
    grad = jax.grad(lambda x, f: jnp.sum(f(x) * probe))
    np.testing.assert_allclose(grad(x, stack), grad(x, lambda x: pool(conv(x))), atol=1e-6)


def test_only_order_preserving_activations_move_after_a_max_pool():
    rngs = nnx.Rngs(0)
    assert not activates_after_pool(Conv(3, 4, act="relu", rngs=rngs), Pool("avg", 2))
    assert not activates_after_pool(Conv(3, 4, act="gelu", rngs=rngs), Pool("max", 2))  # not monotonic
    assert not activates_after_pool(Conv(3, 4, act="relu", norm="lrn", rngs=rngs), Pool("max", 2))
    assert not activates_after_pool(Dense(3, 4, act="relu", rngs=rngs), Pool("max", 2))


def _forward_shape(layer, shape):
    graphdef, state = nnx.split(layer)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct(shape, jnp.float32)).shape


@pytest.mark.parametrize("size", (7, 8))
def test_declared_output_shape_is_the_forward_shape(size):
    """The sizes builders and the analysis rely on are the sizes the layers really produce."""
    shape = (1, size, size, 3)
    for kernel, stride, padding in itertools.product((1, 3, 5), (1, 2, 3), (0, 1, "same")):
        for dilation in (1, 2) if kernel == 3 else (1,):
            conv = Conv(3, 4, kernel, stride=stride, padding=padding, dilation=dilation, rngs=nnx.Rngs(0))
            assert conv.output_shape(shape) == _forward_shape(conv, shape), (kernel, stride, padding, dilation)
        if padding != "same" and 2 * padding <= kernel:
            for ceil in (False, True):
                pool = Pool("max", kernel, stride, padding=padding, ceil=ceil)
                assert pool.output_shape(shape) == _forward_shape(pool, shape), (kernel, stride, padding, ceil)


def test_separable_conv_is_depthwise_then_pointwise():
    layer = SeparableConv(4, 6, 3, act=None, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 4))
    dw = lax.conv_general_dilated(x, layer.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=4)
    ref = lax.conv_general_dilated(dw, layer.pointwise[...], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + layer.bias[...]
    np.testing.assert_allclose(layer(x), ref, atol=1e-5)
    assert layer.macs([x.shape], (1, 5, 5, 6)) == 25 * (4 * 9 + 4 * 6)


def test_maxout_and_prelu_parameters():
    plain = Dense(10, 8, act="relu", rngs=nnx.Rngs(0))
    maxout = Dense(10, 8, act="maxout", rngs=nnx.Rngs(0))
    prelu = Conv(3, 8, 3, act="prelu", rngs=nnx.Rngs(0))
    count = lambda m: sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert count(maxout) == 2 * count(plain)
    assert count(prelu) == 3 * 3 * 3 * 8 + 8 + 8  # kernel, bias, one slope per channel
    assert maxout(jnp.ones((2, 10))).shape == (2, 8)
    y = prelu(-jnp.ones((1, 4, 4, 3)) * 100)
    assert bool(jnp.any(y < 0)), "PReLU lets negative values through with its slope"


def test_lrn_matches_the_paper_formula():
    x = jax.random.normal(jax.random.key(0), (1, 2, 2, 7))
    lrn = LRN(size=5, alpha=1e-1, beta=0.75, k=2.0)
    y = np.asarray(lrn(x))
    xn = np.asarray(x)
    for c in range(7):
        lo, hi = max(0, c - 2), min(6, c + 2)
        expected = xn[..., c] / (2.0 + 1e-1 * (xn[..., lo: hi + 1] ** 2).sum(-1)) ** 0.75
        np.testing.assert_allclose(y[..., c], expected, rtol=1e-5)


def test_hog_sees_edge_orientation():
    hog = HoG(cell=4, bins=9)
    stripes = jnp.tile((jnp.arange(16) // 2 % 2).astype(jnp.float32)[:, None, None], (1, 16, 1))[None]
    features = hog(stripes).reshape(-1, 9)
    # Horizontal stripes: vertical gradients, orientation 90 degrees: bin 4 (80-100) holds the votes.
    assert int(jnp.argmax(features.sum(0))) == 4
    assert hog.output_shape((1, 16, 16, 1)) == (1, 3 * 3 * 4 * 9)
    assert float(jnp.abs(hog(jnp.ones((1, 16, 16, 1)))).max()) < 1e-3  # a flat image has no edges


def _local_reference(x, kernel, bias, k, stride, pad):
    """A locally connected layer written as loops over output positions (NumPy, no JAX)."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow, _, cout = kernel.shape
    out = np.zeros((x.shape[0], oh, ow, cout))
    for i in range(oh):
        for j in range(ow):
            window = x[:, i * stride: i * stride + k, j * stride: j * stride + k, :]  # (N, k, k, C)
            features = window.transpose(0, 3, 1, 2).reshape(len(x), -1)  # channel-major, as documented
            out[:, i, j] = features @ np.asarray(kernel[i, j], np.float64) + np.asarray(bias[i, j])
    return out


@pytest.mark.parametrize("k,stride,padding,pad", [(3, 1, "same", 1), (5, 2, 0, 0), (2, 2, "valid", 0)])
def test_locally_connected_matches_a_loop_over_positions(k, stride, padding, pad):
    layer = LocallyConnected(3, 4, k, input_hw=(9, 9), stride=stride, padding=padding, act=None, rngs=nnx.Rngs(0))
    layer.bias[...] = jax.random.normal(jax.random.key(1), layer.bias[...].shape)
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 3))
    y = layer(x)
    assert y.shape == layer.output_shape(x.shape)
    ref = _local_reference(x, np.asarray(layer.kernel[...]), np.asarray(layer.bias[...]), k, stride, pad)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_locally_connected_layer_with_one_filter_everywhere_is_a_convolution():
    conv = Conv(2, 5, 3, padding="valid", act=None, rngs=nnx.Rngs(0))
    local = LocallyConnected(2, 5, 3, input_hw=(8, 8), padding="valid", act=None, rngs=nnx.Rngs(1))
    # the conv's HWIO kernel in the local layer's channel-major window order, copied to every position
    shared = np.asarray(conv.kernel[...]).transpose(2, 0, 1, 3).reshape(-1, 5)
    local.kernel[...] = jnp.broadcast_to(shared, local.kernel[...].shape)
    local.bias[...] = jnp.broadcast_to(conv.bias[...], local.bias[...].shape)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 2))
    np.testing.assert_allclose(np.asarray(local(x)), np.asarray(conv(x)), rtol=1e-5, atol=1e-5)


def test_locally_connected_weights_fix_the_input_size():
    layer = LocallyConnected(1, 2, 3, input_hw=(8, 8), rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="unshared weights fix the input size"):
        layer.output_shape((1, 10, 10, 1))
