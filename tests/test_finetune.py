"""Fine-tuning and weight import: frozen parameters stay bit-identical, LwF keeps the old head, PyTorch
weights give PyTorch's logits, and bad input is one line with nothing written."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from flax.traverse_util import flatten_dict as flatten
from safetensors.torch import save_file

from cnncli.recipe import FinetuneConfig, OptimConfig, bundled_recipes, read_yaml
from cnncli.train.trained_run import load_trained
from cnncli.transfer import finetune
from cnncli.transfer.import_weights import IMAGENET_MEAN, IMAGENET_STD, import_state_dict, read_state_dict
from tests.helpers import cli, metric_rows
from tests.torch_models import randomized

# LeNet-5 with batch norm and dropout on small synthetic images: both must stay untouched where frozen.
SOURCE = """name: source
model: {name: lenet5, norm: batch, dropout: 0.2}
data: {source: "synthetic:16x16x1:4", limit: 400, val_fraction: 0.25}
optim: {name: adam, lr: 0.003}
train: {epochs: 1, batch_size: 50}
"""
TARGET = """name: target
data: {source: "synthetic:16x16x1:3", limit: 300, val_fraction: 0.2}
optim: {name: adam, lr: 0.01}
train: {epochs: 1, batch_size: 40}
"""
HEAD_PARAMS = 84 * 3 + 3  # the new fc3: 84 features -> 3 classes
# cnncli vs PyTorch logits: 1e-4 of the largest logit. Through ResNet-50's 53 float32 layers PyTorch's
# own float32 logits differ from its float64 ones by 1.5e-4 (max |logit| 3.3), so an absolute 1e-4
# would test rounding, not the import.
TOLERANCE = 1e-4


def assert_same_logits(ours, reference) -> None:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= TOLERANCE * max(1.0, np.abs(reference).max())


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    (root / "source.yaml").write_text(SOURCE)
    (root / "target.yaml").write_text(TARGET)
    result = cli("train", root / "source.yaml", "--run-dir", root / "source")
    assert result.exit_code == 0, result.output
    return root


def fine_tune(root, run_dir, *args):
    result = cli("fine-tune", root / "source", root / "target.yaml", "--run-dir", run_dir, *args)
    assert result.exit_code == 0, result.output
    return result


def flat_state(trained) -> dict:
    return {**flatten(nnx.to_pure_dict(trained.model.params)), **flatten(nnx.to_pure_dict(trained.model.rest))}


def changed(before: dict, after: dict, path) -> bool:
    return not np.array_equal(np.asarray(before[path]), np.asarray(after[path]))


# ----------------------------------------------------------------------------- freezing


@pytest.mark.slow
def test_head_mode_leaves_every_frozen_parameter_and_statistic_bit_identical(source_run, tmp_path):
    result = fine_tune(source_run, tmp_path / "head", "--mode", "head")
    message = " ".join(result.stderr.split())
    assert f"fine-tune (head): {HEAD_PARAMS:,} trainable / " in message and "head fc3 replaced" in message
    before = flat_state(load_trained(source_run / "source"))
    after = flat_state(load_trained(tmp_path / "head", "latest"))
    shared = [p for p in before if p[:2] != ("net", "fc3") and "rngs" not in p]
    assert any(p[-1] == "mean" and "bn" in p for p in shared)  # batch-norm statistics are among them
    assert not [p for p in shared if changed(before, after, p)]
    for leaf in ("kernel", "bias"):  # the old head is kept as it was, the new one trained
        assert np.array_equal(before[("net", "fc3", leaf)], after[("net", "fc3", "old", leaf)])
    assert after[("net", "fc3", "new", "kernel")].shape == (84, 3)
    old = json.loads(cli("eval", tmp_path / "head", "--head", "old", "--json").stdout)
    source_test = json.loads((source_run / "source" / "summary.json").read_text())["test"]
    assert old["top1"] == pytest.approx(source_test["top1"]) and len(old["class_names"]) == 4

    rows = metric_rows(tmp_path / "head")  # a finished run resumes to the same place, via fine-tune only
    result = cli("fine-tune", "--resume", "--run-dir", tmp_path / "head")
    assert result.exit_code == 0 and "resuming" in result.stderr and metric_rows(tmp_path / "head") == rows
    assert_one_line_error(cli("train", "--resume", "--run-dir", tmp_path / "head"), "cnncli fine-tune --resume")


@pytest.mark.slow
def test_partial_trains_only_the_last_stages(source_run, tmp_path):
    result = fine_tune(source_run, tmp_path / "partial", "--unfreeze-last", "1")
    assert "trains: head, fc2; frozen: conv1, conv2, fc1" in " ".join(result.stderr.split())
    before = flat_state(load_trained(source_run / "source"))
    after = flat_state(load_trained(tmp_path / "partial", "latest"))
    assert changed(before, after, ("net", "fc2", "kernel"))
    for layer in ("conv1", "conv2", "fc1"):
        assert not [p for p in before if p[:2] == ("net", layer) and changed(before, after, p)], layer


def test_lr_multipliers_scale_updates_and_frozen_ones_are_zero():
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2)), "c": jnp.ones((2, 2))}
    labels = {"a": finetune.TRAIN, "b": finetune.TRAIN, "c": finetune.FROZEN}
    multipliers = {"a": 1.0, "b": 0.25, "c": 1.0}
    tx = finetune.partitioned_optimizer(OptimConfig(name="sgd", lr=0.1), lambda step: 0.1, params, labels, multipliers)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.allclose(updates["a"], -0.1) and np.allclose(updates["b"], -0.025)
    assert np.array_equal(updates["c"], np.zeros((2, 2)))


def test_discriminative_rates_and_stage_names():
    plan = finetune.make_plan(FinetuneConfig(lr_decay=0.5, lr_mult={"conv1": 0.01}), ("fc3",),
                              ["conv1", "conv2", "fc1", "fc2"], old_head=False)
    assert plan.multipliers == {"head": 1.0, "conv1": 0.01, "conv2": 0.125, "fc1": 0.25, "fc2": 0.5}
    with pytest.raises(finetune.UserError, match="no stage 'layer9'"):
        finetune.make_plan(FinetuneConfig(lr_mult={"layer9": 0.1}), ("fc3",), ["conv1"], old_head=False)


def test_stages_and_head_of_resnet_and_vgg():
    from cnncli.models import build_model
    from cnncli.recipe import ModelConfig

    def anatomy(name, **args):
        model = nnx.eval_shape(lambda: build_model(ModelConfig(name=name, args=args), input_shape=(32, 32, 3),
                                                   num_classes=10))
        return finetune.anatomy(model, (32, 32, 3))

    assert anatomy("resnet18") == (("fc",), ["conv1", "layer1", "layer2", "layer3", "layer4"])
    assert anatomy("vgg11_bn", classifier="linear") == (("fc",), ["conv1", "conv2", "conv3", "conv4", "conv5"])


# ----------------------------------------------------------------------------- Learning without Forgetting


@pytest.mark.slow
def test_distillation_is_zero_while_the_shared_layers_are_unchanged(source_run):
    from cnncli import recipe as recipe_lib
    from cnncli.data.pipeline import load_splits
    from cnncli.train.steps import forward, to_pixels

    source = load_trained(source_run / "source")
    recipe = recipe_lib.load(source_run / "target.yaml", ["finetune.mode=lwf"],
                             defaults={"model": source.recipe.model.model_dump()})
    splits = load_splits(recipe.data, recipe.seed)
    tuning = finetune.prepare(source, recipe, splits)
    model = tuning.model
    both = finetune.output_graphdef(model, "both")  # inference mode: the mode the outputs were recorded in
    logits, _ = forward(both, model.params, model.rest, to_pixels(jnp.asarray(splits.train_x[:64])))
    new, kept = tuning.distill(logits, jnp.asarray(tuning.aux[:64]))
    assert new.shape == (64, 3) and abs(float(kept)) < 1e-6
    assert float(finetune.distillation_loss(logits[:, 3:] * 0.5, jnp.asarray(tuning.aux[:64]), 2.0)) > 1e-3


@pytest.mark.slow
def test_lwf_reports_both_tasks_each_epoch_and_keeps_the_old_head_evaluable(lenet_run, tmp_path):
    recipe = tmp_path / "b.yaml"
    recipe.write_text("name: b\ndata: {source: fashion_mnist, classes: [5, 6, 7, 8, 9], limit: 500}\n"
                      "optim: {name: adam, lr: 0.002}\ntrain: {epochs: 2, batch_size: 50}\n"
                      "finetune: {mode: lwf, lwf_lambda: 2.0}\n")
    result = cli("fine-tune", lenet_run, recipe, "--run-dir", tmp_path / "lwf")
    assert result.exit_code == 0, result.output
    rows = metric_rows(tmp_path / "lwf")
    assert len(rows) == 2 and all("old_val_acc" in r and "val_acc" in r for r in rows)
    summary = json.loads((tmp_path / "lwf" / "summary.json").read_text())
    old = json.loads(cli("eval", tmp_path / "lwf", "--head", "old", "--json").stdout)
    assert old["n"] == 10000 and old["top1"] == pytest.approx(summary["old_task_test"]["top1"])
    assert old["top1"] > 0.5  # the 10-class task is still mostly there after learning 5 new classes
    new = json.loads(cli("eval", tmp_path / "lwf", "--json").stdout)
    assert new["n"] == 5000 and new["class_names"][0] == "Sandal"


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in bundled_recipes() if "finetune" in read_yaml(p)], ids=lambda p: p.stem)
def test_bundled_fine_tune_recipes_run(path, lenet_run, tmp_path):
    result = cli("fine-tune", lenet_run, path, "--run-dir", tmp_path / "run", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test"]["n"] > 0


# ----------------------------------------------------------------------------- PyTorch weights


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    normalized = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    with torch.no_grad():
        return model(torch.from_numpy(normalized.transpose(0, 3, 1, 2))).numpy()


def save_both(model, directory):
    state = model.state_dict()
    torch.save(state, directory / "weights.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "weights.safetensors")
    return directory / "weights.pth", directory / "weights.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", [("resnet18", 224), ("resnet50", 64), ("vgg11_bn", 64), ("alexnet", 64)])
def test_imported_weights_give_torch_logits(arch, size, tmp_path):
    model = randomized(arch, size)
    pth, safetensors = save_both(model, tmp_path)
    from_pth, from_safetensors = read_state_dict(pth), read_state_dict(safetensors)
    assert from_pth.keys() == from_safetensors.keys()
    assert all(np.array_equal(from_pth[k], from_safetensors[k]) for k in from_pth)
    x = np.random.default_rng(0).uniform(size=(2, size, size, 3)).astype(np.float32)
    imported = import_state_dict(arch, from_safetensors, source=str(safetensors), input_shape=(size, size, 3))
    reference = torch_logits(model, x)
    assert_same_logits(imported.model(x), reference)
    if arch == "vgg11_bn":  # timm's VGG: the same layers, its head as convolutions under other names
        timm = import_state_dict(arch, timm_vgg_names(from_safetensors), source="timm", input_shape=(size, size, 3))
        assert_same_logits(timm.model(x), reference)


def timm_vgg_names(tensors: dict) -> dict:
    """A torchvision VGG state dict as timm names it: pre_logits.fc1 (7x7 conv), pre_logits.fc2 (1x1), head.fc."""
    renamed = {k: v for k, v in tensors.items() if k.startswith("features.")}
    for torchvision, timm, shape in (("classifier.0", "pre_logits.fc1", (4096, 512, 7, 7)),
                                     ("classifier.3", "pre_logits.fc2", (4096, 4096, 1, 1)),
                                     ("classifier.6", "head.fc", None)):
        weight = tensors[f"{torchvision}.weight"]
        renamed[f"{timm}.weight"] = weight if shape is None else weight.reshape(shape)
        renamed[f"{timm}.bias"] = tensors[f"{torchvision}.bias"]
    return renamed


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("resnet18")
    model = randomized("resnet18", 64)
    return model, *save_both(model, directory)


@pytest.mark.slow
def test_imported_run_works_with_eval_summary_and_fine_tune(resnet18_files, tmp_path):
    model, pth, _ = resnet18_files
    run = tmp_path / "imported"
    result = cli("import-weights", "resnet18", pth, "--run-dir", run, "--input", "64x64x3")
    assert result.exit_code == 0, result.output
    data = json.loads((run / "data.json").read_text())
    assert data["mean"] == list(IMAGENET_MEAN) and len(data["class_names"]) == 1000
    x = np.random.default_rng(1).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    trained = load_trained(run)
    logits = nnx.merge(trained.model.eval_def, trained.model.params, trained.model.rest)(x)
    assert_same_logits(logits, torch_logits(model, x))
    summary = cli("summary", run, "--json")
    assert summary.exit_code == 0, summary.output
    assert json.loads(summary.stdout)["total_params"] == 11_689_512

    recipe = tmp_path / "small.yaml"
    recipe.write_text("name: small\ndata: {source: 'synthetic:32x32x3:3', limit: 40, val_fraction: 0.25}\n"
                      "train: {epochs: 1, batch_size: 10}\nfinetune: {mode: head}\n")
    result = cli("fine-tune", run, recipe, "--run-dir", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    message = " ".join(result.stderr.split())
    assert "fine-tune (head): 1,539 trainable / 11,689,512 frozen parameters" in message  # fc 512x3 + 3
    assert "old-task accuracy is not reported" in message  # ImageNet is not prepared here


# ----------------------------------------------------------------------------- bad input


def assert_one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("change,expected", [
    (["--set", "data.source=synthetic:16x16x3:3"], "set data.channels: 1"),
    (["--set", "data.source=synthetic:20x20x1:3"], "set data.image_size: [16, 16]"),
    (["--unfreeze-last", "9"], "has 4 stages below its head (conv1, conv2, fc1, fc2); use at most 4"),
    (["--mode", "head", "--unfreeze-last", "1"], "--unfreeze-last applies to --mode partial"),
    (["--set", "finetune.lr_mult={layer4: 0.1}"], "no stage 'layer4'"),
    (["--set", "model.name=mlp"], "the recipe's model is 'mlp' but the source is a 'lenet5'"),
])
def test_fine_tune_bad_input_writes_nothing(source_run, tmp_path, change, expected):
    run_dir = tmp_path / "never"
    result = cli("fine-tune", source_run / "source", source_run / "target.yaml", "--run-dir", run_dir, *change)
    assert_one_line_error(result, expected)
    assert not run_dir.exists()


@pytest.mark.slow
def test_source_without_checkpoint(source_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "recipe.yaml").write_text((source_run / "source" / "recipe.yaml").read_text())
    result = cli("fine-tune", empty, source_run / "target.yaml", "--run-dir", tmp_path / "never")
    assert_one_line_error(result, "no checkpoint in")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_train_refuses_a_fine_tune_recipe(source_run):
    assert_one_line_error(cli("train", "finetune_fmnist_b50", "--dry-run"), "run it with `cnncli fine-tune")
    with_model = source_run / "with_model.yaml"  # a fine-tune recipe that names its model is still one
    with_model.write_text("name: m\nmodel: {name: lenet5}\nfinetune: {mode: head}\n")
    assert_one_line_error(cli("train", with_model, "--dry-run"), "run it with `cnncli fine-tune")


@pytest.mark.slow
def test_import_bad_input_writes_nothing(resnet18_files, tmp_path):
    _, pth, safetensors = resnet18_files
    out = tmp_path / "never"
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        (["resnet50", safetensors], "does not hold cnncli's resnet50", "the file looks like resnet18"),
        (["vgg11", pth], "does not hold cnncli's vgg11", "the file looks like resnet18"),
        (["resnet21", pth], "not 'resnet21'", "did you mean"),
        (["resnet18", tmp_path / "missing.pth"], "does not exist", ""),
        (["resnet18", tmp_path / "notes.txt"], "expected a .pth, .pt or .safetensors file", ""),
        (["resnet18", pth, "--input", "64x64x1", "--mean", "0.5", "--std", "0.25"], "conv1.weight",
         "shapes differ"),
    ]
    for args, expected, also in cases:
        result = cli("import-weights", *args, "--run-dir", out)
        assert_one_line_error(result, expected)
        assert also in result.stderr
        assert not out.exists()
