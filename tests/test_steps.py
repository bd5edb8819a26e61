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


def _lenet_state_and_steps(ema_every: int, lr: float = 0.001):
    # a small rate: the loop's ops round differently (3e-7 after 2 steps at lr 0.2), and 0.2 grows that to 3e-5
    # in 4 steps; a wrong batch or EMA step still moves the weights or the averaged BN statistics by far more
    from cnncli import recipe as recipe_lib
    from cnncli.data.augment import build_augment
    from cnncli.train import optim, toolbox
    from cnncli.train.state import build
    from cnncli.train.steps import StepOptions, make_ema_update, replicate

    recipe = recipe_lib.load("fast_fashion_mnist", ["train.batch_size=16", f"train.ema_every={ema_every}",
                                                     f"optim.lr={lr}"])
    model = build(recipe, (28, 28, 1), 10)
    lr = optim.learning_rate(recipe.optim, recipe.schedule, epochs=1, steps_per_epoch=8)
    tx = optim.build_optimizer(recipe.optim, lr, model.params)
    options = StepOptions(augment=build_augment(recipe.augment), label_smoothing=0.2, ema_decay=0.9,
                          ema_every=ema_every)
    mesh = data_mesh()

    def fresh():
        state = TrainState(model.params, model.rest, tx.init(model.params), jnp.zeros((), jnp.int32),
                           toolbox.init_ema(model.params, model.rest))
        return replicate(jax.tree.map(jnp.copy, (state, init_totals())), mesh)

    def steps(k):
        return make_train_step(model.train_def, tx, num_classes=10, batch_size=16, mesh=mesh, options=options, steps=k)

    return fresh, steps, make_ema_update(0.9, ema_every)


def test_several_steps_per_call_compute_what_one_step_calls_do():
    """8 steps of an augmented BN network with label smoothing and an EMA every 2 steps: one 8-step call, two
    4-step calls and 8 one-step calls (each second one followed by the EMA update) give the same state."""
    fresh, steps, ema_update = _lenet_state_and_steps(ema_every=2)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.integers(0, 256, (8 * 16, 28, 28, 1)), jnp.uint8)
    ys = jnp.asarray(rng.integers(0, 10, 8 * 16), jnp.int32)
    key, start = jax.random.key(3), jnp.int32(0)

    one = steps(1)
    state, totals = fresh()
    for i in range(8):
        state, totals = one(state, totals, xs, ys, start, key)
        if i % 2 == 1:
            state = ema_update(state)
    reference = jax.device_get((state, totals))

    four, eight = steps(4), steps(8)
    state, totals = fresh()
    for _ in range(2):
        state, totals = four(state, totals, xs, ys, start, key)
    results = {"4 + 4": jax.device_get((state, totals)), "8": jax.device_get(eight(*fresh(), xs, ys, start, key))}
    for name, result in results.items():
        assert int(result[0].step) == 8, name
        for got, want in zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=name)
    ema, params = reference[0].ema["params"], reference[0].params  # the EMA moved, and is not the weights
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(params)))


def test_a_several_step_call_must_hold_whole_ema_stretches():
    import pytest

    from cnncli.errors import UserError
    from cnncli.train.loop import steps_per_call

    _, steps, _ = _lenet_state_and_steps(ema_every=3)
    with pytest.raises(UserError, match="multiple of train.ema_every=3"):
        steps(4)
    auto = dict(steps_per_epoch=234, log_every=50, ema_every=1)
    assert steps_per_call("auto", "cpu", **auto) == 1  # XLA's CPU loops ran slower than dispatched steps
    assert steps_per_call("auto", "gpu", **auto) == 39  # divides the 234-step epoch: no one-step calls
    assert steps_per_call("auto", "gpu", **{**auto, "ema_every": 5}) == 50  # no multiple of 5 divides 234
    assert steps_per_call("auto", "gpu", steps_per_epoch=120, log_every=50, ema_every=5) == 40
    assert steps_per_call("auto", "tpu", steps_per_epoch=7, log_every=50, ema_every=5) == 5
    assert steps_per_call(10, "cpu", **{**auto, "ema_every": 5}) == 10
    with pytest.raises(UserError, match="steps_per_call=4 is not a multiple of train.ema_every=5"):
        steps_per_call(4, "gpu", **{**auto, "ema_every": 5})
    assert steps_per_call("auto", "gpu", **auto, streaming=True) == 1  # each streamed step reads its own batch
    with pytest.raises(UserError, match="data.pipeline=stream"):
        steps_per_call(5, "gpu", **auto, streaming=True)
