"""Open a trained run (or one checkpoint) for eval, attacks, visualization and fine-tuning."""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cnncli import checkpoint
from cnncli.errors import UserError
from cnncli.recipe import Recipe
from cnncli.runs import RunDir


@dataclass
class Trained:
    """A run's recipe, data description and restored model (see train.loop.Model)."""

    run: RunDir
    recipe: Recipe
    data: dict[str, Any]  # data.json: class_names, image_shape, mean, std, source
    model: Any
    checkpoint: Path
    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.data["class_names"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.data["image_shape"])


def _run_of(path: Path) -> RunDir:
    """The run directory of a run path, its checkpoints folder, or one checkpoint inside it."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "recipe.yaml").is_file():
            return RunDir(candidate)
    raise UserError(f"{path} is not a cnncli run: no recipe.yaml in it or above it (train one with `cnncli train`)")


def load_trained(path: str | Path, which: str = "best", *, ema: bool = False) -> Trained:
    """Load the run at `path` and restore its `which` (best or latest) checkpoint, or the checkpoint at `path`.

    With `ema`, the model gets the checkpoint's EMA weights instead of the raw ones (runs trained with
    train.ema; otherwise a UserError).
    """
    from cnncli import recipe as recipe_lib
    from cnncli.train.steps import TrainState

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run directory written by `cnncli train`")
    run = _run_of(path)
    is_single = path.name.startswith("step_") and path.is_dir()
    ckpt, meta = (path, {}) if is_single else checkpoint.find(run.path, which)
    recipe = recipe_lib.load(run.recipe)
    data = run.read_json(run.data)
    model = _build(recipe, data)
    template = TrainState(model.params, model.rest, None, None,
                          {"params": model.params, "rest": model.rest} if ema else None)
    state, _ = checkpoint.restore(ckpt, template, with_optimizer=False)
    weights = state.ema if ema else {"params": state.params, "rest": state.rest}
    model = replace(model, params=weights["params"], rest=weights["rest"])
    return Trained(run=run, recipe=recipe, data=data, model=model, checkpoint=ckpt, meta=meta)


def _build(recipe: Recipe, data: dict[str, Any]):
    """The run's model (a train.loop.Model); a fine-tuned run that kept its old head carries it too."""
    if "old_task" in data:
        from cnncli.finetune import build_with_old_head

        return build_with_old_head(recipe, data)
    from cnncli.train.loop import build

    return build(recipe, tuple(data["image_shape"]), len(data["class_names"]), data["mean"], data["std"])


def eval_data(trained: Trained, split: str = "test", source: str | None = None):
    """Images, labels and class names of a split, from the run's data or another source with the same classes.

    Another source is loaded whole (no validation hold-out) at the run's image size and channel count,
    so that any folder of images can be evaluated; a different class count is an error.
    """
    from cnncli.data.pipeline import load_splits

    data_cfg = trained.recipe.data
    if source is not None:
        h, w, c = trained.image_shape
        # the whole of the other source's splits (no hold-out, no subsets), the run's class selection kept
        data_cfg = data_cfg.model_copy(update={"source": source, "image_size": (h, w), "channels": c,
                                               "val_fraction": 0.0, "limit": None, "train_per_class": None})
    splits = load_splits(data_cfg, trained.recipe.seed)
    x, y = splits.split(split)
    if splits.num_classes != len(trained.class_names):
        raise UserError(f"data '{data_cfg.source}' has {splits.num_classes} classes, the model was trained on "
                        f"{len(trained.class_names)} ({', '.join(trained.class_names[:5])}, ...)")
    if tuple(x.shape[1:]) != trained.image_shape:
        raise UserError(f"data '{data_cfg.source}' has images of shape {tuple(x.shape[1:])}, the model takes "
                        f"{trained.image_shape}; set data.image_size / data.channels")
    return x, np.asarray(y, np.int32), splits.class_names
