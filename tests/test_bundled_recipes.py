"""Every bundled recipe runs: a few steps of each, on synthetic images of the recipe's own shape.

Real-data results are in each recipe's header (measured with its command); this keeps them runnable.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cnncli.recipe import bundled_recipes, load, read_yaml
from tests.helpers import cli

# image shape and classes of each source the recipes use, for a stand-in of the same shape
SOURCE_SHAPES = {"fashion_mnist": "28x28x1:10", "digits": "8x8x1:10", "tfds:cifar10": "32x32x3:10"}
# the data section of every smoke run, GAN or classifier
SMOKE_DATA = ["--set", "data.limit=64", "--set", "train.batch_size=32", "--set", "data.val_fraction=0.25",
              "--set", "data.train_per_class=null", "--set", "data.classes=null"]
SMOKE = ["--set", "train.epochs=1", "--set", "schedule.warmup_epochs=0", *SMOKE_DATA]


def _runs_here(path) -> bool:
    """Fine-tune recipes need a source model (tests/test_finetune.py runs them), GAN recipes and recipes
    that mix a GAN's samples into their batches (data.generated) need a trained GAN (they run below), and
    recipes that stream from disk need a folder (tests/test_train_stream.py runs them on a generated one)."""
    raw = read_yaml(path)
    data = raw.get("data") or {}
    return not {"finetune", "gan"} & set(raw) and data.get("pipeline") != "stream" and "generated" not in data


# LeNet-5 stands for all in the fast tier (`make test-fast`); every other recipe compiles for seconds more.
FAST = {"lenet5_fashion_mnist"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=() if p.stem in FAST else pytest.mark.slow)
                                  for p in bundled_recipes() if _runs_here(p)], ids=lambda p: p.stem)
def test_recipe_runs(path, tmp_path):
    _smoke_train(path, tmp_path / "run")


def _synthetic(source: str) -> str:
    base = source.split(":")[0] if source.startswith("folder") else source
    shape = SOURCE_SHAPES.get(base)
    assert shape, f"add the image shape of '{source}' to SOURCE_SHAPES"
    return f"data.source=synthetic:{shape}"


def _smoke_train(path, run, *overrides):
    """A few steps of a classifier recipe on a stand-in of its data; checks what its test pass wrote."""
    result = cli("train", path, "--run-dir", run, *SMOKE, "--set", _synthetic(load(path).data.source), *overrides)
    assert result.exit_code == 0, result.output
    test = json.loads((run / "summary.json").read_text())["test"]
    confusion = np.array(test["confusion"])
    # top-1 and the confusion matrix are summed separately by the eval step: they must agree
    assert test["n"] == confusion.sum() == 500 and test["top1"] == pytest.approx(np.trace(confusion) / 500)
    assert test["top1"] <= test["top5"] and math.isfinite(test["loss"])


GAN_RECIPES = {p.stem: p for p in bundled_recipes() if "gan" in read_yaml(p)}
FED_BY_GAN = [p for p in bundled_recipes() if "generated" in (read_yaml(p).get("data") or {})]


@pytest.fixture(scope="module")
def smoke_gans(tmp_path_factory):
    """Each bundled GAN recipe, trained for 2 steps at the smallest width on the smoke data section."""
    runs = {}
    for name, path in GAN_RECIPES.items():
        runs[name] = tmp_path_factory.mktemp("gan") / name
        result = cli("gan", "train", path, "--run-dir", runs[name], *SMOKE_DATA, "--set", "train.steps=2",
                     "--set", "gan.width=4", "--set", _synthetic(read_yaml(path)["data"]["source"]))
        assert result.exit_code == 0, result.output
        assert (runs[name] / "samples.png").is_file()
    return runs


@pytest.mark.parametrize("path", FED_BY_GAN, ids=lambda p: p.stem)
def test_recipe_fed_by_a_bundled_gan_runs(path, smoke_gans, tmp_path):
    """A recipe with data.generated names the run directory of a bundled GAN recipe, and trains with its samples."""
    gan = Path(load(path).data.generated.gan).name
    assert gan in smoke_gans, f"data.generated.gan of {path.name} is no bundled GAN recipe's run directory"
    _smoke_train(path, tmp_path / "run", "--set", f"data.generated.gan={smoke_gans[gan]}",
                 "--set", "data.generated.pool=64")
