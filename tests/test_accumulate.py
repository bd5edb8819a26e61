"""Gradient accumulation (train.accumulate): k batches of b give the update of one batch of k * b, and the
gradient's global norm in the logs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import cli

from cnncli import recipe as recipe_lib
from cnncli.train import optim as optim_lib
from cnncli.train.loop import accumulated
from cnncli.train.state import TrainState, build, init_totals
from cnncli.train.steps import data_mesh, make_train_step

B, K, UPDATES = 16, 4, 3


def _train(name: str, lr: float, batch: int, accumulate: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray(np.round(digits.images * 255 / 16).astype(np.uint8)[..., None])
    y = jnp.asarray(digits.target.astype(np.int32))
    recipe = recipe_lib.validate({"name": "acc", "model": {"name": "mlp"}, "optim": {"name": name, "lr": lr},
                                  "train": {"batch_size": batch, "accumulate": accumulate}})
    model = build(recipe, (8, 8, 1), 10, [0.3], [0.4])
    tx = accumulated(optim_lib.build_optimizer(recipe.optim, lambda step: lr, model.params), recipe)
    step = make_train_step(model.train_def, tx, num_classes=10, batch_size=batch, mesh=data_mesh())
    state = TrainState(model.params, model.rest, tx.init(model.params), jnp.zeros((), jnp.int32))
    totals = init_totals()
    for _ in range(UPDATES * accumulate):
        state, totals = step(state, totals, x, y, jnp.int32(0), jax.random.key(0))
    return state.params, totals


# Adam divides by sqrt(v): a float32 rounding of a near-zero gradient moves its update by up to ~1e-3 of a step
@pytest.mark.slow
@pytest.mark.parametrize("name,lr,atol", [("sgd", 0.5, 2e-6), ("adam", 0.01, 2e-5)])
def test_k_batches_update_as_one_k_times_larger_batch(name, lr, atol):
    big, big_totals = _train(name, lr, K * B, 1)
    small, small_totals = _train(name, lr, B, K)
    for a, b in zip(jax.tree.leaves(big), jax.tree.leaves(small)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=atol)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(big),
                                                              jax.tree.leaves(_train(name, lr, K * B, 1)[0])))
    assert moved == 0.0  # deterministic: the comparison above is not noise
    # the loss is measured before each update: the same examples at the same weights
    assert float(small_totals["loss"]) == pytest.approx(float(big_totals["loss"]), rel=1e-5)


@pytest.mark.slow
def test_grad_norm_is_the_global_norm_of_the_gradient():
    params, totals = _train("sgd", 1e-30, B, 1)  # every step sees the initial weights (lr > 0 is required)
    from sklearn.datasets import load_digits

    # the first batch's gradient, by jax.grad of the same loss outside the train step
    recipe = recipe_lib.validate({"name": "g", "model": {"name": "mlp"}})
    model = build(recipe, (8, 8, 1), 10, [0.3], [0.4])
    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None].astype(np.float32) / 255
    from flax import nnx

    def loss(p, x, y):
        logits = nnx.merge(model.train_def, p, model.rest)(jnp.asarray(x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

    norms = [float(optax.global_norm(jax.grad(loss)(model.params, images[i * B:(i + 1) * B],
                                                    digits.target[i * B:(i + 1) * B]))) for i in range(UPDATES)]
    assert float(totals["grad_norm"]) / float(totals["count"]) == pytest.approx(np.mean(norms), rel=1e-4)


@pytest.mark.slow
def test_accumulate_through_the_cli_matches_the_larger_batch(tmp_path, fashion):
    rows = {}
    for name, sets in (("big", ["--set", "train.batch_size=128"]),
                       ("acc", ["--set", "train.batch_size=64", "--set", "train.accumulate=2"])):
        run = tmp_path / name
        result = cli("train", "lenet5_fashion_mnist", "--run-dir", run, "--set", "data.limit=1280",
                     "--set", "train.epochs=2", *sets)
        assert result.exit_code == 0, result.output
        rows[name] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for big, acc in zip(rows["big"], rows["acc"]):
        assert acc["step"] == 2 * big["step"]  # steps count batches
        for key in ("train_loss", "val_loss", "lr"):
            assert acc[key] == pytest.approx(big[key], rel=1e-4), key
        assert acc["grad_norm"] > 0
