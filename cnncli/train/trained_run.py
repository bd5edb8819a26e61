"""Open a trained run (or one checkpoint inside it): its recipe, data description and restored model.

`cnncli eval`, `predict`, `visualize`, `adversarial` and `fine-tune` start here. A fine-tuned run that
kept its source's head is rebuilt with both heads (`TwoHeads`), so the old task stays evaluable.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from cnncli import recipe as recipe_lib
from cnncli.data.classes import match_classes
from cnncli.data.pipeline import choose_pipeline, load_data, split_sizes
from cnncli.data.stream import StreamSplits
from cnncli.errors import UserError
from cnncli.models import build_model
from cnncli.models.layers.classifier import TwoHeads
from cnncli.models.paths import module_at, module_path, set_module_at
from cnncli.recipe import DataConfig, Recipe
from cnncli.run import checkpoint
from cnncli.run.rundir import RunDir
from cnncli.train.state import Model, TrainState, build, split_model
from cnncli.train.toolbox import resolve_precision


@dataclass
class TrainedRun:
    """A run's recipe, data description and restored model (a train.state.Model)."""

    run: RunDir
    recipe: Recipe
    data: dict[str, Any]  # data.json: class_names, image_shape, mean, std, source
    model: Any
    checkpoint: Path
    meta: dict[str, Any]
    weights: str = "raw"  # raw, or ema: the checkpoint's moving average of the weights

    @property
    def class_names(self) -> list[str]:
        return list(self.data["class_names"])

    @property
    def calibration_key(self) -> str:
        """Which fitted temperature belongs to this model: its checkpoint and weights."""
        return f"{self.checkpoint.name}:{self.weights}"

    @property
    def temperature(self) -> float:
        """The temperature `cnncli eval --temperature` fitted for this checkpoint and weights, else 1."""
        path = self.run.calibration
        if not path.is_file():
            return 1.0
        entry = self.run.read_json(path).get(self.calibration_key)
        return float(entry["temperature"]) if entry else 1.0

    def store_temperature(self, entry: dict[str, Any]) -> None:
        """Record a fitted temperature (and how it was fitted) for this checkpoint and weights."""
        path = self.run.calibration
        stored = self.run.read_json(path) if path.is_file() else {}
        stored[self.calibration_key] = entry
        self.run.write_json(path, stored)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.data["image_shape"])


def _run_of(path: Path) -> RunDir:
    """The run directory of a run path, its checkpoints folder, or one checkpoint inside it."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "recipe.yaml").is_file() or checkpoint.run_file(candidate / "checkpoints", "recipe.yaml"):
            return RunDir(candidate)
    raise UserError(f"{path} is not a cnncli run: no recipe.yaml in it or above it (train one with `cnncli train`)")


def load_trained(path: str | Path, which: str = "best", *, ema: bool = False) -> TrainedRun:
    """Load the run at `path` and restore its `which` (best or latest) checkpoint, or the checkpoint at `path`.

    With `ema`, the model gets the checkpoint's EMA weights instead of the raw ones (runs trained with
    train.ema; otherwise a UserError). A run still training may prune a checkpoint while it is read: the
    checkpoint it then names is read instead.
    """

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run directory written by `cnncli train`")
    if which not in checkpoint.WHICH:
        checkpoint.find(path, which)  # the one clear error for an unknown --checkpoint
    run = _run_of(path)
    is_single = checkpoint.STEP_DIR.match(path.name) is not None and path.is_dir()
    if not is_single and checkpoint.checkpoints_dir(run.path) is None:
        raise checkpoint.no_checkpoint(run.path)
    recipe = checkpoint.read_run_file(run.path, "recipe.yaml", lambda text: recipe_lib.loads(text, str(run.recipe)))
    data = checkpoint.read_run_file(run.path, "data.json", json.loads)
    model = _build(recipe, data)
    template = TrainState(model.params, model.rest, None, None,
                          {"params": model.params, "rest": model.rest} if ema else None)
    for attempt in range(3):
        if is_single:
            checkpoint.check_intact(path)
        ckpt, meta = (path, {}) if is_single else checkpoint.find(run.path, which)
        try:
            state, _ = checkpoint.restore(ckpt, template, with_optimizer=False)
            break
        except checkpoint.Vanished:
            if is_single or attempt == 2:
                raise
    weights = state.ema if ema else {"params": state.params, "rest": state.rest}
    model = replace(model, params=weights["params"], rest=weights["rest"])
    return TrainedRun(run=run, recipe=recipe, data=data, model=model, checkpoint=ckpt, meta=meta,
                      weights="ema" if ema else "raw")


def _build(recipe: Recipe, data: dict[str, Any]):
    """The run's model (a train.loop.Model); a fine-tuned run that kept its old head carries it too."""
    if "old_task" in data:
        return build_with_old_head(recipe, data)

    return build(recipe, tuple(data["image_shape"]), len(data["class_names"]), data["mean"], data["std"])


@dataclass
class EvalData:
    """A split to evaluate a trained run on: images, labels as the run's class indices, and how it was chosen.

    Unpacks as (x, y, class_names).
    """

    x: np.ndarray
    y: np.ndarray
    class_names: list[str]  # the run's
    split: str  # the split taken (another source's default: test when it has one, else all)
    notes: list[str]  # what the user should know about the class matching

    def __iter__(self):
        return iter((self.x, self.y, self.class_names))


def eval_data(trained: TrainedRun, split: str | None = "test", source: str | None = None,
              class_map: dict[str, str] | None = None) -> EvalData:
    """A split of the run's data or of another source, labelled with the run's classes.

    Another source is loaded whole (no validation hold-out, no subsets) at the run's image size and channel
    count, so that any folder of images can be evaluated; its classes are matched to the run's by name
    (`cnncli.data.classes`): their order does not matter and a subset of them is fine. Its `split` may be
    None: test when it has one, else all its images. Data that streams is decoded into memory through the
    evaluation transform (`eval_stream_data` evaluates the run's own data without that).
    """

    notes = []
    if source is None:
        if class_map:
            raise UserError("--class-map maps the classes of another source: give it with --data")
        splits = load_data(trained.recipe.data, trained.recipe.seed)
        split = split or "test"
        x, y = _split_arrays(splits, split, trained.recipe.seed)
        if len(splits.class_names) != len(trained.class_names):
            raise UserError(f"the run's data '{trained.recipe.data.source}' now has {len(splits.class_names)} "
                            f"classes, the model was trained on {len(trained.class_names)}; give the data with --data")
    else:
        h, w, c = trained.image_shape
        # the whole of the other source (no hold-out, no subsets); classes are matched below, by name
        data_cfg = trained.recipe.data.model_copy(update={"source": source, "image_size": (h, w), "channels": c,
                                                          "val_fraction": 0.0, "limit": None, "classes": None,
                                                          "train_per_class": None})
        splits = load_data(data_cfg, trained.recipe.seed, min_classes=1)
        match = match_classes(splits.class_names, trained.class_names, class_map, data=f"data '{source}'")
        notes += [match.note] if match.note else []
        if split is None:
            split = "test" if split_sizes(splits)[2] else "all"
        x, y = match.apply(*_split_arrays(splits, split, trained.recipe.seed))
    if tuple(x.shape[1:]) != trained.image_shape:
        raise UserError(f"data '{splits.source}' has images of shape {tuple(x.shape[1:])}, the model takes "
                        f"{trained.image_shape}; set data.image_size / data.channels")
    return EvalData(x, np.asarray(y, np.int32), trained.class_names, split, notes)


def _split_arrays(splits, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(splits, StreamSplits):
        return splits.decode(split, seed)
    return splits.split(split)


def eval_stream_data(trained: TrainedRun) -> StreamSplits | None:
    """The run's own data when it streams from disk (evaluated batch by batch, never whole), else None."""
    if choose_pipeline(trained.recipe.data)[0] != "stream":
        return None
    splits = load_data(trained.recipe.data, trained.recipe.seed)
    if len(splits.class_names) != len(trained.class_names) or splits.image_shape != trained.image_shape:
        raise UserError(f"the run's data '{trained.recipe.data.source}' now has {len(splits.class_names)} classes of "
                        f"{splits.image_shape} images, the model was trained on {len(trained.class_names)} of "
                        f"{trained.image_shape}; give the data with --data")
    return splits


def output_graphdef(model, output: str):
    """The eval graphdef of a model whose head is a TwoHeads, returning `output` (new, old, both)."""
    module = nnx.merge(model.eval_def, model.params, model.rest)
    for _, m in nnx.iter_modules(module):
        if isinstance(m, TwoHeads):
            m.output = output
    return nnx.split(module, nnx.Param, ...)[0]


def build_with_old_head(recipe: Recipe, data: dict[str, Any]):
    """The model of a fine-tuned run that kept its old head (for `load_trained`), as a train.state.Model."""

    old = data["old_task"]
    model = build_model(recipe.model, input_shape=tuple(data["image_shape"]), num_classes=len(data["class_names"]),
                        mean=data["mean"], std=data["std"], seed=recipe.seed)
    twin = build_model(recipe.model, input_shape=tuple(old["image_shape"]), num_classes=len(old["class_names"]),
                       mean=data["mean"], std=data["std"], seed=recipe.seed)
    head = module_path(old["head"])
    set_module_at(model.net, head, TwoHeads(module_at(model.net, head), module_at(twin.net, head)))

    precision = resolve_precision(recipe.train.precision)
    return Model(*split_model(model, precision), precision)


def old_head_view(trained):
    """The fine-tuned run `trained` seen as its source's task: the old head, classes and data."""
    old = trained.data.get("old_task")
    if old is None:
        raise UserError(f"{trained.run.path} has no old head: it was not fine-tuned with a new head "
                        "(or finetune.keep_old_head was false)")
    recipe = trained.recipe.model_copy(update={"data": DataConfig(**old["data"]), "seed": old["seed"]})
    data = {**trained.data, "class_names": old["class_names"], "image_shape": old["image_shape"]}
    model = replace(trained.model, eval_def=output_graphdef(trained.model, "old"))
    return replace(trained, recipe=recipe, data=data, model=model)
