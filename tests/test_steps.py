"""The jitted steps: batch-norm statistics update in training and stay fixed in evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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


@pytest.mark.slow
def test_generated_images_fill_their_share_of_each_batch_with_their_labels():
    """data.generated: a batch of 8 with 3 generated is 5 real images (the step's slice) and 3 pool images."""
    from cnncli.train.steps import StepOptions, mix_generated

    train_def, _, params, rest = split_model(TinyBN(nnx.Rngs(0)))
    tx, mesh = optax.sgd(0.1), data_mesh()
    real = jnp.arange(20, dtype=jnp.uint8)[:, None, None, None] * jnp.ones((1, 6, 6, 1), jnp.uint8)  # image i is i
    real_y = jnp.arange(20, dtype=jnp.int32) % 3
    pool_y = jnp.arange(30, dtype=jnp.int32) % 3
    pool = (100 + 10 * pool_y)[:, None, None, None].astype(jnp.uint8) * jnp.ones((1, 6, 6, 1), jnp.uint8)
    seen = []

    def probe(x, labels, key):  # the augmentation sees the mixed batch
        jax.debug.callback(lambda a, b: seen.append((np.asarray(a), np.asarray(b))), x, labels)
        return x, labels

    options = StepOptions(augment=probe, generated=(pool, pool_y), generated_per_batch=3)
    step = make_train_step(train_def, tx, num_classes=3, batch_size=8, mesh=mesh, options=options)
    state = TrainState(params, rest, tx.init(params), jnp.zeros((), jnp.int32))
    totals = init_totals()
    for _ in range(2):
        state, totals = step(state, totals, real, real_y, jnp.int32(0), jax.random.key(0))
    jax.effects_barrier()
    assert float(totals["count"]) == 16
    for i, (x, labels) in enumerate(seen):
        pixels, y = np.round(x[:, 0, 0, 0] * 255).astype(int), labels.argmax(-1)
        assert x.shape == (8, 6, 6, 1)
        np.testing.assert_array_equal(pixels[:5], np.arange(5 * i, 5 * i + 5))  # the real part: step i's slice
        np.testing.assert_array_equal(y[:5], pixels[:5] % 3)
        assert set(pixels[5:]) <= {100, 110, 120}  # the generated part: pool images with their own labels
        np.testing.assert_array_equal(y[5:], (pixels[5:] - 100) // 10)
    # the draw is a function of the key alone; over many keys every pool image comes up, uniformly
    numbered = jnp.arange(30, dtype=jnp.uint8)[:, None, None, None] * jnp.ones((1, 6, 6, 1), jnp.uint8)

    def draw(key):
        return mix_generated(real[:5], real_y[:5], numbered, pool_y, 3, key)[0][5:, 0, 0, 0]

    np.testing.assert_array_equal(draw(jax.random.key(1)), draw(jax.random.key(1)))
    draws = np.asarray(jax.vmap(draw)(jax.random.split(jax.random.key(2), 1000))).ravel()
    counts = np.bincount(draws, minlength=30)
    assert counts.min() > 60 and counts.max() < 140  # 100 expected each
