"""Activations: one registry of elementwise functions, plus PReLU and maxout, which need a layer."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from cnncli.errors import UserError
from cnncli.models.layers.core import Layer
from cnncli.registry import Registry

MAXOUT_PIECES = 2  # linear pieces per maxout unit (Goodfellow et al. 2013 used 2-5)


PRELU_INIT = 0.25  # He et al. 2015


LEAKY_SLOPE = 0.01


ACTIVATIONS = Registry("activation")


# How a ReLU passes the signal backwards while `relu_backward` is active (visualization only; training
# never sets it). Zeiler & Fergus' deconvnet rectifies the signal itself and ignores the forward pass;
# guided backpropagation (Springenberg et al. 2015) also keeps the ordinary gradient's gate.
RELU_RULES = ("gradient", "deconvnet", "guided")
_RELU_RULE: contextvars.ContextVar[str] = contextvars.ContextVar("cnncli_relu_rule", default="gradient")


@jax.custom_vjp
def _deconvnet_relu(x):
    return jax.nn.relu(x)


def _deconvnet_fwd(x):
    return jax.nn.relu(x), None


def _deconvnet_bwd(_, g):
    return (jax.nn.relu(g),)


_deconvnet_relu.defvjp(_deconvnet_fwd, _deconvnet_bwd)


@jax.custom_vjp
def _guided_relu(x):
    return jax.nn.relu(x)


def _guided_fwd(x):
    return jax.nn.relu(x), x > 0


def _guided_bwd(open_gate, g):
    return (jax.nn.relu(g) * open_gate,)


_guided_relu.defvjp(_guided_fwd, _guided_bwd)


@contextlib.contextmanager
def relu_backward(rule: str) -> Iterator[None]:
    """Within this block (at trace time), every ReLU's backward pass follows `rule` (see RELU_RULES)."""
    if rule not in RELU_RULES:
        raise ValueError(f"unknown ReLU backward rule '{rule}'; one of {RELU_RULES}")
    token = _RELU_RULE.set(rule)
    try:
        yield
    finally:
        _RELU_RULE.reset(token)


def relu(x: jax.Array) -> jax.Array:
    """max(0, x); its gradient is the ordinary one unless `relu_backward` chose another rule."""
    rule = _RELU_RULE.get()
    if rule == "deconvnet":
        return _deconvnet_relu(x)
    if rule == "guided":
        return _guided_relu(x)
    return jax.nn.relu(x)


ACTIVATIONS.register("relu", relu, help="max(0, x)")


ACTIVATIONS.register("sigmoid", jax.nn.sigmoid, help="1 / (1 + exp(-x))")


ACTIVATIONS.register("tanh", jnp.tanh, help="hyperbolic tangent")


ACTIVATIONS.register("leaky_relu", lambda x: jax.nn.leaky_relu(x, LEAKY_SLOPE), help="max(0.01 x, x)")


ACTIVATIONS.register("elu", jax.nn.elu, help="x if x > 0 else exp(x) - 1")


ACTIVATIONS.register("gelu", jax.nn.gelu, help="Gaussian error linear unit (tanh approximation)")


ACTIVATIONS.register("prelu", None, help="max(0, x) + a * min(0, x), one learned slope a per channel")


ACTIVATIONS.register("maxout", None, help=f"max over {MAXOUT_PIECES} linear pieces (the layer before "
                                          f"produces {MAXOUT_PIECES}x the channels)")


ACTIVATIONS.register("identity", lambda x: x, help="no activation")


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

