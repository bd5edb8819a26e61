"""What a run trains: the built model (two graphdefs over one state) and the state a checkpoint holds.

The model is split once into (graphdef, params, rest); the jitted steps merge it inside jit, so there
is no Python graph walk per call (docs/design.md).
"""

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cnncli.models import build_model
from cnncli.models.fitting import fit_to_data, fitted_layers
from cnncli.recipe import Recipe
from cnncli.run import checkpoint
from cnncli.train.toolbox import layer_dtype, resolve_precision


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    """Everything a run needs to continue exactly: parameters, model state (BN stats, RNG), optimizer, EMA."""

    params: Any
    rest: Any  # non-trainable model state: batch-norm statistics, dropout RNG, normalization constants
    opt_state: Any
    step: jax.Array
    ema: Any = None  # {'params', 'rest'}: moving average of the weights when train.ema is set


@dataclass
class Model:
    """A built model as the steps see it: two graphdefs (train/eval mode) over one state.

    `precision` is the compute dtype both graphdefs carry (float32 or bfloat16, resolved from the
    recipe's train.precision for this machine's devices).
    """

    train_def: Any
    eval_def: Any
    params: Any
    rest: Any
    precision: str = "float32"

    @property
    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(self.params)))


def split_model(model: nnx.Module, precision: str = "float32"):
    """(train graphdef, eval graphdef, params, rest): one state, two modes (dropout/BN behave differently),
    both computing in `precision`.

    With bfloat16 the graphdefs' Classifier and Flax layers compute in it (see toolbox.layer_dtype);
    the weights stay float32.
    """
    with layer_dtype(model, precision):
        model.train()
        train_def, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        eval_def, _, _ = nnx.split(model, nnx.Param, ...)
    return train_def, eval_def, params, rest


def build(recipe: Recipe, image_shape, num_classes: int, mean=None, std=None, *, fit_images=None,
          report=None) -> Model:
    """Build the recipe's model for the data's shape and class count, in its precision on this machine.

    With `fit_images` (uint8 training images, or a function returning them: streamed data is read only
    when a layer needs it) the layers fitted to data (a bag-of-words codebook) are fitted on them first;
    `report(line)` hears what was fitted. A restored run needs no fitting: its checkpoint holds the
    fitted values.
    """
    model = build_model(recipe.model, input_shape=image_shape, num_classes=num_classes, mean=mean, std=std,
                        seed=recipe.seed)
    if fit_images is not None and fitted_layers(model):
        model.eval()
        fit_to_data(model, fit_images() if callable(fit_images) else fit_images, recipe.seed, report)
    precision = resolve_precision(recipe.train.precision)
    return Model(*split_model(model, precision), precision)


def init_totals() -> dict[str, jax.Array]:
    """Running sums of the training metrics, kept on device between progress updates (the loss and the
    gradient's global norm weighted by the batch size, so that dividing by `count` gives their means)."""
    return {name: jnp.zeros((), jnp.float32) for name in checkpoint.TOTALS}
