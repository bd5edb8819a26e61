"""AutoAttack's sanity flags, each triggered by the model it exists for; the AutoAttack driver's bookkeeping;
the minimum-norm attacks against the analytic minimum of an affine model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cnncli.adversarial import sanity
from cnncli.adversarial.attacks import AttackConfig, run_attack
from cnncli.adversarial.autoattack import autoattack, version_attacks
from cnncli.adversarial.robustness import logits_function, model_warnings
from cnncli.models import build_model
from cnncli.recipe import ModelConfig
from cnncli.train.state import Model, split_model
from cnncli.train.steps import data_mesh

SHAPE = (8, 8, 1)
CLASSES = 4
MEAN, STD = 0.3, 0.25
NAMES = [f"c{i}" for i in range(CLASSES)]


def _net(hidden=(32,), dropout=0.0):
    return build_model(ModelConfig(name="mlp", dropout=dropout, args={"hidden": list(hidden)}), input_shape=SHAPE,
                       num_classes=CLASSES, mean=MEAN, std=STD, seed=1)


class _Softmaxed(nnx.Module):
    """A model that returns probabilities: the mistake the check exists for."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x):
        return jax.nn.softmax(self.inner(x))


class _StopGradient(nnx.Module):
    """A model whose input gradient is zero everywhere (gradient masking)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x):
        return self.inner(jax.lax.stop_gradient(x))


def _model(module) -> Model:
    return Model(*split_model(module))


def _dropout_left_on() -> Model:
    """An MLP with dropout whose inference graph is its training graph: dropout stays on."""
    model = _model(_net(dropout=0.5))
    return Model(model.train_def, model.train_def, model.params, model.rest)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), rng.integers(0, CLASSES, n).astype(np.int32)


def test_a_plain_model_raises_no_flag():
    x, y = _data()
    warnings, checks = model_warnings(_model(_net()), x, y)
    assert warnings == [] and checks == {"checked": 64, "zero_gradients": 0}


@pytest.mark.parametrize("build, message", [
    (lambda: _model(_Softmaxed(_net())), "look like probabilities"),
    (lambda: _model(_StopGradient(_net())), "64 of 64 inputs (100%) have a zero gradient"),
    (_dropout_left_on, "change between two forward passes"),
])
def test_each_flag_is_raised_by_the_model_it_exists_for(build, message):
    x, y = _data()
    warnings, _ = model_warnings(build(), x, y)
    assert len(warnings) == 1 and message in warnings[0], warnings


@pytest.mark.slow
def test_autoattack_flags_dropout_at_inference_and_square_beating_masked_gradients():
    x, y = _data(200)
    configs = [AttackConfig("apgd-ce", steps=5), AttackConfig("square", queries=300)]
    out = autoattack(_dropout_left_on(), x, y, NAMES, [0.1], configs=configs, version="custom", mesh=data_mesh(),
                     batch_size=128)
    assert any("clean accuracy differs between two passes" in w for w in out["warnings"]), out["warnings"]
    assert any("change between two forward passes" in w for w in out["warnings"])

    masked = _model(_StopGradient(_net()))
    out = autoattack(masked, x, y, NAMES, [0.1], configs=configs, version="custom", mesh=data_mesh())
    apgd_stage, square_stage = out["rows"][0]["stages"][1:]
    assert square_stage["fooled"] > 0.01 * len(y)  # Square needs no gradient
    assert any("Square, which uses no gradients, lowered the robust accuracy" in w for w in out["warnings"])
    assert any("zero gradient" in w for w in out["warnings"])
    plain = autoattack(_model(_net()), x, y, NAMES, [0.1], configs=configs, version="custom", mesh=data_mesh())
    assert not any("Square" in w for w in plain["warnings"])  # gradients work: APGD leaves Square nothing


def test_square_flag_threshold():
    def stages(*accuracies):
        names = ["clean", "apgd-ce", "square"]
        return [{"attack": n, "robust_accuracy": a} for n, a in zip(names, accuracies)]

    assert sanity.square_beats_white_box(stages(0.9, 0.5, 0.499)) is None  # 0.1 points: within the reference's 0.2
    assert "0.50%" in sanity.square_beats_white_box(stages(0.9, 0.5, 0.495))
    assert sanity.square_beats_white_box([{"attack": "clean", "robust_accuracy": 0.9},
                                          {"attack": "square", "robust_accuracy": 0.1}]) is None  # no white box ran


@pytest.mark.slow
def test_autoattack_bookkeeping_matches_the_adversarial_images():
    """Robust means: classified correctly at its saved image, which lies inside the ball and [0, 1]; each stage only
    lowers the robust accuracy; the full sequence is at least as strong as its attacks alone."""
    model = _model(_net())
    x, y = _data(96, seed=1)
    configs = [AttackConfig("apgd-ce", steps=10), AttackConfig("apgd-t", steps=10, targets=2),
               AttackConfig("fab-t", steps=10, targets=2), AttackConfig("square", queries=100)]
    eps = [0.02, 0.05]
    out = autoattack(model, x, y, NAMES, eps, configs=configs, version="custom", mesh=data_mesh(), batch_size=40)
    logits = jax.jit(logits_function(model.eval_def, model.params, model.rest))
    for row, example in zip(out["rows"], out["examples"], strict=True):
        accuracies = [s["robust_accuracy"] for s in row["stages"]]
        assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] == row["clean_accuracy"]
        assert sum(s["fooled"] for s in row["stages"]) == round((row["clean_accuracy"] - row["robust_accuracy"]) * 96)
        pred = np.asarray(jnp.argmax(logits(example["x_adv"]), -1))
        np.testing.assert_array_equal(pred == y, example["robust"])
        delta = example["x_adv"] - x.astype(np.float32) / 255
        assert np.abs(delta).max() <= row["eps"] + 1e-6 and example["x_adv"].min() >= 0 and example["x_adv"].max() <= 1
    assert out["rows"][0]["robust_accuracy"] > out["rows"][1]["robust_accuracy"]
    for cfg in (configs[0], configs[3]):
        alone = autoattack(model, x, y, NAMES, eps, configs=[cfg], version="custom", mesh=data_mesh(), batch_size=40,
                           seed=0)
        for a, b in zip(out["rows"], alone["rows"], strict=True):
            assert a["robust_accuracy"] <= b["robust_accuracy"] + 1e-9


def test_versions_are_the_references():
    standard = version_attacks("standard")
    assert [(c.name, c.steps, c.restarts) for c in standard[:3]] == [("apgd-ce", 100, 1), ("apgd-t", 100, 1),
                                                                     ("fab-t", 100, 1)]
    assert standard[1].targets == standard[2].targets == 9 and standard[3].queries == 5000
    plus = version_attacks("plus", "l2")
    assert [c.name for c in plus] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert all(c.norm == "l2" for c in plus) and [c.restarts for c in plus[:3]] == [5, 5, 5]
    assert [(c.name, c.eot) for c in version_attacks("rand")] == [("apgd-ce", 20), ("apgd-dlr", 20)]
    assert [c.name for c in version_attacks("custom", attacks=["pgd", "square"])] == ["pgd", "square"]


def test_eot_averages_over_the_models_randomness():
    """With dropout on, the keyed logits differ per key (the samples EOT averages) and the plain ones do not."""
    model = _dropout_left_on()
    logits = logits_function(model.eval_def, model.params, model.rest)
    x = jnp.asarray(_data(8)[0], jnp.float32) / 255
    np.testing.assert_array_equal(np.asarray(logits(x)), np.asarray(logits(x)))
    assert not np.allclose(logits(x, key=jax.random.key(0)), logits(x, key=jax.random.key(1)))
    deterministic = _model(_net())
    plain = logits_function(deterministic.eval_def, deterministic.params, deterministic.rest)
    np.testing.assert_array_equal(np.asarray(plain(x, key=jax.random.key(0))), np.asarray(plain(x)))


# ----------------------------------------------------------------------------- minimum-norm attacks, affine model


def _affine():
    """Softmax regression and, per example, the analytic smallest L2 and Linf steps to another class."""
    model = _model(_net(hidden=()))
    (layer,) = nnx.to_pure_dict(model.params)["net"].values()
    w = np.asarray(layer["kernel"], np.float64) / STD  # logits = w^T x + const, in pixel units
    x = np.random.default_rng(2).uniform(0.4, 0.6, (16, *SHAPE)).astype(np.float32)
    z = np.asarray(logits_function(model.eval_def, model.params, model.rest)(x), np.float64)
    y = z.argmax(1).astype(np.int32)  # attack the model's own answers
    gaps, normals = [], []
    for i in range(16):
        others = [j for j in range(CLASSES) if j != y[i]]
        g = np.array([z[i, y[i]] - z[i, j] for j in others])
        v = np.array([w[:, y[i]] - w[:, j] for j in others])
        gaps.append(g)
        normals.append(v)
    l2 = np.array([np.min(g / np.linalg.norm(v, axis=1)) for g, v in zip(gaps, normals)])
    linf = np.array([np.min(g / np.abs(v).sum(1)) for g, v in zip(gaps, normals)])
    return model, jnp.asarray(x), jnp.asarray(y), {"l2": l2, "linf": linf}


def _size(x_adv, x, norm):
    d = np.asarray(x_adv - x, np.float64).reshape(len(x), -1)
    return np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_deepfool_and_fab_find_the_affine_models_closest_boundary(norm):
    model, x, y, minimum = _affine()
    logits = logits_function(model.eval_def, model.params, model.rest)
    big = 10.0  # no budget: the unbounded minimum-norm attacks
    cfg = AttackConfig("deepfool", norm=norm, steps=5)
    deepfool = run_attack(logits, x, y, big, jax.random.key(0), cfg, CLASSES)[0]
    # one linearization is exact: the boundary plus DeepFool's nudge of 1e-4, then its 2% overshoot
    np.testing.assert_allclose(_size(deepfool, x, norm), 1.02 * (minimum[norm] + 1e-4), rtol=1e-3)
    assert np.all(np.asarray(jnp.argmax(logits(deepfool), -1)) != np.asarray(y))
    fab = run_attack(logits, x, y, big, jax.random.key(0), AttackConfig("fab", norm=norm, steps=20), CLASSES)[0]
    size = _size(fab, x, norm)
    assert np.all(size >= minimum[norm] * (1 - 1e-3)) and np.all(size <= minimum[norm] * 1.06)
    assert np.all(np.asarray(jnp.argmax(logits(fab), -1)) != np.asarray(y))
    # inside a budget below the minimum nothing is found, and nothing moves
    small = float(minimum[norm].min()) * 0.9
    for name in ("deepfool", "fab"):
        kept = run_attack(logits, x, y, small, jax.random.key(0), AttackConfig(name, norm=norm, steps=5), CLASSES)[0]
        np.testing.assert_array_equal(np.asarray(kept), np.asarray(x))


def test_cw_l2_approaches_the_affine_minimum():
    model, x, y, minimum = _affine()
    logits = logits_function(model.eval_def, model.params, model.rest)
    cfg = AttackConfig("cw-l2", norm="l2", steps=300, c=10.0)
    adv = run_attack(logits, x, y, 10.0, jax.random.key(0), cfg, CLASSES)[0]
    fooled = np.asarray(jnp.argmax(logits(adv), -1)) != np.asarray(y)
    size = _size(adv, x, "l2")
    assert fooled.mean() > 0.9
    assert np.all(size[fooled] >= minimum["l2"][fooled] * (1 - 1e-3))
    assert np.median(size[fooled] / minimum["l2"][fooled]) < 1.2
