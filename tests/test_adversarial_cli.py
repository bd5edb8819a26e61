"""`cnncli adversarial` end to end on real Fashion-MNIST, adversarial training, bad input, benchmark fgsm."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnncli.recipe import load as load_recipe
from tests.helpers import REPO, cli, metric_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LIMIT = ["--limit", "300"]


def _json(*args: str) -> dict:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def softmax_run(tmp_path_factory, fashion):
    """Softmax regression (an MLP without hidden layers) trained for one short epoch."""
    run_dir = tmp_path_factory.mktemp("runs") / "softmax"
    result = cli("train", "mlp_fashion_mnist", "--run-dir", run_dir, "--set", "model.args.hidden=[]", "--set",
                 "model.dropout=0", "--set", "data.limit=2000", "--set", "train.epochs=1", "--set",
                 "train.batch_size=64")
    assert result.exit_code == 0, result.output
    return run_dir


def test_json_rows_plots_and_clean_accuracy_match_eval(lenet_run, tmp_path):
    from cnncli.train.evaluate import evaluate
    from cnncli.train.steps import data_mesh
    from cnncli.train.trained_run import eval_data, load_trained

    out = _json("adversarial", lenet_run, "--eps", "0,0.1", *LIMIT, "--examples", "4", "--out", tmp_path)
    clean, attacked = out["rows"]
    assert out["attack"]["name"] == "fgsm" and [r["eps"] for r in out["rows"]] == [0.0, 0.1]
    trained = load_trained(lenet_run)
    x, y, names = eval_data(trained, "test")
    reference = evaluate(trained.model.eval_def, trained.model.params, trained.model.rest, x[:300], y[:300], names,
                         batch_size=300, mesh=data_mesh())
    assert clean["n"] == 300 and clean["accuracy"] == pytest.approx(reference["top1"])
    assert clean["clean_accuracy"] == clean["accuracy"] and clean["success_rate"] == 0.0 and clean["max_l2"] == 0.0
    assert attacked["accuracy"] < clean["accuracy"] - 0.1  # FGSM at 0.1 hurts a standard LeNet-5 badly
    assert 0.1 - 1e-6 <= attacked["max_linf"] <= 0.1 + 1e-6 and attacked["max_l2"] <= 0.1 * 28 + 1e-4
    assert attacked["error_rate"] == pytest.approx(1 - attacked["accuracy"])
    assert 0.1 <= attacked["mean_conf_wrong"] <= 1.0
    assert len(out["plots"]) == 2
    for path in out["plots"]:
        assert path.startswith(str(tmp_path)) and open(path, "rb").read(8) == PNG_MAGIC
    import matplotlib.image

    grid = matplotlib.image.imread(out["plots"][1])
    assert grid.shape[0] > grid.shape[1]  # 4 rows of 3 images: taller than wide


@pytest.mark.slow
def test_pgd_is_at_least_as_strong_as_fgsm(lenet_run, tmp_path):
    common = ["--eps", "0.05", *LIMIT, "--examples", "0", "--out", tmp_path]
    fgsm = _json("adversarial", lenet_run, *common)["rows"][0]
    pgd = _json("adversarial", lenet_run, "--attack", "pgd", "--steps", "10", "--step-size", "0.0125", *common)
    assert pgd["attack"]["random_start"] and pgd["rows"][0]["accuracy"] <= fgsm["accuracy"]
    assert pgd["rows"][0]["success_rate"] > fgsm["success_rate"]


@pytest.mark.slow
def test_targeted_by_class_name_raises_the_target_probability(lenet_run, tmp_path):
    out = _json("adversarial", lenet_run, "--attack", "pgd", "--steps", "5", "--eps", "0,0.2", "--targeted",
                "shirt", *LIMIT, "--examples", "2", "--out", tmp_path)
    clean, attacked = out["rows"]
    assert out["attack"]["target"] == 6  # Shirt
    assert clean["target_prob"] == pytest.approx(clean["clean_target_prob"])
    assert attacked["target_prob"] > clean["target_prob"] + 0.25
    assert attacked["success_rate"] > clean["success_rate"] + 0.4
    assert attacked["attacked"] == 300 - 28  # the 28 shirts are not attacked


@pytest.mark.slow
def test_alias_prints_the_table(lenet_run, tmp_path):
    result = cli("attack", lenet_run, "--attack", "bim", "--norm", "l2", "--steps", "3", "--eps", "0,0.5,1",
                 "--limit", "100", "--examples", "3", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "bim (l2) on test: 100 images" in text and "0.5" in text and "wrote" in text
    assert (tmp_path / "adversarial_bim_l2_examples.png").is_file()


@pytest.mark.slow
def test_linear_fool_on_softmax_regression(softmax_run, tmp_path):
    out = _json("adversarial", softmax_run, "--attack", "linear-fool", "--eps", "0,0.05,0.2", "--targeted", "0",
                *LIMIT, "--out", tmp_path)
    probs = [r["target_prob"] for r in out["rows"]]
    success = [r["success_rate"] for r in out["rows"]]
    assert probs[0] < probs[1] < probs[2] and success[0] < success[1] < success[2] and success[2] > 0.6
    untargeted = _json("adversarial", softmax_run, "--attack", "fgsm", "--eps", "0.1", *LIMIT, "--examples", "0",
                       "--out", tmp_path)
    assert untargeted["rows"][0]["error_rate"] > 0.7  # softmax regression breaks like the paper's (99.9% at 0.25)


@pytest.mark.slow
def test_autoattack_table_json_npz_and_curve(lenet_run, tmp_path):
    from cnncli.cli.adversarial import render_autoattack
    from cnncli.console import console

    out = _json("adversarial", lenet_run, "--attack", "autoattack", "--eps", "0.02,0.1", "--steps", "3",
                "--n-targets", "2", "--queries", "20", "--limit", "60", "--batch-size", "32", "--out", tmp_path)
    assert [a["name"] for a in out["attack"]["attacks"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert out["attack"]["attacks"][1] == {"name": "apgd-t", "norm": "linf", "steps": 3, "restarts": 1,
                                           "random_start": True, "n_targets": 2}
    low, high = out["rows"]
    assert [s["attack"] for s in low["stages"]] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert high["robust_accuracy"] <= low["robust_accuracy"] < low["clean_accuracy"]
    assert high["max_linf"] <= 0.1 + 1e-6 and high["min_pixel"] >= 0 and high["max_pixel"] <= 1
    assert out["warnings"] == ["settings changed from the standard version's: the numbers are not comparable with "
                               "RobustBench's"]
    saved = np.load(out["npz"][1])
    assert saved["x"].shape == (60, 28, 28, 1) and float(saved["eps"]) == pytest.approx(0.1)
    assert saved["robust"].mean() == pytest.approx(high["robust_accuracy"])
    assert np.abs(saved["x"] - saved["x_clean"] / 255).max() <= 0.1 + 1e-6
    assert open(out["plots"][0], "rb").read(8) == PNG_MAGIC
    # the saved examples are a dataset: evaluating them (rounded to 8 bits) gives about the robust accuracy
    again = _json("eval", lenet_run, "--data", f"npz:{out['npz'][1]}", "--split", "train")
    assert again["n"] == 60 and abs(again["top1"] - high["robust_accuracy"]) <= 0.1
    with console.capture() as captured:
        render_autoattack(out, console)
    text = " ".join(captured.get().split())
    assert "AutoAttack standard (linf) on test: 60 images" in text and "fab-t" in text and ".npz" in text


@pytest.mark.parametrize("args, message", [
    (["--eps", "0,-0.1"], "eps must lie in [0, 1]"),
    (["--eps", "1.5"], "eps must lie in [0, 1]"),
    (["--eps", "0,a"], "numbers separated by commas"),
    (["--attack", "pgd", "--steps", "0"], "at least 1"),
    (["--targeted", "10"], "target class 10 does not exist"),
    (["--targeted", "kangaroo"], "target class 'kangaroo' does not exist"),
    (["--attack", "linear-fool"], "needs a linear model"),
    (["--attack", "fgsn"], "unknown attack 'fgsn' (did you mean: fgsm"),
    (["--norm", "l2"], "use fgm-l2"),
    (["--attack", "autoattack", "--targeted", "0"], "untargeted robust accuracy"),
    (["--attack", "autoattack", "--version", "turbo"], "unknown AutoAttack version 'turbo'"),
    (["--attack", "autoattack", "--attacks", "apgd-ce"], "--attacks sets the attacks of --version custom"),
    (["--attack", "autoattack", "--version", "custom"], "needs --attacks"),
    (["--attack", "autoattack", "--version", "custom", "--attacks", "apgd-ce,nope"], "unknown attack 'nope'"),
    (["--version", "plus"], "belong to --attack autoattack"),
    (["--attack", "apgd-t", "--step-size", "0.01"], "adapts its own step size"),
    (["--attack", "deepfool", "--targeted", "1"], "untargeted only"),
    (["--attack", "cw-l2", "--norm", "linf"], "use deepfool"),
    (["--attack", "square", "--queries", "0"], "--queries must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(lenet_run, tmp_path, args, message):
    result = cli("adversarial", lenet_run, *args, "--limit", "20", "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_four_devices_give_the_rows_of_one(lenet_run, tmp_path):
    args = ["adversarial", lenet_run, "--attack", "pgd", "--steps", "2", "--eps", "0,0.1", "--limit", "50",
            "--batch-size", "16", "--examples", "2", "--out", tmp_path, "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    four = subprocess.run([sys.executable, "-m", "cnncli", *map(str, args)], env=env, capture_output=True, text=True)
    assert four.returncode == 0, four.stderr
    one = _json(*args[:-1])
    for a, b in zip(json.loads(four.stdout)["rows"], one["rows"], strict=True):
        assert a["n"] == b["n"] == 50 and a["accuracy"] == b["accuracy"], (a, b)
        assert a["max_linf"] == pytest.approx(b["max_linf"], abs=1e-6)


@pytest.mark.slow
def test_run_without_checkpoint(lenet_run, tmp_path):
    (tmp_path / "recipe.yaml").write_text((lenet_run / "recipe.yaml").read_text())
    result = cli("adversarial", tmp_path)
    assert result.exit_code == 2 and "no checkpoint" in result.stderr


@pytest.mark.slow
def test_pgd_step_larger_than_eps_warns(lenet_run, tmp_path):
    result = cli("adversarial", lenet_run, "--attack", "pgd", "--steps", "2", "--step-size", "0.2", "--eps", "0,0.1",
                 "--limit", "20", "--examples", "0", "--out", tmp_path)
    assert result.exit_code == 0 and "warning: step size 0.2 is larger than eps 0.1" in result.stderr


# ----------------------------------------------------------------------------- adversarial training


def _train_step(make_perturb, mix):
    """Parameters and totals after one SGD step of a small MLP on a fixed batch.

    make_perturb(train_def) returns the step's perturbation hook (or None).
    """
    from cnncli.recipe import validate
    from cnncli.train.state import TrainState, build, init_totals
    from cnncli.train.steps import StepOptions, data_mesh, make_train_step

    model = build(validate({"name": "t", "model": {"name": "mlp", "args": {"hidden": [16]}}}), (8, 8, 1), 3)
    tx = optax.sgd(0.5)
    step = make_train_step(model.train_def, tx, num_classes=3, batch_size=16, mesh=data_mesh(),
                           options=StepOptions(perturb=make_perturb(model.train_def), mix=mix))
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.integers(0, 256, (16, 8, 8, 1)), jnp.uint8)
    ys = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
    state = TrainState(model.params, model.rest, tx.init(model.params), jnp.zeros((), jnp.int32))
    state, totals = step(state, init_totals(), xs, ys, jnp.int32(0), jax.random.key(0))
    return jax.tree.leaves(jax.device_get(state.params)), jax.device_get(totals)


def test_train_step_mixes_clean_and_adversarial_losses():
    from cnncli.adversarial.attacks import AttackConfig
    from cnncli.adversarial.robustness import make_perturb

    seen = []

    def identity(params, rest, x, labels, key):
        seen.append(labels.shape)
        return x

    clean, clean_totals = _train_step(lambda graphdef: None, 1.0)
    for mix in (0.5, 1.0):  # identical "adversarial" examples: any mix is the clean objective
        mixed, totals = _train_step(lambda graphdef: identity, mix)
        for a, b in zip(clean, mixed, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert totals["loss"] == pytest.approx(clean_totals["loss"], rel=1e-5)
    assert seen == [(16, 3), (16, 3)]  # traced once per step: the hook sees the step's one-hot labels

    # a real attack through the training-mode model: a harder batch, a different update
    attacked, attacked_totals = _train_step(lambda graphdef: make_perturb(graphdef, AttackConfig("fgsm"), 0.1), 1.0)
    assert attacked_totals["loss"] > clean_totals["loss"]
    assert any(not np.allclose(a, b) for a, b in zip(clean, attacked, strict=True))


@pytest.mark.slow
def test_adversarial_training_reports_robust_validation_accuracy(tmp_path):
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", tmp_path / "run", "--set",
                 "data.source=synthetic:16x16x1:4", "--set", "data.limit=640", "--set", "train.epochs=2", "--set",
                 "train.batch_size=32",
                 "--set", "train.adversarial={attack: pgd, eps: 0.1, steps: 2, step_size: 0.05, mix: 0.5}")
    assert result.exit_code == 0, result.output
    rows = metric_rows(tmp_path / "run")
    n_val = json.loads((tmp_path / "run" / "data.json").read_text())["n_val"]
    assert len(rows) == 2 and n_val == 64
    for r in rows:  # a count of the validation images that survive the attack, and fewer than without it
        assert r["val_robust_acc"] * n_val == pytest.approx(round(r["val_robust_acc"] * n_val), abs=1e-6)
        assert r["val_robust_acc"] < r["val_acc"]
    assert "robust" in result.stderr and "validation robust accuracy" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    most_robust = max(rows, key=lambda r: r["val_robust_acc"])  # the best checkpoint is the most robust epoch
    assert summary["best_epoch"] == most_robust["epoch"]
    assert summary["best_val_robust_acc"] == most_robust["val_robust_acc"]


def test_bundled_pgd_recipe_is_valid():
    recipe = load_recipe("lenet5_fashion_mnist_pgd")
    adv = recipe.train.adversarial
    assert recipe.model.name == "lenet5" and adv.attack == "pgd" and adv.eps == 0.1


def test_benchmark_fgsm_mode():
    result = cli("benchmark", "--model", "lenet5", "--mode", "fgsm", "--steps", "2", "--warmup", "1", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["mode"] == "fgsm" and out["impl"] == "cnncli" and out["steps"] == 2 and out["batch"] == 128
    # an FGSM step is two forward passes' work (forward, then the input gradient): LeNet-5's 2 x 416,520 flops each
    assert out["gflops"] == pytest.approx(out["img_per_s"] * 2 * 2 * 416_520 / 1e9, rel=1e-3, abs=0.05)
