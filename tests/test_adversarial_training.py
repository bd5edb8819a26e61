"""Adversarial training beyond the mixed objective: TRADES (its KL term against PyTorch's, its gradient),
fast FGSM with a random start, and the catastrophic-overfitting warning."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnncli.inspect import figures
from cnncli.recipe import AdversarialConfig
from cnncli.train.loop import CO_DROP, CO_GAP, catastrophic_overfitting, training_attack
from cnncli.train.steps import trades_kl
from tests.helpers import cli, metric_rows

SYNTHETIC = ["--set", "data.source=synthetic:16x16x1:4", "--set", "data.limit=640", "--set", "train.batch_size=32"]


def test_trades_kl_is_pytorchs_batchmean_kl():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    clean, adversarial = rng.normal(size=(2, 32, 10)).astype(np.float32) * 3
    # the TRADES reference: KLDivLoss(size_average=False)(log_softmax(adv), softmax(clean)) / batch_size
    reference = torch.nn.KLDivLoss(reduction="sum")(torch.log_softmax(torch.from_numpy(adversarial), 1),
                                                   torch.softmax(torch.from_numpy(clean), 1)).item() / 32
    assert float(trades_kl(jnp.asarray(clean), jnp.asarray(adversarial))) == pytest.approx(reference, rel=1e-5)
    assert float(trades_kl(jnp.asarray(clean), jnp.asarray(clean))) == pytest.approx(0.0, abs=1e-6)


def _step(perturb, trades):
    """Parameters and totals after one SGD step of a small MLP on a fixed batch (mix 0.5 unless TRADES)."""
    from cnncli.recipe import validate
    from cnncli.train.state import TrainState, build, init_totals
    from cnncli.train.steps import StepOptions, data_mesh, make_train_step

    model = build(validate({"name": "t", "model": {"name": "mlp", "args": {"hidden": [16]}}}), (8, 8, 1), 3)
    tx = optax.sgd(0.5)
    step = make_train_step(model.train_def, tx, num_classes=3, batch_size=16, mesh=data_mesh(),
                           options=StepOptions(perturb=perturb, mix=0.5, trades=trades))
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.integers(0, 256, (16, 8, 8, 1)), jnp.uint8)
    ys = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
    state = TrainState(model.params, model.rest, tx.init(model.params), jnp.zeros((), jnp.int32))
    state, totals = step(state, init_totals(), xs, ys, jnp.int32(0), jax.random.key(0))
    return np.concatenate([np.ravel(p) for p in jax.tree.leaves(jax.device_get(state.params))]), totals


def test_trades_step_is_clean_cross_entropy_plus_beta_times_the_kl():
    seen = []

    def shift(params, rest, x, labels, key):  # a fixed "attack": the KL term is then a fixed function of the weights
        return jnp.clip(x + 0.2 * jnp.sign(x - 0.5), 0.0, 1.0)

    def identity(params, rest, x, labels, key):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), labels)  # the step is jitted: values come back here
        return x

    clean, clean_totals = _step(None, None)
    same, same_totals = _step(identity, 3.0)  # x_adv = x: the KL and its gradient vanish, the clean step remains
    np.testing.assert_allclose(same, clean, rtol=1e-5, atol=1e-6)
    assert float(same_totals["loss"]) == pytest.approx(float(clean_totals["loss"]), rel=1e-5)
    # the attack saw the model's predictions (soft rows summing to 1), not the one-hot labels
    (labels,) = seen
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-5)
    assert labels.shape == (16, 3) and labels.max() < 0.99 and labels.min() > 0.0
    # SGD's update is linear in the gradient, grad CE(clean) + beta * grad KL: doubling beta doubles the KL's share
    one, totals_one = _step(shift, 1.0)
    two, _ = _step(shift, 2.0)
    assert np.abs(one - clean).max() > 1e-4
    np.testing.assert_allclose(two - clean, 2 * (one - clean), rtol=1e-3, atol=1e-6)
    # the reported loss is the clean cross-entropy, as in the clean step
    assert float(totals_one["loss"]) == pytest.approx(float(clean_totals["loss"]), rel=1e-5)


def test_fast_fgsm_is_one_step_of_1_25_eps_from_a_random_start():
    cfg = training_attack(AdversarialConfig(attack="fast-fgsm", eps=0.1))
    assert (cfg.name, cfg.steps, cfg.step_size) == ("pgd", 1, pytest.approx(0.125))
    assert training_attack(AdversarialConfig(attack="fast-fgsm", eps=0.1, step_size=0.05)).step_size == 0.05
    assert training_attack(AdversarialConfig(attack="pgd")).step_size == 0.02  # the pgd default is unchanged


def test_catastrophic_overfitting_warning():
    def rows(pgd, single):
        return [{"epoch": i + 1, "val_pgd_acc": p, "val_robust_acc": s} for i, (p, s) in enumerate(zip(pgd, single))]

    collapse = catastrophic_overfitting(rows([0.40, 0.45, 0.02], [0.50, 0.55, 0.90]))
    assert "catastrophic overfitting at epoch 3" in collapse and "45.0% (epoch 2) to 2.0%" in collapse
    assert catastrophic_overfitting(rows([0.40, 0.45, 0.45 - CO_DROP + 0.01], [0.5, 0.55, 0.6])) is None  # small
    assert catastrophic_overfitting(rows([0.40, 0.45, 0.02], [0.50, 0.55, 0.30])) is None  # both fell: not CO
    assert catastrophic_overfitting(rows([0.4], [0.5])) is None
    never_robust = catastrophic_overfitting(rows([0.017], [0.774]))  # collapsed within its first epoch
    assert "catastrophic overfitting at epoch 1" in never_robust and "1.7% against 77.4%" in never_robust
    assert catastrophic_overfitting(rows([0.41, 0.41], [0.72, 0.72 - 0.01])) is None  # 31 points apart: robust enough
    assert catastrophic_overfitting(rows([0.30], [0.30 + CO_GAP - 0.01])) is None


def test_trades_needs_a_random_start(tmp_path):
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", tmp_path / "run", *SYNTHETIC,
                 "--set", "train.adversarial={attack: fgsm, eps: 0.1, trades: 6}")
    assert result.exit_code == 2 and "TRADES needs a random start" in result.stderr


@pytest.mark.slow
def test_fast_fgsm_training_validates_against_pgd_and_keeps_the_most_pgd_robust_epoch(tmp_path):
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", tmp_path / "run", *SYNTHETIC,
                 "--set", "train.epochs=2", "--set", "train.adversarial={attack: fast-fgsm, eps: 0.1, mix: 1}")
    assert result.exit_code == 0, result.output
    rows = metric_rows(tmp_path / "run")
    for r in rows:  # PGD-10 is at least as strong as the one-step attack on the same images
        assert r["val_pgd_acc"] <= r["val_robust_acc"] + 1e-9 and r["val_robust_acc"] <= r["val_acc"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    most_robust = max(rows, key=lambda r: r["val_pgd_acc"])
    assert summary["best_epoch"] == most_robust["epoch"]
    assert summary["best_val_pgd_acc"] == most_robust["val_pgd_acc"]
    assert figures.best_epoch(rows) == summary["best_epoch"]  # the curves' star marks the epoch the loop kept
    assert " pgd " in result.stderr and "validation PGD accuracy" in result.stdout  # epoch lines and results


@pytest.mark.slow
def test_trades_training_runs_and_reports_robust_accuracy(tmp_path):
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", tmp_path / "run", *SYNTHETIC,
                 "--set", "train.epochs=1",
                 "--set", "train.adversarial={attack: pgd, eps: 0.1, steps: 2, step_size: 0.05, trades: 6}")
    assert result.exit_code == 0, result.output
    (row,) = metric_rows(tmp_path / "run")
    assert np.isfinite(row["train_loss"]) and row["val_robust_acc"] <= row["val_acc"] and "val_pgd_acc" not in row
