"""Classification losses by name (`train.loss`), each per example on logits and (soft) one-hot targets.

    cross_entropy  softmax cross-entropy (multinomial logistic regression)
    hinge          the multiclass SVM loss of the lectures (Weston & Watkins): sum over wrong classes j
                   of max(0, 1 + s_j - s_y); PyTorch's MultiMarginLoss times the class count
    mse            mean squared error between the scores and the one-hot targets (least-squares
                   classification); PyTorch's MSELoss per example
    perceptron     Rosenblatt's rule as a loss: each class is a one-vs-rest threshold unit with output
                   yhat = [s > 0]; the loss sum_k (yhat_k - y_k) s_k is >= 0, zero when no unit errs,
                   and its gradient for a linear unit is (yhat - y) x, so plain SGD with rate lr is
                   exactly w <- w + lr (y - yhat) x
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from cnncli.registry import Registry

LOSSES = Registry("loss")
DEFAULT_LOSS = "cross_entropy"
MARGIN = 1.0  # the hinge loss' margin (CS231n's delta)


def _hard(targets: jax.Array) -> jax.Array:
    return jax.nn.one_hot(jnp.argmax(targets, -1), targets.shape[-1])


LOSSES.register("cross_entropy", optax.softmax_cross_entropy, help="softmax cross-entropy (the default)")


@LOSSES.register("hinge", help="multiclass SVM loss: sum over wrong classes of max(0, 1 + s_j - s_y)")
def hinge(logits: jax.Array, targets: jax.Array) -> jax.Array:
    y = _hard(targets)
    correct = jnp.sum(logits * y, -1, keepdims=True)
    return jnp.sum(jax.nn.relu(MARGIN + logits - correct) * (1.0 - y), -1)


@LOSSES.register("mse", help="mean squared error between the scores and the one-hot targets")
def mse(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.mean((logits - targets) ** 2, -1)


@LOSSES.register("perceptron", help="Rosenblatt's rule: one-vs-rest threshold units; with plain SGD, "
                                    "w <- w + lr (y - yhat) x")
def perceptron(logits: jax.Array, targets: jax.Array) -> jax.Array:
    fired = jax.lax.stop_gradient((logits > 0).astype(logits.dtype))
    return jnp.sum((fired - _hard(targets)) * logits, -1)


def unit_mistakes(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per example, whether any one-vs-rest unit is wrong (the perceptron's notion of a mistake)."""
    return jnp.any((logits > 0) != (_hard(targets) > 0), -1)


def loss_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The per-example loss `name` (a UserError with suggestions for an unknown one)."""
    return LOSSES.get(name)
