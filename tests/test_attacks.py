"""Attacks against independent references: analytic gradients of a linear model, the eps-ball, batch norm."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnncli.adversarial import attacks
from cnncli.adversarial.attacks import ATTACKS, AttackConfig
from cnncli.adversarial.robustness import attack_split, check_attackable, make_attack_step, robustness
from cnncli.errors import UserError
from cnncli.models import build_model
from cnncli.models.layers import Classifier
from cnncli.recipe import ModelConfig
from cnncli.train.state import Model, split_model
from cnncli.train.steps import data_mesh, forward

SHAPE = (8, 8, 1)
CLASSES = 4
MEAN, STD = 0.3, 0.25  # non-trivial normalization: attacks must see through it to pixel space
ATOL = 1e-6

# every attack, in every norm it supports, untargeted and (where it can be) targeted; few iterations
CASES = [AttackConfig(name=name, norm=norm, steps=20 if ATTACKS.get(name).minimum_norm else 3,
                      restarts=2 if name in ("pgd", "apgd-ce") else 1, target=target, targets=2, queries=20, c=10.0)
         for name in ATTACKS.names() for norm in ATTACKS.get(name).norms for target in (None, "random")
         if not (target and ATTACKS.get(name).untargeted_only)]


def _model(name: str, **args) -> Model:
    net = build_model(ModelConfig(name=name, args=args), input_shape=SHAPE, num_classes=CLASSES, mean=MEAN, std=STD,
                      seed=1)
    return Model(*split_model(net))


def _logits_fn(model: Model):
    return lambda v: forward(model.eval_def, model.params, model.rest, v)[0]


def _nonlinear() -> Model:
    """A ReLU network (hidden layer of 32) that is fast on tiny images."""
    return _model("mlp", hidden=[32])


def _softmax_regression():
    """A linear softmax model and its weights in NumPy: logits = W^T (x - mean) / std + b."""
    model = _model("mlp", hidden=[])
    (layer,) = nnx.to_pure_dict(model.params)["net"].values()  # the one fully connected layer
    w, b = (np.asarray(layer[k], np.float64) for k in ("kernel", "bias"))
    return model, w, b


def _pixels(n: int, seed: int = 0, low: float = 0.0, high: float = 1.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(low, high, (n, *SHAPE)), jnp.float32)


def _labels(n: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed + 1).integers(0, CLASSES, n), jnp.int32)


def _attacker(model, cfg):
    """attack(x, labels, eps) -> x_adv, compiled once for every eps."""
    fn = jax.jit(lambda x, y, e, k: attacks.run_attack(_logits_fn(model), x, y, e, k, cfg, CLASSES)[0])
    return lambda x, labels, eps: fn(x, labels, jnp.float32(eps), jax.random.key(0))


def _attack(model, cfg, x, labels, eps):
    return _attacker(model, cfg)(x, labels, eps)


def test_fgsm_on_softmax_regression_is_eps_times_sign_of_the_analytic_gradient():
    model, w, b = _softmax_regression()
    x, labels = _pixels(32, low=0.2, high=0.8), _labels(32)  # inside (0, 1): no clipping at eps 0.05
    z = ((np.asarray(x, np.float64).reshape(32, -1) - MEAN) / STD) @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = ((p - np.eye(CLASSES)[np.asarray(labels)]) @ w.T / STD).reshape(x.shape)  # d CE / d pixels
    delta = np.asarray(_attack(model, AttackConfig("fgsm"), x, labels, 0.05)) - np.asarray(x)
    assert np.abs(grad).min() > 1e-5  # no sign ties that float32 could flip
    np.testing.assert_allclose(delta, 0.05 * np.sign(grad), atol=ATOL)
    targeted = np.asarray(_attack(model, AttackConfig("fgsm", target=2), x, labels, 0.05)) - np.asarray(x)
    grad_t = ((p - np.eye(CLASSES)[2]) @ w.T / STD).reshape(x.shape)
    np.testing.assert_allclose(targeted, -0.05 * np.sign(grad_t), atol=ATOL)  # descends the target's loss


def test_fgm_l2_is_eps_along_the_normalized_gradient():
    model, w, b = _softmax_regression()
    x, labels = _pixels(8, low=0.3, high=0.7), _labels(8)
    z = ((np.asarray(x, np.float64).reshape(8, -1) - MEAN) / STD) @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - np.eye(CLASSES)[np.asarray(labels)]) @ w.T / STD
    expected = 0.1 * grad / np.linalg.norm(grad, axis=1, keepdims=True)
    delta = np.asarray(_attack(model, AttackConfig("fgm-l2", norm="l2"), x, labels, 0.1)) - np.asarray(x)
    np.testing.assert_allclose(delta.reshape(8, -1), expected, atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_fool_raises_the_target_score_exactly_as_w_predicts(norm):
    model, w, _ = _softmax_regression()
    x, labels, target, eps = _pixels(16, low=0.3, high=0.7), _labels(16), 3, 0.05
    x_adv = _attack(model, AttackConfig("linear-fool", norm=norm, target=target), x, labels, eps)
    w_t = w[:, target] / STD  # the target's weights in pixel units
    size = np.abs(w_t).max() if norm == "linf" else np.linalg.norm(w_t)
    delta = (np.asarray(x_adv, np.float64) - np.asarray(x)).reshape(16, -1)
    np.testing.assert_allclose(delta, np.broadcast_to(eps / size * w_t, delta.shape), atol=ATOL)
    gain = np.asarray(_logits_fn(model)(x_adv) - _logits_fn(model)(x))[:, target]
    np.testing.assert_allclose(gain, eps / size * np.sum(w_t * w_t), rtol=1e-3)


def test_linear_fool_untargeted_moves_towards_the_runner_up():
    model, _, _ = _softmax_regression()
    x, labels = _pixels(16, low=0.3, high=0.7), _labels(16)
    logits = np.asarray(_logits_fn(model)(x))
    masked = np.where(np.eye(CLASSES)[np.asarray(labels)] > 0, -np.inf, logits)
    runner_up = masked.argmax(1)
    x_adv = _attack(model, AttackConfig("linear-fool"), x, labels, 0.05)
    gain = np.asarray(_logits_fn(model)(x_adv)) - logits
    assert np.all(gain[np.arange(16), runner_up] >= gain.max(1) - 1e-4)  # that class gains the most


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.name}-{c.norm}-{c.target or 'untargeted'}")
def test_examples_stay_in_pixel_range_and_eps_ball_and_eps_zero_changes_nothing(cfg):
    model = _model("mlp", hidden=[]) if cfg.name == "linear-fool" else _nonlinear()
    logits_fn = _logits_fn(model)
    attack = jax.jit(lambda x, y, e: attacks.run_attack(logits_fn, x, y, e, jax.random.key(0), cfg, CLASSES))
    # uint8 images hit 0 and 1 exactly, where clipping matters
    x, labels = jnp.asarray(np.random.default_rng(0).integers(0, 256, (12, *SHAPE)), jnp.float32) / 255.0, _labels(12)
    eps = 0.1 if cfg.norm == "linf" else 1.0
    if ATTACKS.get(cfg.name).minimum_norm:
        eps *= 3  # room for the smallest perturbations of a few examples
    x_adv, _, targets = attack(x, labels, jnp.float32(eps))
    x_adv = np.asarray(x_adv)
    delta = (x_adv - np.asarray(x)).reshape(12, -1)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    size = np.abs(delta).max(1) if cfg.norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= eps + 1e-5
    if ATTACKS.get(cfg.name).minimum_norm:  # it moves an example only to a success inside the ball
        pred = np.asarray(jnp.argmax(logits_fn(x_adv), -1))
        hit = pred == np.asarray(targets) if cfg.targeted else pred != np.asarray(labels)
        moved = size > 1e-4
        assert moved.any() and np.all(hit[moved])
    else:
        assert size.min() > 0.3 * eps  # it did move, even with clipping at 0 and 1
    np.testing.assert_array_equal(np.asarray(attack(x, labels, jnp.float32(0.0))[0]), np.asarray(x))


def test_targets():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(200, 7)), jnp.float32)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 7, 200), jnp.int32)
    key = jax.random.key(0)
    least = attacks.choose_targets("least-likely", logits, labels, key, 7)
    np.testing.assert_array_equal(np.asarray(least), np.asarray(logits).argmin(1))
    rand = np.asarray(attacks.choose_targets("random", logits, labels, key, 7))
    assert np.all(rand != np.asarray(labels)) and set(rand) == set(range(7))  # never the label, every other class
    assert np.all(np.asarray(attacks.choose_targets(5, logits, labels, key, 7)) == 5)


def test_step_size_and_config_checks():
    names = [f"c{i}" for i in range(CLASSES)]
    assert attacks.step_size_warning(AttackConfig("pgd", step_size=0.05), [0, 0.02, 0.1]) is not None
    assert attacks.step_size_warning(AttackConfig("pgd", step_size=0.01), [0, 0.02, 0.1]) is None
    assert attacks.step_size_warning(AttackConfig("fgsm", step_size=0.05), [0.02]) is None
    bad_configs = [(AttackConfig("pgd", steps=0), "at least 1"),
                   (AttackConfig("fgsm", target=CLASSES), "does not exist"),
                   (AttackConfig("fgsm", target=-1), "does not exist"), (AttackConfig("fgsm", norm="l2"), "fgm-l2"),
                   (AttackConfig("bim", restarts=3), "random start"), (AttackConfig("nope"), "unknown attack")]
    for cfg, message in bad_configs:
        with pytest.raises(UserError, match=message):
            attacks.check_config(cfg, names)
    for bad in ([-0.01], [1.5], []):
        with pytest.raises(UserError):
            attacks.check_eps(bad)


def test_linear_fool_refuses_a_nonlinear_model():
    cfg = AttackConfig("linear-fool")
    for linear in (_model("linear"), _model("mlp", hidden=[])):
        check_attackable(linear.eval_def, linear.params, linear.rest, cfg, SHAPE)
    relu = _nonlinear()
    with pytest.raises(UserError, match="linear model"):
        check_attackable(relu.eval_def, relu.params, relu.rest, cfg, SHAPE)


class _ConvBN(nnx.Module):
    """conv - batch norm - relu - linear: a tiny network with batch norm for the inference-mode tests."""

    def __init__(self, *, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.out = nnx.Linear(8 * 8 * 4, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.bn(self.conv(x))).reshape(x.shape[0], -1))


def _bn_model() -> Model:
    net = _ConvBN(rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    net.bn.mean[...] = jnp.asarray(rng.normal(size=4), jnp.float32)  # running statistics far from a batch's
    net.bn.var[...] = jnp.asarray(rng.uniform(0.2, 3.0, size=4), jnp.float32)
    return Model(*split_model(Classifier(net, channels=1, mean=MEAN, std=STD)))


@pytest.mark.slow
def test_gradients_flow_through_batch_norm_in_inference_mode():
    model = _bn_model()
    x, labels = _pixels(6, seed=3), _labels(6, seed=3)
    y = jax.nn.one_hot(labels, CLASSES)
    grad = np.asarray(attacks.input_gradient(_logits_fn(model), x, y, False))
    assert np.abs(grad).max() > 0

    loss = jax.jit(lambda v: attacks.objective(_logits_fn(model)(v), y, False).sum())  # the model as deployed

    rng, h = np.random.default_rng(1), 1e-3
    for _ in range(5):
        idx = (rng.integers(6), rng.integers(8), rng.integers(8), 0)
        e = np.zeros(x.shape, np.float32)
        e[idx] = h
        numeric = float(loss(x + e) - loss(x - e)) / (2 * h)
        assert numeric == pytest.approx(grad[idx], rel=0.05, abs=1e-3)
    # inference mode: an example's attack does not depend on the rest of its batch (batch statistics would)
    cfg = AttackConfig("pgd", steps=3, step_size=0.02)
    both = _attack(model, cfg, x, labels, 0.05)
    alone = _attack(model, cfg, x[:3], labels[:3], 0.05)
    np.testing.assert_allclose(np.asarray(both[:3]), np.asarray(alone), atol=1e-5)


def test_robustness_rows_on_a_batch_norm_model_leave_its_statistics_alone():
    model = _bn_model()
    before = jax.tree.map(np.asarray, model.rest)
    x = np.random.default_rng(0).integers(0, 256, (50, *SHAPE), dtype=np.uint8)
    y = np.random.default_rng(1).integers(0, CLASSES, 50).astype(np.int32)
    names = [f"c{i}" for i in range(CLASSES)]
    out = robustness(model, x, y, names, AttackConfig("fgsm"), [0.0, 0.1], batch_size=16, mesh=data_mesh(),
                     examples=3)
    clean, attacked = out["rows"]
    assert clean["n"] == attacked["n"] == 50  # 50 = 3 batches of 16 + a padded one: every example once
    assert clean["accuracy"] == clean["clean_accuracy"] and clean["success_rate"] == 0.0
    assert attacked["accuracy"] <= clean["accuracy"] and attacked["max_linf"] == pytest.approx(0.1, abs=ATOL)
    assert len(out["examples"].x) == 3
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, model.rest))
    # inference mode end to end: the batch size (hence the padding, and any batch statistics) changes nothing
    other = robustness(model, x, y, names, AttackConfig("fgsm"), [0.0, 0.1], batch_size=7, mesh=data_mesh())
    assert other["rows"] == out["rows"]


def test_use_predictions_attacks_the_models_own_answers():
    model = _bn_model()
    x = np.random.default_rng(2).integers(0, 256, (40, *SHAPE), dtype=np.uint8)
    y = np.random.default_rng(3).integers(0, CLASSES, 40).astype(np.int32)  # random labels: mostly "wrong"
    mesh, key, cfg = data_mesh(), jax.random.key(0), AttackConfig("fgsm")
    clean = np.asarray(_logits_fn(model)(jnp.asarray(x, jnp.float32) / 255.0)).argmax(1).astype(np.int32)

    def adv_pred(labels, use_predictions):
        step = make_attack_step(model.eval_def, cfg, num_classes=CLASSES, batch_size=40, mesh=mesh,
                                use_predictions=use_predictions)
        results, _ = attack_split(step, model.params, model.rest, x, labels, 0.2, key)
        return results["adv_pred"]

    by_predictions = adv_pred(y, True)
    np.testing.assert_array_equal(by_predictions, adv_pred(clean, False))  # same as labelling with predictions
    assert not np.array_equal(by_predictions, adv_pred(y, False))  # and not what the random labels give



@pytest.mark.parametrize("name", ["apgd-ce", "square"])
def test_a_run_that_stops_once_every_example_is_fooled_fools_the_same_examples(name):
    """APGD and Square stop early once no example of the batch is left to fool (the reference's APGD runs on); the
    same run forced through every step fools exactly the same examples, and the early stop saves steps."""
    model, n = _nonlinear(), 32
    x, labels = _pixels(n, seed=3), _labels(n, seed=3)
    logits_fn, eps = _logits_fn(model), jnp.float32(0.3)
    run = ATTACKS.get(name).run(AttackConfig(name, steps=200, queries=2000))
    whole = dataclasses.replace(run, working=None)
    counted = attacks.Run(start=lambda *a: (run.start(*a), 0), step=lambda f, i, s: (run.step(f, i, s[0]), s[1] + 1),
                          finish=lambda f, s: s[1], steps=run.steps, working=lambda s: run.working(s[0]))

    def attack(r):
        return jax.jit(lambda v: attacks.run_loop(r, logits_fn, v, labels, None, eps, jax.random.key(2), 0))(x)

    fooled = np.asarray(jnp.argmax(logits_fn(attack(run)), -1) != labels)
    np.testing.assert_array_equal(fooled, np.asarray(jnp.argmax(logits_fn(attack(whole)), -1) != labels))
    assert fooled.all()  # every example fell, so the run had a reason to stop...
    assert 0 < int(attack(counted)) < run.steps / 4  # ...and it did, long before its last step
    if name == "apgd-ce":  # a random model fooled by one sample may not be by the next: EOT runs take every step
        assert ATTACKS.get(name).run(AttackConfig(name, eot=2)).working is None

