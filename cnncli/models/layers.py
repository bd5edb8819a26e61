"""Building blocks shared by the model families: normalization at the boundary, activations, pooling.

Pooling note (measured on the 2-core CPU, see DESIGN.md): XLA's gradient of `reduce_window`
max-pooling (select-and-scatter) is ~3x slower than pooling written as reshape + max, so
non-overlapping pools whose window divides the input take the reshape path.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from cnncli.registry import Registry

ACTIVATIONS = Registry("activation")
ACTIVATIONS.register("relu", jax.nn.relu, help="max(0, x)")
ACTIVATIONS.register("sigmoid", jax.nn.sigmoid, help="1 / (1 + exp(-x))")
ACTIVATIONS.register("tanh", jnp.tanh, help="hyperbolic tangent")
ACTIVATIONS.register("leaky_relu", lambda x: jax.nn.leaky_relu(x, 0.01), help="max(0.01 x, x)")
ACTIVATIONS.register("elu", jax.nn.elu, help="x if x > 0 else exp(x) - 1")
ACTIVATIONS.register("gelu", jax.nn.gelu, help="Gaussian error linear unit (tanh approximation)")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return ACTIVATIONS.get(name)


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


def max_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding: str = "VALID") -> jax.Array:
    """Max pooling over NHWC; non-overlapping, evenly dividing pools use the fast reshape path."""
    stride = window if stride is None else stride
    n, h, w, c = x.shape
    if stride == window and padding == "VALID" and h % window == 0 and w % window == 0:
        return x.reshape(n, h // window, window, w // window, window, c).max(axis=(2, 4))
    if stride == window and padding == "VALID":  # crop the ragged edge as VALID pooling would
        hh, ww = (h // window) * window, (w // window) * window
        return max_pool(x[:, :hh, :ww], window, stride)
    return nnx.max_pool(x, (window, window), (stride, stride), padding)


def avg_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding: str = "VALID") -> jax.Array:
    stride = window if stride is None else stride
    n, h, w, c = x.shape
    if stride == window and padding == "VALID" and h % window == 0 and w % window == 0:
        return x.reshape(n, h // window, window, w // window, window, c).mean(axis=(2, 4))
    return nnx.avg_pool(x, (window, window), (stride, stride), padding)


def global_avg_pool(x: jax.Array) -> jax.Array:
    return x.mean(axis=(1, 2))
