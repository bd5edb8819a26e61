"""Helpers shared by the model and summary tests."""

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cnncli.models import build_network

LR = 0.01


def param_count(model) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract(name: str, input_shape, num_classes: int, **options):
    """The network built with shapes only (nothing allocated): for parameter counts and analysis."""
    return nnx.eval_shape(lambda: build_network(name, input_shape=input_shape, num_classes=num_classes, **options))


def train_step(net, x, y):
    """One plain SGD step on cross-entropy in train mode; returns (loss, logits, new params, new stats)."""
    net.train()
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)

    @jax.jit
    def step(params, rest):
        def loss_fn(p, rest):
            # Fresh Variables at this trace level, so batch norm may update its statistics.
            m = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, rest))
            logits = m(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, nnx.state(m, nnx.BatchStat))

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        return loss, logits, jax.tree.map(lambda p, g: p - LR * g, params, grads), stats, grads

    return step(params, rest)


def random_batch(input_shape, num_classes: int, batch: int = 2, seed: int = 0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.uniform(kx, (batch, *input_shape)), jax.random.randint(ky, (batch,), 0, num_classes)


def all_finite(tree) -> bool:
    return all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(tree))


def abstract_logits_shape(net, input_shape, batch: int = 3) -> tuple[int, ...]:
    """Trace a (possibly abstract) network's forward pass without computing anything."""
    graphdef, state = nnx.split(net)

    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    return jax.eval_shape(run, state, jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)).shape
