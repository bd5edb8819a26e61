"""Optimizers, schedules and regularization built from the recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnncli.recipe import OptimConfig, ScheduleConfig
from cnncli.train import optim as optim_lib


def _fit(name: str, lr: float, steps: int = 60) -> tuple[float, float]:
    """Loss before/after `steps` of optimizer `name` on least squares with a known solution."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    w_true = jnp.asarray(rng.normal(size=(8, 1)), jnp.float32)
    b = a @ w_true
    params = {"w": jnp.zeros((8, 1)), "b": jnp.zeros((1,))}
    cfg = OptimConfig(name=name, lr=lr)
    tx = optim_lib.build_optimizer(cfg, optim_lib.learning_rate(cfg, ScheduleConfig(), epochs=1,
                                                                steps_per_epoch=steps), params)
    loss = lambda p: jnp.mean((a @ p["w"] + p["b"] - b) ** 2)  # noqa: E731
    state, first = tx.init(params), float(loss(params))
    for _ in range(steps):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    return first, float(loss(params))


@pytest.mark.parametrize("name, lr", [("sgd", 0.05), ("momentum", 0.02), ("nesterov", 0.02), ("adagrad", 0.5),
                                      ("adadelta", 10.0), ("adam", 0.1), ("adamw", 0.1), ("rmsprop", 0.02)])
def test_every_optimizer_descends(name, lr):
    first, last = _fit(name, lr)
    assert last < 0.25 * first, (name, first, last)


def _lr_values(**schedule):
    cfg = ScheduleConfig(**schedule)
    lr = optim_lib.learning_rate(OptimConfig(lr=0.1), cfg, epochs=10, steps_per_epoch=10)
    return np.array([float(lr(s)) for s in range(100)])


def test_schedules():
    assert np.allclose(_lr_values(name="constant"), 0.1)
    step = _lr_values(name="step", step_epochs=3, gamma=0.5)
    assert step[29] == pytest.approx(0.1) and step[30] == pytest.approx(0.05)
    assert step[60] == pytest.approx(0.025) and step[90] == pytest.approx(0.0125)
    cosine = _lr_values(name="cosine", final_fraction=0.1)
    assert cosine[0] == pytest.approx(0.1) and cosine[50] == pytest.approx(0.055, rel=0.02)
    assert np.all(np.diff(cosine) <= 1e-9)
    onecycle = _lr_values(name="onecycle", peak_at=0.3)
    assert onecycle[0] == 0 and onecycle.argmax() == 30 and onecycle.max() == pytest.approx(0.1)
    warm = _lr_values(name="constant", warmup_epochs=2)
    assert warm[0] == 0 and warm[10] == pytest.approx(0.05) and np.allclose(warm[20:], 0.1)


def test_weight_decay_skips_biases_and_penalties():
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 3.0)}
    assert optim_lib.decay_mask(params) == {"kernel": True, "bias": False}
    cfg = OptimConfig(name="sgd", lr=1.0, weight_decay=0.1)
    tx = optim_lib.build_optimizer(cfg, lambda s: 1.0, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert np.allclose(updates["kernel"], -0.2) and np.allclose(updates["bias"], 0.0)
    penalty = optim_lib.penalty(params, OptimConfig(l2=0.5, l1=0.25))
    assert float(penalty) == pytest.approx(0.5 * 0.5 * 16 + 0.25 * 8)


def test_warmup_longer_than_training_is_an_error():
    from cnncli.errors import UserError

    with pytest.raises(UserError, match="warmup_epochs"):
        optim_lib.learning_rate(OptimConfig(), ScheduleConfig(warmup_epochs=5), epochs=5, steps_per_epoch=10)
