"""The jitted steps: batch-norm statistics update in training and stay fixed in evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cnncli.train.evaluate import init_eval_sums, make_eval_step
from cnncli.train.state import TrainState, init_totals, split_model
from cnncli.train.steps import data_mesh, make_train_step


class TinyBN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))


def test_batchnorm_updates_in_train_step_only():
    train_def, eval_def, params, rest = split_model(TinyBN(nnx.Rngs(0)))
    tx = optax.sgd(0.1)
    mesh = data_mesh()
    xs = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 6, 6, 1)), jnp.uint8)
    ys = jnp.arange(8, dtype=jnp.int32) % 3
    step = make_train_step(train_def, tx, num_classes=3, batch_size=8, mesh=mesh)
    state = TrainState(params, rest, tx.init(params), jnp.zeros((), jnp.int32))
    before = np.asarray(rest["bn"]["mean"][...])
    state, totals = step(state, init_totals(), xs, ys, jnp.int32(0), jax.random.key(0))
    after = np.asarray(state.rest["bn"]["mean"][...])
    assert not np.allclose(before, after) and int(state.step) == 1 and float(totals["count"]) == 8

    eval_step = make_eval_step(eval_def, num_classes=3, batch_size=8, mesh=mesh)
    sums, _ = eval_step.step((state.params, state.rest), init_eval_sums(3), (xs, ys, jnp.ones(8)), jnp.int32(0))
    assert float(sums["confusion"].sum()) == 8
    assert np.allclose(np.asarray(state.rest["bn"]["mean"][...]), after)  # eval leaves the statistics alone
