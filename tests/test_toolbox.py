"""The training toolbox: EMA, bf16, early stopping, top-k checkpoints, class weights, balanced sampling,
schedules, TTA, augment-preview and sweeps (unit tests plus a few short runs on real Fashion-MNIST)."""

import json
import math
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnncli.errors import UserError
from cnncli.recipe import OptimConfig, ScheduleConfig
from cnncli.train import optim, toolbox
from tests.helpers import cli, metric_rows

# Small, quick runs on a slice of real data (see helpers.SMALL_LENET).
TINY = ["--set", "data.limit=2000", "--set", "train.batch_size=64", "--set", "train.log_every=10"]
# 1,000 images, Adam 0.01, constant lr: validation accuracy per epoch is 67, 78, 82, 82, 74% (seed 0),
# so the best epoch (3) is not the last: what early stopping must restore.
PEAKS_EARLY = ["--set", "data.limit=1000", "--set", "train.batch_size=50", "--set", "schedule.name=constant",
               "--set", "optim.lr=0.01", "--set", "train.epochs=8"]


def _eval_json(*args):
    result = cli("eval", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------- EMA


def test_ema_update_follows_the_warmed_up_decay():
    params, new = {"w": jnp.full((3,), 1.0)}, {"w": jnp.full((3,), 3.0)}
    ema = toolbox.init_ema(params, {"n": jnp.zeros((), jnp.uint32)})
    out = toolbox.ema_update(ema, new, {"n": jnp.ones((), jnp.uint32)}, 0.999, jnp.asarray(5))
    d = 6.0 / 15.0  # min(0.999, (1 + step) / (10 + step)) at step 5
    np.testing.assert_allclose(out["params"]["w"], d * 1.0 + (1 - d) * 3.0, rtol=1e-6)
    assert out["rest"]["n"] == 1  # integer state is copied, not averaged
    late = toolbox.ema_update(ema, new, {"n": jnp.ones((), jnp.uint32)}, 0.9, jnp.asarray(10_000))
    np.testing.assert_allclose(late["params"]["w"], 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6)
    exact = toolbox.ema_update(ema, new, {"n": jnp.ones((), jnp.uint32)}, 0.0, jnp.asarray(10_000))
    assert jnp.array_equal(exact["params"]["w"], new["w"])


@pytest.fixture(scope="module")
def ema0_run(tmp_path_factory, fashion):
    """3 epochs with EMA decay 0, top-2 checkpoints and the plateau schedule (patience 0)."""
    run_dir = tmp_path_factory.mktemp("toolbox") / "ema0"
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", run_dir, *TINY, "--set", "train.epochs=3",
                 "--set", "train.ema=0", "--set", "train.keep_checkpoints=2", "--set", "schedule.name=plateau",
                 "--set", "schedule.patience=0", "--set", "schedule.factor=0.5")
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.mark.slow
def test_ema_with_decay_zero_equals_the_raw_weights(ema0_run):
    rows = metric_rows(ema0_run)
    assert all(r["val_ema_acc"] == r["val_acc"] and r["val_ema_loss"] == r["val_loss"] for r in rows)
    summary = json.loads((ema0_run / "summary.json").read_text())
    assert summary["test_ema"]["top1"] == summary["test"]["top1"]
    raw, ema = _eval_json(ema0_run), _eval_json(ema0_run, "--ema")
    assert ema["weights"] == "ema" and (ema["top1"], ema["loss"]) == (raw["top1"], raw["loss"])


def test_eval_ema_of_a_run_without_ema_is_a_user_error(lenet_run):
    result = cli("eval", lenet_run, "--ema")
    assert result.exit_code == 2 and "trained without train.ema" in result.stderr


@pytest.mark.slow
def test_keep_top_k_keeps_the_k_best_epochs(ema0_run):
    index = json.loads((ema0_run / "checkpoints" / "index.json").read_text())
    accs = {r["epoch"]: r["val_acc"] for r in metric_rows(ema0_run)}
    top = index["top"]
    assert len(top) == 2 and [e["score"] for e in top] == sorted(accs.values(), reverse=True)[:2]
    assert {e["epoch"] for e in top} == {e for e, _ in sorted(accs.items(), key=lambda kv: -kv[1])[:2]}
    on_disk = {p.name for p in (ema0_run / "checkpoints").iterdir() if p.is_dir()}
    assert on_disk == {e["dir"] for e in top} | {index["latest"]["dir"]}
    worst = min(accs, key=accs.get)
    if worst != 3:  # the latest is kept whatever its score; any other epoch outside the top 2 is gone
        assert not (ema0_run / "checkpoints" / f"step_{worst * 28}").exists()  # 1,800 images / 64 = 28 steps


@pytest.mark.slow
def test_plateau_lr_follows_the_validation_losses(ema0_run):
    rows = metric_rows(ema0_run)
    base = rows[0]["lr"]
    for i, row in enumerate(rows):
        scale = optim.plateau_scale([r["val_loss"] for r in rows[:i]], factor=0.5, patience=0)
        assert row["lr"] == pytest.approx(base * scale)


# ----------------------------------------------------------------------------- schedules


def _values(name, steps, spe=10, **cfg):
    fn = optim.SCHEDULES.get(name)(ScheduleConfig(name=name, **cfg), 1000, spe)
    return [float(fn(s)) for s in steps]


def test_multistep_drops_at_each_milestone():
    assert _values("multistep", [0, 19, 20, 49, 50, 999], milestones=[5, 2], gamma=0.1) == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_exponential_multiplies_by_gamma_per_epoch():
    assert _values("exponential", [0, 5, 10, 30], gamma=0.5) == pytest.approx([1, 0.5 ** 0.5, 0.5, 0.125])


def test_cosine_restarts_restart_with_growing_cycles():
    # cycles of 20, 40, 80 steps (2 epochs x 2^i): starts at 0, 20, 60, 140
    values = _values("cosine_restarts", [0, 10, 20, 40, 59, 60, 100, 140], cycle_epochs=2, cycle_mult=2,
                     final_fraction=0.1)
    assert values[:3] == pytest.approx([1.0, 0.55, 1.0])
    assert values[3] == pytest.approx(0.55) and values[4] < 0.11
    assert values[5:] == pytest.approx([1.0, 0.55, 1.0])
    equal = _values("cosine_restarts", [0, 5, 10, 15], spe=1, cycle_epochs=10, cycle_mult=1)
    assert equal == pytest.approx([1.0, 0.5, 1.0, 0.5])


def _sgdr_reference(step: int, first: float, mult: float, final: float) -> float:
    """Loshchilov & Hutter's SGDR in float64, cycle by cycle."""
    start, length = 0.0, first
    while step >= start + length:
        start, length = start + length, length * mult
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (step - start) / length))


@pytest.mark.parametrize("cycle_epochs, spe, mult, final", [(2, 10, 2.0, 0.1), (0.5, 7, 1.5, 0.0), (2.5, 3, 1.0, 0.2),
                                                            (0.3, 1, 3.0, 0.0)])
def test_cosine_restarts_follow_sgdr_at_every_step_of_training(cycle_epochs, spe, mult, final):
    total = 30 * spe
    fn = optim.SCHEDULES.get("cosine_restarts")(
        ScheduleConfig(name="cosine_restarts", cycle_epochs=cycle_epochs, cycle_mult=mult, final_fraction=final),
        total, spe)
    got = np.asarray(jax.jit(jax.vmap(fn))(jnp.arange(total)))
    first = max(cycle_epochs * spe, 1.0)
    expected = [_sgdr_reference(s, first, mult, final) for s in range(total)]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_plateau_scale_reduces_after_patience_epochs():
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.5]
    assert optim.plateau_scale(losses[:4], 0.5, 2) == 1.0  # 2 bad epochs: still patient
    assert optim.plateau_scale(losses[:5], 0.5, 2) == 0.5  # the 3rd bad epoch drops the lr
    assert optim.plateau_scale(losses[:8], 0.5, 2) == 0.25  # the count restarts after a drop
    assert optim.plateau_scale(losses, 0.5, 2) == 0.25
    assert optim.plateau_scale([1.0, 1.0 - 1e-6], 0.5, 0) == 0.5  # below the relative threshold: no gain


def test_plateau_factor_lives_in_the_optimizer_state():
    params = {"w": jnp.ones(3)}
    tx = optim.build_optimizer(OptimConfig(name="momentum", lr=0.1), lambda s: 0.1, params, plateau=True)
    state = tx.init(params)
    assert optim.get_plateau_scale(state) == 1.0
    assert optim.get_plateau_scale(optax.adam(0.1).init(params)) is None
    grads = {"w": jnp.full(3, 2.0)}
    full = tx.update(grads, state, params)[0]["w"]
    half = tx.update(grads, optim.set_plateau_scale(state, 0.5), params)[0]["w"]
    np.testing.assert_allclose(half, full / 2)


# ----------------------------------------------------------------------------- early stopping


def test_epochs_without_improvement():
    assert toolbox.epochs_without_improvement([], 0.0) == 0
    assert toolbox.epochs_without_improvement([0.5, 0.6, 0.6, 0.55], 0.0) == 2
    assert toolbox.epochs_without_improvement([0.5, 0.6, 0.605], 0.01) == 1  # +0.005 is within min_delta


@pytest.mark.slow
def test_early_stopping_restores_the_best_epoch(tmp_path, fashion):
    run_dir = tmp_path / "es"
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", run_dir, *PEAKS_EARLY,
                 "--set", "train.early_stopping.patience=2")
    assert result.exit_code == 0, result.output
    rows = metric_rows(run_dir)
    accs = [r["val_acc"] for r in rows]
    best = int(np.argmax(accs)) + 1
    assert best < len(rows) < 8 and "early stopping after epoch" in result.stderr
    assert toolbox.epochs_without_improvement(accs, 0.0) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "early" and summary["best_epoch"] == best
    assert summary["reported"] == {"checkpoint": "best", "epoch": best}
    best_eval, last_eval = _eval_json(run_dir), _eval_json(run_dir, "--checkpoint", "latest")
    assert summary["test"]["top1"] == best_eval["top1"] != last_eval["top1"]

    # resuming a stopped run does not train on; it only rewrites the summary, here without restore_best
    recipe = (run_dir / "recipe.yaml").read_text()
    assert "restore_best: true" in recipe
    (run_dir / "recipe.yaml").write_text(recipe.replace("restore_best: true", "restore_best: false"))
    assert cli("train", "--resume", "--run-dir", run_dir).exit_code == 0
    assert len(metric_rows(run_dir)) == len(rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reported"] == {"checkpoint": "latest", "epoch": len(rows)}
    assert summary["test"]["top1"] == last_eval["top1"]


def _reference_and_fresh_run(tmp_path, overrides):
    """A LeNet-5 recipe with `overrides`, its splits, a run trained to the end (the reference) and a started run
    with the same recipe (to interrupt and resume)."""
    from cnncli import recipe as recipe_lib
    from cnncli.data.pipeline import load_splits
    from cnncli.run.rundir import RunDir
    from cnncli.train.loop import start_run, train

    recipe = recipe_lib.load("lenet5_fashion_mnist", overrides)
    splits = load_splits(recipe.data, recipe.seed)
    reference, resumed = RunDir(tmp_path / "reference"), RunDir(tmp_path / "resumed")
    for run in (reference, resumed):
        start_run(recipe, splits, run)
    train(recipe, splits, reference)
    return recipe, splits, reference, resumed


class _CtrlCAt:
    """A training display that presses Ctrl-C (SIGINT to this process) at one step of one epoch."""

    def __init__(self, epoch: int, step: int):
        self.at = (epoch, step)

    def update(self, *, epoch, step, **kw):
        if (epoch, step) == self.at:
            signal.raise_signal(signal.SIGINT)

    def start(self, **kw): ...
    def epoch_done(self, row): ...
    def message(self, text): ...
    def finish(self): ...


@pytest.mark.slow
def test_ctrl_c_with_restore_best_reports_the_best_epoch(tmp_path, fashion):
    from cnncli import recipe as recipe_lib
    from cnncli.data.pipeline import load_splits
    from cnncli.run.rundir import RunDir
    from cnncli.train.loop import Interrupted, start_run, train

    overrides = [a for a in PEAKS_EARLY if a != "--set"] + ["train.early_stopping.patience=5", "train.log_every=1"]
    recipe = recipe_lib.load("lenet5_fashion_mnist", overrides)
    splits = load_splits(recipe.data, recipe.seed)
    run = RunDir(tmp_path / "stopped")
    start_run(recipe, splits, run)
    with pytest.raises(Interrupted, match=r"summary.json reports the best epoch \(3\)"):
        train(recipe, splits, run, display=_CtrlCAt(epoch=4, step=10))  # 0-based epoch 4: the 74% one
    summary = json.loads(run.summary.read_text())
    assert summary["stopped"] == "user" and summary["reported"] == {"checkpoint": "best", "epoch": 3}
    assert summary["test"]["top1"] == _eval_json(run.path)["top1"]
    # the flag set during step 10 stops the loop after the next step, which is checkpointed for a resume
    assert json.loads((run.checkpoints / "index.json").read_text())["latest"]["step_in_epoch"] == 11


@pytest.mark.slow
def test_interrupted_run_with_the_toolbox_state_resumes_exactly(tmp_path, fashion):
    """EMA weights, the plateau factor, balanced draws and class weights: a resumed run matches."""
    from cnncli.train.loop import Interrupted, train

    # validation loss per epoch: 0.77, 0.69, 0.44, 0.55, ...: the plateau factor halves after epoch 4
    overrides = ["data.limit=1000", "train.batch_size=50", "train.epochs=5", "train.log_every=1", "train.ema=0.9",
                 "schedule.name=plateau", "schedule.patience=0", "schedule.factor=0.5", "optim.lr=0.01",
                 "data.balanced_sampling=true", "train.class_weights=balanced"]
    recipe, splits, reference, resumed = _reference_and_fresh_run(tmp_path, overrides)
    with pytest.raises(Interrupted):
        train(recipe, splits, resumed, display=_CtrlCAt(epoch=4, step=5))  # after the drop
    train(recipe, splits, resumed, resume=True)
    rows = metric_rows(reference.path)
    assert metric_rows(resumed.path) == rows
    assert rows[-1]["lr"] == rows[0]["lr"] / 2  # the plateau factor did drop (and was restored on resume)
    a, b = (json.loads(r.summary.read_text()) for r in (reference, resumed))
    assert a["test_ema"] == b["test_ema"] and a["test"]["top1"] == b["test"]["top1"]


def test_options_that_need_validation_data_say_so():
    for option in ("train.early_stopping.patience=2", "train.keep_checkpoints=2", "schedule.name=plateau"):
        result = cli("train", "lenet5_fashion_mnist", "--dry-run", "--set", "data.val_fraction=0", "--set", option)
        assert result.exit_code == 2 and "data.val_fraction is 0" in result.stderr, option


# ----------------------------------------------------------------------------- imbalanced data


def test_class_weights_weight_the_loss():
    logits = jax.random.normal(jax.random.key(0), (6, 3))
    labels = jax.nn.one_hot(jnp.array([0, 0, 1, 1, 2, 2]), 3)
    ce = optax.softmax_cross_entropy(logits, labels)
    assert toolbox.weighted_cross_entropy(logits, labels, None) == pytest.approx(ce.mean())
    assert toolbox.weighted_cross_entropy(logits, labels, jnp.ones(3) * 7) == pytest.approx(ce.mean())
    only_class_1 = toolbox.weighted_cross_entropy(logits, labels, jnp.array([0.0, 1.0, 0.0]))
    assert only_class_1 == pytest.approx(ce[2:4].mean())
    weighted = toolbox.weighted_cross_entropy(logits, labels, jnp.array([1.0, 2.0, 3.0]))
    assert weighted == pytest.approx(float((ce * jnp.array([1, 1, 2, 2, 3, 3])).sum() / 12))
    soft = jnp.array([[0.5, 0.5, 0.0]])  # a mixup target weighs as the mix of its classes
    assert toolbox.weighted_cross_entropy(logits[:1], soft, jnp.array([0.0, 1.0, 0.0])) == pytest.approx(
        float(optax.softmax_cross_entropy(logits[:1], soft)[0]))


def test_balanced_class_weights_are_inverse_frequencies():
    labels = np.array([0] * 80 + [1] * 20)
    np.testing.assert_allclose(toolbox.class_weight_vector("balanced", labels, 3), [100 / 240, 100 / 60, 0.0])
    np.testing.assert_allclose(toolbox.class_weight_vector([1, 2, 3], labels, 3), [1, 2, 3])
    assert toolbox.class_weight_vector(None, labels, 3) is None
    with pytest.raises(UserError, match="has 2 weights, the data has 3 classes"):
        toolbox.class_weight_vector([1, 2], labels, 3)


def test_balanced_sampling_draws_classes_evenly_on_an_imbalanced_set():
    ys = jnp.asarray(np.array([0] * 900 + [1] * 90 + [2] * 10, np.int32))
    xs = jnp.arange(1000, dtype=jnp.int32)  # image i is just its index
    counts = np.zeros(3)
    for epoch in range(3):
        x, y = toolbox.balanced_shuffle(xs, ys, jax.random.key(epoch), num_classes=3)
        assert x.shape == (1000,) and jnp.array_equal(ys[x], y)  # images keep their labels
        counts += np.bincount(np.asarray(y), minlength=3)
    assert np.all(np.abs(counts / counts.sum() - 1 / 3) < 0.03), counts
    assert len(np.unique(np.asarray(x)[np.asarray(y) == 2])) == 10  # the rare class: every image, repeatedly


@pytest.mark.slow
def test_class_weights_and_balanced_sampling_train(tmp_path, fashion):
    run_dir = tmp_path / "imbalanced"
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", run_dir, "--set", "train.epochs=1",
                 "--set", "data.classes=[0,1]", "--set", "data.train_per_class=600", "--set", "train.batch_size=32",
                 "--set", "train.class_weights=[1,3]",
                 "--set", "data.balanced_sampling=true")
    assert result.exit_code == 0, result.output
    assert metric_rows(run_dir)[0]["val_acc"] > 0.8
    result = cli("train", "lenet5_fashion_mnist", "--dry-run", "--set", "train.class_weights=heavy")
    assert result.exit_code == 2 and "expected 'balanced' or a list" in result.stderr


# ----------------------------------------------------------------------------- mixed precision


def test_auto_precision_is_bfloat16_on_ampere_gpus_and_tpus_float32_elsewhere():
    from types import SimpleNamespace as Device

    gpu = lambda capability: Device(platform="gpu", compute_capability=capability)  # noqa: E731
    assert toolbox.resolve_precision("auto", Device(platform="cpu")) == "float32"
    assert toolbox.resolve_precision("auto", gpu("9.0")) == "bfloat16"  # H100 / H200
    assert toolbox.resolve_precision("auto", gpu("8.0")) == "bfloat16"  # A100
    assert toolbox.resolve_precision("auto", gpu("8.6")) == "bfloat16"
    assert toolbox.resolve_precision("auto", gpu("10.0")) == "bfloat16"
    assert toolbox.resolve_precision("auto", gpu("7.5")) == "float32"  # T4: no bfloat16 tensor cores
    assert toolbox.resolve_precision("auto", gpu("6.0")) == "float32"
    assert toolbox.resolve_precision("auto", Device(platform="gpu")) == "float32"  # no CUDA capability (ROCm)
    assert toolbox.resolve_precision("auto", Device(platform="tpu")) == "bfloat16"
    for setting in ("float32", "bfloat16"):  # an explicit setting is kept on any device
        assert toolbox.resolve_precision(setting, gpu("9.0")) == setting
        assert toolbox.resolve_precision(setting, Device(platform="cpu")) == setting
    assert toolbox.resolve_precision("auto") == "float32"  # this machine: JAX's CPU devices


@pytest.mark.slow
def test_bfloat16_computes_in_bf16_and_trains(tmp_path, fashion):
    from cnncli import recipe as recipe_lib
    from cnncli.train.state import TrainState, build, init_totals
    from cnncli.train.steps import StepOptions, data_mesh, forward, make_train_step

    assert build(recipe_lib.load("lenet5_fashion_mnist"), (28, 28, 1), 10).precision == "float32"  # auto on a CPU
    # ResNet-20: the zoo's own conv layers (raw lax ops) and Flax batch norm, on tiny 8x8 images; its
    # train step has 19 forward convolutions and their backward ones (all but the input gradient)
    recipe = recipe_lib.load("lenet5_fashion_mnist", ["model.name=resnet20", "train.precision=bfloat16"])
    model = build(recipe, (8, 8, 1), 10, mean=[0.3], std=[0.35])
    assert model.precision == "bfloat16"
    tx = optax.sgd(0.1)
    step = make_train_step(model.train_def, tx, num_classes=10, batch_size=4, mesh=data_mesh(),
                           options=StepOptions())
    params, rest = jax.tree.map(jnp.copy, (model.params, model.rest))  # the step donates its state
    state = TrainState(params, rest, tx.init(params), jnp.zeros((), jnp.int32))
    args = (jnp.full((4, 8, 8, 1), 128, jnp.uint8), jnp.arange(4, dtype=jnp.int32), jnp.int32(0), jax.random.key(0))
    jaxpr = jax.make_jaxpr(step)(state, init_totals(), *args)
    convs = [e for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) > 2 * 19 and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
    new_state, _ = step(state, init_totals(), *args)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((new_state.params, new_state.rest)))
    assert not all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.rest), jax.tree.leaves(model.rest)))
    normalize = new_state.rest["normalize"]  # the normalization constants are never rounded to bfloat16
    assert float(normalize["mean"][...][0]) == np.float32(0.3) and float(normalize["std"][...][0]) == np.float32(0.35)

    # evaluation and attacks compute in the same precision, on float32 pixels
    def logits(p, r, x):
        return forward(model.eval_def, p, r, x)[0]

    x = jnp.full((2, 8, 8, 1), 0.5)
    eval_jaxpr = jax.make_jaxpr(logits)(new_state.params, new_state.rest, x)
    eval_convs = [e for e in eval_jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(eval_convs) == 19 and all(v.aval.dtype == jnp.bfloat16 for e in eval_convs for v in e.invars)
    assert logits(new_state.params, new_state.rest, x).dtype == jnp.float32
    pixel_grad = jax.grad(lambda v: logits(new_state.params, new_state.rest, v)[:, 0].sum())(x)
    assert pixel_grad.dtype == jnp.float32 and float(jnp.abs(pixel_grad).max()) > 0
    float32 = build(recipe.model_copy(update={"train": recipe.train.model_copy(update={"precision": "float32"})}),
                    (8, 8, 1), 10, mean=[0.3], std=[0.35])
    reference = forward(float32.eval_def, new_state.params, new_state.rest, x)[0]
    np.testing.assert_allclose(logits(new_state.params, new_state.rest, x), reference,
                               rtol=0.05, atol=0.05 * float(jnp.abs(reference).max()))

    run_dir = tmp_path / "bf16"
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", run_dir, *TINY, "--set", "train.epochs=2",
                 "--set", "train.precision=bfloat16")
    assert result.exit_code == 0, result.output
    rows = metric_rows(run_dir)
    assert rows[1]["train_loss"] < rows[0]["train_loss"] and rows[1]["val_acc"] > 0.6
    assert json.loads((run_dir / "summary.json").read_text())["precision"] == "bfloat16"
    assert _eval_json(run_dir)["top1"] > 0.6


# ----------------------------------------------------------------------------- test-time augmentation


def test_flip_tta_averages_the_two_softmaxes():
    x = jax.random.uniform(jax.random.key(0), (3, 4, 5, 1))

    def left_heavy(images):  # logits that depend on which side is brighter
        return jnp.stack([images[:, :, :2].sum((1, 2, 3)), images[:, :, 3:].sum((1, 2, 3))], -1) * 3.0

    expected = jnp.log((jax.nn.softmax(left_heavy(x)) + jax.nn.softmax(left_heavy(x[:, :, ::-1]))) / 2)
    np.testing.assert_allclose(toolbox.flip_tta_logits(left_heavy, x), expected, rtol=1e-5)
    symmetric = (x + x[:, :, ::-1]) / 2
    np.testing.assert_allclose(toolbox.flip_tta_logits(left_heavy, symmetric),
                               jax.nn.log_softmax(left_heavy(symmetric)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_eval_tta_changes_nothing_on_flip_invariant_images(lenet_run, tmp_path):
    from cnncli.data.sources import load_dataset

    ds = load_dataset("fashion_mnist")
    images = ds.test_x[:500, :, :, 0].astype(np.float32)
    mirrored = np.round((images + images[:, :, ::-1]) / 2).astype(np.uint8)  # exactly mirror-symmetric
    for name, x in (("real", images.astype(np.uint8)), ("mirrored", mirrored)):
        np.savez(tmp_path / f"{name}.npz", x=x, y=ds.test_y[:500])

    def evaluate(name, *flags):
        return _eval_json(lenet_run, "--data", f"npz:{tmp_path / name}.npz", "--split", "train", *flags)

    plain, tta = evaluate("mirrored"), evaluate("mirrored", "--tta")
    assert tta["tta"] and tta["confusion"] == plain["confusion"]
    assert tta["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    # on real (asymmetric) images the flip does change predictions
    assert evaluate("real", "--tta")["loss"] != pytest.approx(evaluate("real")["loss"], rel=1e-3)


# ----------------------------------------------------------------------------- augment-preview


def test_augment_preview_labels_rows_and_lists_the_ops_that_fired(tmp_path, fashion):
    from PIL import Image

    recipe = tmp_path / "aug.yaml"
    recipe.write_text("name: aug\nmodel: {name: lenet5}\ndata: {limit: 500}\n"
                      "augment:\n  - {name: hflip, p: 0.5}\n  - {name: crop, pad: 3}\n  - {name: cutout, size: 6}\n")
    out = tmp_path / "grid.png"
    result = cli("augment-preview", recipe, "--n", 5, "--draws", 3, "--zoom", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).format == "PNG"
    assert "besides crop, cutout, always" in result.stdout and "draw 3" in result.stdout
    from cnncli import recipe as recipe_lib
    from cnncli.data.pipeline import load_splits

    splits = load_splits(recipe_lib.load(recipe).data, 0)
    pick = np.sort(np.random.default_rng(0).choice(len(splits.train_x), size=5, replace=False))  # the recipe's seed
    for index in pick:  # each row is labelled with its image's class
        assert f"{splits.class_names[splits.train_y[index]]} (#{index})" in result.stdout
    result = cli("augment-preview", "lenet5_fashion_mnist", "--out", tmp_path / "none.png")
    assert result.exit_code == 2 and "no augment section" in result.stderr


# ----------------------------------------------------------------------------- sweeps


def test_grid_points_and_suggested_learning_rates():
    from cnncli.tools.sweep import grid_points, parse_grid

    assert parse_grid("model.args.widths=[8,16],[16,32]") == ("model.args.widths", ["[8,16]", "[16,32]"])
    with pytest.raises(UserError, match="--grid expects"):
        parse_grid("optim.name")
    points = grid_points([parse_grid("optim.name=sgd,adadelta"), parse_grid("train.batch_size=32,64")])
    assert [p.name for p in points] == ["optim-sgd__batch_size-32", "optim-sgd__batch_size-64",
                                        "optim-adadelta__batch_size-32", "optim-adadelta__batch_size-64"]
    assert points[2].assignments == ("optim.name=adadelta", "train.batch_size=32", "optim.lr=1.0")
    assert grid_points([parse_grid("optim.name=adam")], ["optim.lr=0.5"])[0].assignments == ("optim.name=adam",)
    both = grid_points([parse_grid("optim.name=adam"), parse_grid("optim.lr=0.1")])
    assert both[0].assignments == ("optim.name=adam", "optim.lr=0.1")


@pytest.mark.slow
def test_sweep_ranks_points_and_skips_finished_ones(tmp_path, fashion):
    out = tmp_path / "sweep"
    args = ["sweep", "lenet5_fashion_mnist", "--grid", "optim.name=sgd,adam", "--epochs", 1, "--run-dir", out,
            "--set", "data.limit=640", "--set", "train.batch_size=64"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "sweep.json").read_text())
    assert {r["run"] for r in results} == {"optim-sgd", "optim-adam"}
    assert [r["best_val_acc"] for r in results] == sorted((r["best_val_acc"] for r in results), reverse=True)
    assert {r["lr"] for r in results} == {0.05, 1e-3} and all(r["finished"] for r in results)
    assert "optim-adam" in result.stdout and "best val" in result.stdout
    assert (out / "sweep.png").stat().st_size > 10_000
    metrics = {p: (out / p / "metrics.jsonl").read_text() for p in ("optim-sgd", "optim-adam")}

    (out / "optim-adam" / "summary.json").unlink()  # as if killed after its last epoch
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "optim-sgd: finished, skipped" in again.stderr and "optim-adam: resuming" in again.stderr
    assert {p: (out / p / "metrics.jsonl").read_text() for p in metrics} == metrics
    assert (out / "optim-adam" / "summary.json").is_file()

    changed = cli(*args[:-4], "--set", "data.limit=700", "--set", "train.batch_size=64")
    assert changed.exit_code == 2 and "holds a run of a different recipe" in changed.stderr


@pytest.mark.slow
def test_several_steps_per_call_resume_after_ctrl_c_as_the_uninterrupted_run(tmp_path, fashion):
    """4 steps per call with an EMA every 2 steps over 18-step epochs (the last 2 steps of each are one-step
    calls): Ctrl-C stops after the call running when it came, at step 17 of epoch 2, half-way through an EMA
    stretch; the resumed run's metrics and EMA test accuracy are the uninterrupted run's."""
    from cnncli.run import checkpoint
    from cnncli.train.loop import Interrupted, train

    overrides = ["data.limit=1000", "train.batch_size=50", "train.epochs=3", "train.log_every=1", "train.ema=0.9",
                 "train.ema_every=2", "train.steps_per_call=4"]
    recipe, splits, reference, resumed = _reference_and_fresh_run(tmp_path, overrides)
    with pytest.raises(Interrupted, match="epoch 2, step 17/18"):
        train(recipe, splits, resumed, display=_CtrlCAt(epoch=1, step=16))
    assert checkpoint.read_index(resumed.checkpoints)["latest"]["step_in_epoch"] == 17
    train(recipe, splits, resumed, resume=True)
    assert metric_rows(resumed.path) == metric_rows(reference.path)
    a, b = (json.loads(r.summary.read_text()) for r in (reference, resumed))
    assert a["test_ema"] == b["test_ema"] and a["test"]["top1"] == b["test"]["top1"]
