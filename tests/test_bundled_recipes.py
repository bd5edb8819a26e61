"""Every bundled recipe runs: a few steps of each, on synthetic images of the recipe's own shape.

Real-data results are in each recipe's header (measured with its command); this keeps them runnable.
"""

import json
import math

import numpy as np
import pytest

from cnncli.recipe import bundled_recipes, load, read_yaml
from tests.helpers import cli

# image shape and classes of each source the recipes use, for a stand-in of the same shape
SOURCE_SHAPES = {"fashion_mnist": "28x28x1:10", "digits": "8x8x1:10", "tfds:cifar10": "32x32x3:10"}
SMOKE = ["--set", "train.epochs=1", "--set", "data.limit=64", "--set", "train.batch_size=32",
         "--set", "data.val_fraction=0.25", "--set", "data.train_per_class=null", "--set", "schedule.warmup_epochs=0",
         "--set", "data.classes=null"]


def _runs_here(path) -> bool:
    """Fine-tune recipes need a source model (tests/test_finetune.py runs them), GAN recipes run in
    tests/test_gan.py, and recipes that stream from disk need a folder (tests/test_train_stream.py runs
    them on a generated one)."""
    raw = read_yaml(path)
    return not {"finetune", "gan"} & set(raw) and (raw.get("data") or {}).get("pipeline") != "stream"


@pytest.mark.parametrize("path", [p for p in bundled_recipes() if _runs_here(p)], ids=lambda p: p.stem)
def test_recipe_runs(path, tmp_path):
    recipe = load(path)
    base = recipe.data.source.split(":")[0] if recipe.data.source.startswith("folder") else recipe.data.source
    shape = SOURCE_SHAPES.get(base)
    assert shape, f"add the image shape of '{recipe.data.source}' to SOURCE_SHAPES"
    result = cli("train", path, "--run-dir", tmp_path / "run", *SMOKE,
                 "--set", f"data.source=synthetic:{shape}")
    assert result.exit_code == 0, result.output
    test = json.loads((tmp_path / "run" / "summary.json").read_text())["test"]
    confusion = np.array(test["confusion"])
    # top-1 and the confusion matrix are summed separately by the eval step: they must agree
    assert test["n"] == confusion.sum() == 500 and test["top1"] == pytest.approx(np.trace(confusion) / 500)
    assert test["top1"] <= test["top5"] and math.isfinite(test["loss"])
