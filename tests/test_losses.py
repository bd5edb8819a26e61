"""The classification losses against PyTorch, and Rosenblatt's perceptron rule: convergence and its failure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cnncli.errors import UserError
from cnncli.train.losses import loss_fn, unit_mistakes

K = 5


def _batch(seed=0, n=16):
    logits = jax.random.normal(jax.random.key(seed), (n, K)) * 2
    labels = jax.random.randint(jax.random.key(seed + 1), (n,), 0, K)
    return logits, labels, jax.nn.one_hot(labels, K)


def test_hinge_is_pytorchs_multi_margin_loss_times_the_classes():
    logits, labels, targets = _batch()
    theirs = torch.nn.MultiMarginLoss(reduction="none")(torch.tensor(np.asarray(logits)),
                                                         torch.tensor(np.asarray(labels, np.int64)))
    np.testing.assert_allclose(np.asarray(loss_fn("hinge")(logits, targets)), theirs.numpy() * K, rtol=1e-5)


def test_mse_is_pytorchs_mse_per_example():
    logits, _, targets = _batch(2)
    theirs = torch.nn.MSELoss(reduction="none")(torch.tensor(np.asarray(logits)), torch.tensor(np.asarray(targets)))
    np.testing.assert_allclose(np.asarray(loss_fn("mse")(logits, targets)), theirs.numpy().mean(-1), rtol=1e-5)


def test_unknown_loss_is_a_user_error():
    with pytest.raises(UserError, match="did you mean"):
        loss_fn("hinje")


def _step(w, x, targets, lr):
    """One SGD step on the mean perceptron loss of a linear model (bias as a constant input)."""
    def loss(w):
        return loss_fn("perceptron")(x @ w, targets).mean()

    return w - lr * jax.grad(loss)(w)


def test_one_sgd_step_on_the_perceptron_loss_is_rosenblatts_rule():
    x = jax.random.normal(jax.random.key(0), (8, 6))
    w = jax.random.normal(jax.random.key(1), (6, K))
    _, labels, targets = _batch(3, n=8)
    lr = 0.1
    yhat = (np.asarray(x @ w) > 0).astype(np.float64)
    rule = np.asarray(w) + lr / len(x) * np.asarray(x).T @ (np.asarray(targets) - yhat)  # w + lr (y - yhat) x
    np.testing.assert_allclose(np.asarray(_step(w, x, targets, lr)), rule, rtol=1e-5, atol=1e-6)


def _train_online(x, labels, epochs):
    """Rosenblatt's online perceptron (one example per step, zero start) on 2 classes: mistakes per epoch."""
    xb = jnp.concatenate([x, jnp.ones((len(x), 1))], 1)
    targets = jax.nn.one_hot(labels, 2)
    step = jax.jit(lambda w, i: _step(w, xb[i][None], targets[i][None], 1.0))
    w, history = jnp.zeros((xb.shape[1], 2)), []
    for _ in range(epochs):
        mistakes = 0
        for i in range(len(x)):
            mistakes += int(unit_mistakes(xb[i][None] @ w, targets[i][None])[0])
            w = step(w, i)
        history.append(mistakes)
    return history


def test_the_perceptron_converges_on_separable_data_and_not_on_xor():
    rng = np.random.default_rng(0)
    # two clouds on either side of a line through the origin, with a margin: linearly separable
    x = rng.normal(size=(60, 2))
    side = np.sign(x @ np.array([1.0, -2.0]))
    x = x + 0.5 * side[:, None] * np.array([1.0, -2.0]) / np.sqrt(5)
    separable = _train_online(jnp.asarray(x, jnp.float32), jnp.asarray(side > 0, jnp.int32), 30)
    assert separable[0] > 0 and separable[-1] == 0  # mistakes per epoch fall to 0 (Novikoff's theorem)
    # XOR: no line separates it, and the perceptron never stops making mistakes
    xor = np.array([[0, 0], [1, 1], [0, 1], [1, 0]], np.float32)
    stuck = _train_online(jnp.asarray(np.tile(xor, (5, 1))), jnp.asarray(np.tile([0, 0, 1, 1], 5)), 30)
    assert min(stuck) > 0


@pytest.mark.slow
def test_train_loss_perceptron_through_the_cli_separates_a_separable_pair(tmp_path):
    import json

    from conftest import cli

    run = tmp_path / "p"
    result = cli("train", "perceptron_fashion_mnist_pair", "--run-dir", run, "--set", "data.source=digits",
                 "--set", "data.classes=[0,1]", "--set", "train.epochs=8", "--set", "train.batch_size=8")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_acc"] == 1.0 and rows[-1]["train_loss"] == 0.0  # no unit errs in the last epoch
    result = cli("train", "perceptron_fashion_mnist_pair", "--set", "train.loss=hinj", "--dry-run")
    assert result.exit_code == 2 and "hinge" in result.stderr
