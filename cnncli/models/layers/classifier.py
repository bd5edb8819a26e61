"""The model boundary: input normalization in front of every network, and what a network returns.

A network returns logits. Auxiliary classifiers (GoogLeNet's heads) sow their logits as
`nnx.Intermediate` values named `AUX_KEY` during a training step's forward pass; `logits_and_aux`
collects them, and the step adds `AUX_WEIGHT` (GoogLeNet's 0.3) times their loss to its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


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
    """A network behind its input normalization: pixels in [0, 1] -> float32 logits.

    `dtype` is the network's compute dtype (bfloat16 under mixed precision, see
    cnncli.train.toolbox): the pixels are normalized in float32, then cast to it.
    """

    def __init__(self, net: nnx.Module, *, channels: int, mean=None, std=None):
        self.normalize = Normalize(channels, mean, std)
        self.net = net
        self.dtype = jnp.float32

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net(self.normalize(x).astype(self.dtype)).astype(jnp.float32)


AUX_KEY = "aux_logits"
AUX_WEIGHT = 0.3


def logits_and_aux(model: nnx.Module, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """The model's logits and the auxiliary heads' logits (empty in eval mode or without heads)."""
    logits, sown = nnx.capture(model, nnx.Intermediate)(x)
    aux = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(sown)
           if any(getattr(p, "key", None) == AUX_KEY for p in path)]
    return logits, aux


class TwoHeads(nnx.Module):
    """The new task's head and the source's head on the same features.

    `output` picks what the module returns: "new" (training without LwF, evaluation), "old" (the old
    task's evaluation) or "both" (LwF training: new logits, then old logits, along the last axis). It is
    a static attribute, so each choice is its own graphdef over the same state.
    """

    def __init__(self, new: nnx.Module, old: nnx.Module):
        self.new, self.old = new, old
        self.output = "new"

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.output == "new":
            return self.new(x)
        if self.output == "old":
            return self.old(x)
        return jnp.concatenate([self.new(x), self.old(x)], axis=-1)
