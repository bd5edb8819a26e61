"""Fine-tuning a trained model on new data: head replacement, freezing, discriminative learning rates
and Learning without Forgetting (Li & Hoiem 2016).

Vocabulary:
- source: the trained model (a run directory, one of its checkpoints, or `cnncli import-weights` output).
- head: the classifier, the last layer with parameters in the forward pass (lenet5 `fc3`, resnet `fc`,
  vgg `fc8`).
- stages: the groups of layers below the head, in forward order: the network's top-level layers, with
  VGG's numbered convolutions grouped by block (resnet: conv1, layer1..layer4; vgg: conv1..conv5, fc6,
  fc7; lenet5: conv1, conv2, fc1, fc2).

Freezing is a label per parameter and one `optax.partition`: frozen parameters get zero updates (so
XLA drops their gradients), trainable ones the recipe's optimizer times their stage's learning-rate
multiplier. Frozen layers also run in inference mode (batch norm on its running statistics, no
dropout), so their statistics stay exactly as loaded.

A replaced head is kept beside the new one (`TwoHeads`) so the old task stays evaluable. It is frozen,
except in `lwf`, where it trains to keep the outputs it gave on the new data before training
(recorded once, as in the paper) while the new head learns the new task.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from cnncli.data.classes import find_classes
from cnncli.data.pipeline import load_splits
from cnncli.errors import UserError, suggest
from cnncli.inspect.summary import INPUT, layer_names
from cnncli.models import build_model
from cnncli.models.layers.classifier import TwoHeads
from cnncli.models.paths import module_at, module_path, set_module_at
from cnncli.recipe import DataConfig, FinetuneConfig, OptimConfig, Recipe
from cnncli.train.batched import Batched
from cnncli.train.evaluate import evaluate
from cnncli.train.optim import build_optimizer
from cnncli.train.state import Model
from cnncli.train.steps import data_mesh, forward, to_pixels
from cnncli.train.toolbox import layer_dtype, resolve_precision
from cnncli.train.trained_run import output_graphdef

TRAIN, FROZEN = "train", "frozen"
HEAD = "head"  # the name lr_mult uses for the head
OLD_HEAD = "old_head"  # the source's head kept beside the new one (its lr multiplier is the head's)
NET = "net"  # a Classifier's network attribute: every parameter path starts with it
RECORD_BATCH = 500  # images per forward pass when recording the old head's outputs
BLOCK_SUFFIX = re.compile(r"_\d+$")  # conv3_2 -> conv3: VGG's convolutions grouped by block


# ----------------------------------------------------------------------------- model anatomy


def _has_params(module: nnx.Module) -> bool:
    return bool(jax.tree.leaves(nnx.state(module, nnx.Param)))


def forward_layers(model: nnx.Module, input_shape) -> list[tuple]:
    """Paths (inside the network) of the layers with parameters, in the order the forward pass runs them."""

    net = model.net
    paths = [module_path(name) for name in layer_names(model, input_shape) if name != INPUT]
    return [p for p in paths if _has_params(module_at(net, p))]


def stage_of(path: tuple) -> str:
    """The stage a path inside the network belongs to (see the module docstring)."""
    return BLOCK_SUFFIX.sub("", str(path[0]))


def anatomy(model: nnx.Module, input_shape) -> tuple[tuple, list[str]]:
    """(head path, stage names below the head in forward order): the head is the last layer with
    parameters in the forward pass."""
    layers = forward_layers(model, input_shape)
    if not layers:
        raise UserError("the model has no layer with parameters to fine-tune")
    head, stages = layers[-1], []
    for path in layers[:-1]:
        if path[: len(head)] != head and stage_of(path) not in stages:
            stages.append(stage_of(path))
    return head, stages


def drop_old_head(model: nnx.Module) -> None:
    """Replace every TwoHeads by its new head (a fine-tuned source is fine-tuned again as a plain model)."""
    for path, module in list(nnx.iter_modules(model)):
        if isinstance(module, TwoHeads):
            set_module_at(model, path, module.new)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """What trains: the head's path, the stages below it, and per stage (or head) whether and how fast."""

    mode: str
    head: tuple  # path inside the network
    stages: list[str]
    trainable_stages: list[str]
    old_head: bool  # the head is a TwoHeads (new + the source's)
    multipliers: dict[str, float]  # stage name or HEAD -> lr multiplier

    def region(self, path: tuple) -> str | None:
        """HEAD, OLD_HEAD, a stage name, or None for a path outside the network (the input normalization)."""
        if len(path) < 2 or path[0] != NET:
            return None
        inner = path[1:]
        if inner[: len(self.head)] == self.head:
            return OLD_HEAD if self.old_head and inner[len(self.head): len(self.head) + 1] == ("old",) else HEAD
        return stage_of(inner)

    def trains(self, region: str | None) -> bool:
        if region == HEAD:
            return True
        if region == OLD_HEAD:
            return self.mode == "lwf"  # LwF trains the old head to keep its recorded outputs
        return region in self.trainable_stages

    def multiplier(self, region: str | None) -> float:
        return self.multipliers.get(HEAD if region == OLD_HEAD else region, 1.0)


def make_plan(cfg: FinetuneConfig, head: tuple, stages: list[str], old_head: bool) -> Plan:
    """Which stages train and their lr multipliers, checking the recipe's stage names and counts."""
    if cfg.mode == "head":
        trainable = []
    elif cfg.mode == "partial":
        if cfg.unfreeze_last > len(stages):
            raise UserError(f"--unfreeze-last (finetune.unfreeze_last) is {cfg.unfreeze_last}, but the model has "
                            f"{len(stages)} stages below its head ({', '.join(stages)}); use at most {len(stages)}")
        trainable = stages[len(stages) - cfg.unfreeze_last:]
    else:
        trainable = list(stages)
    known = [HEAD, *stages]
    for name in cfg.lr_mult:
        if name not in known:
            raise UserError(f"finetune.lr_mult: no stage '{name}'{suggest(name, known)}; stages: {', '.join(known)}")
    # discriminative fine-tuning: the stage d places below the head gets lr_decay ** d
    multipliers = {HEAD: 1.0, **{s: cfg.lr_decay ** (len(stages) - i) for i, s in enumerate(stages)}}
    multipliers.update(cfg.lr_mult)
    return Plan(cfg.mode, head, stages, trainable, old_head, multipliers)


def _key_path(path) -> tuple:
    """A jax key path inside an nnx.State as plain keys (the Variable's `.value` step dropped)."""
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def param_labels(params, plan: Plan):
    """TRAIN or FROZEN for every parameter (a tree shaped like `params`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: TRAIN if plan.trains(plan.region(_key_path(path))) else FROZEN, params)


def lr_multipliers(params, plan: Plan):
    return jax.tree_util.tree_map_with_path(lambda path, _: plan.multiplier(plan.region(_key_path(path))), params)


def scale_by_tree(factors) -> optax.GradientTransformation:
    """Multiply each update by its own factor (a tree shaped like the updates)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, f: u * f, updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def partitioned_optimizer(optim: OptimConfig, lr: Callable, params, labels, multipliers, *,
                    plateau: bool = False) -> optax.GradientTransformation:
    """The recipe's optimizer on the trainable parameters (with the plateau factor if the schedule is
    `plateau`), zero updates for the frozen ones."""

    def only_trainable(tree):  # the view optax.partition gives the trainable group
        return jax.tree.map(lambda x, label: x if label == TRAIN else optax.MaskedNode(), tree, labels)

    trainable = build_optimizer(optim, lr, only_trainable(params), plateau=plateau)
    if any(m != 1.0 for m in jax.tree.leaves(multipliers)):
        trainable = optax.chain(trainable, scale_by_tree(only_trainable(multipliers)))
    return optax.partition({TRAIN: trainable, FROZEN: optax.set_to_zero()}, labels)


def set_inference_where_frozen(model: nnx.Module, plan: Plan) -> None:
    """Frozen layers run as at inference: batch norm on running statistics, no dropout."""
    for path, module in nnx.iter_modules(model):
        if plan.trains(plan.region(tuple(path))):
            continue
        if isinstance(module, nnx.BatchNorm):
            module.use_running_average = True
        elif isinstance(module, nnx.Dropout):
            module.deterministic = True


# ----------------------------------------------------------------------------- loading the source


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path[1:] if path and path[0] == NET else path))


def _is_rng(path: tuple) -> bool:
    return "rngs" in path  # dropout's RNG state: the new run's seed, not the source's


def select_head_classes(source: dict, target: dict, head: tuple, classes: list[int]) -> dict | None:
    """`target` with the head's entries taken from `source` for the classes `classes` (source indices, in the
    new order), e.g. the same classes reordered, or a subset; None when the head's shapes do not allow it."""
    src, dst = flatten_dict(source), flatten_dict(target)
    for path, value in dst.items():
        if path[0] != NET or path[1: 1 + len(head)] != head or _is_rng(path):
            continue
        old = np.asarray(src.get(path))
        if old.shape[:-1] != np.shape(value)[:-1] or np.shape(value)[-1] != len(classes):
            return None  # a head whose last axis is not the classes: it is replaced instead
        dst[path] = old[..., classes]
    return unflatten_dict(dst)


def transfer(source: dict, target: dict, *, skip: tuple | None) -> tuple[dict, list[str]]:
    """`target` (a pure state dict) with every entry taken from `source`, except those under the network
    path `skip` (the replaced head) and RNG state; returns it and the entries that do not fit."""
    src, dst = flatten_dict(source), flatten_dict(target)

    def skipped(path):
        return _is_rng(path) or (skip is not None and path[1: 1 + len(skip)] == skip and path[0] == NET)

    problems = []
    for path, value in dst.items():
        if skipped(path):
            continue
        if path not in src:
            problems.append(f"{_dotted(path)} (not in the source)")
        elif tuple(np.shape(src[path])) != tuple(np.shape(value)):
            problems.append(f"{_dotted(path)} {tuple(np.shape(src[path]))} -> {tuple(np.shape(value))}")
        else:
            dst[path] = src[path]
    problems += [f"{_dotted(p)} (only in the source)" for p in src if p not in dst and not skipped(p)]
    return unflatten_dict(dst), problems


def _check_input(source_shape, data_shape) -> None:
    if source_shape[2] != data_shape[2]:
        raise UserError(f"the source model takes {source_shape[2]}-channel images, the recipe's data has "
                        f"{data_shape[2]}; set data.channels: {source_shape[2]}")


def _size_hint(source_shape, data_shape) -> str:
    if tuple(source_shape[:2]) == tuple(data_shape[:2]):
        return "the recipe's model options must build the source's architecture"
    return (f"the source was trained on {source_shape[0]}x{source_shape[1]} images and these layers depend on "
            f"the size; set data.image_size: [{source_shape[0]}, {source_shape[1]}]")


def build_target(recipe: Recipe, source, image_shape, num_classes: int) -> nnx.Module:
    """The recipe's model for the new data, with the source's normalization."""

    try:
        return build_model(recipe.model, input_shape=image_shape, num_classes=num_classes,
                           mean=source.data["mean"], std=source.data["std"], seed=recipe.seed)
    except UserError as e:
        if tuple(image_shape) == tuple(source.image_shape):
            raise
        raise UserError(f"{e}; {_size_hint(source.image_shape, image_shape)}") from None


def source_module(source) -> nnx.Module:
    """The source model as one plain module (a kept old head dropped)."""
    module = nnx.merge(source.model.eval_def, source.model.params, source.model.rest, copy=True)
    drop_old_head(module)
    return module


# ----------------------------------------------------------------------------- Learning without Forgetting


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Mean KL(softmax(teacher / T) || softmax(student / T)): zero when the outputs are unchanged.

    The paper's loss is the cross-entropy between the two; the KL differs from it by the teacher's
    entropy, a constant, so it has the same gradient and reads 0 when nothing was forgotten.
    """
    p = jax.nn.softmax(teacher_logits / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return jnp.mean(jnp.sum(p * (log_p - log_q), axis=-1))


def lwf_distill(num_new: int, weight: float, temperature: float) -> Callable:
    """The train step's `distill`: splits TwoHeads' "both" logits, adds weight * distillation on the old."""

    def distill(logits, recorded):
        return logits[:, :num_new], weight * distillation_loss(logits[:, num_new:], recorded, temperature)

    return distill


def predict_logits(graphdef, params, rest, images: np.ndarray, batch: int = RECORD_BATCH) -> np.ndarray:
    """Logits of uint8 images, in batches (inference mode is the graphdef's)."""

    def logits(consts, carry, batch, index):
        return carry, forward(graphdef, *consts, to_pixels(batch[0]))[0]

    return Batched(logits, batch_size=min(batch, len(images)))((params, rest), (images,))[1]


# ----------------------------------------------------------------------------- the old task


@dataclass
class OldTask:
    """The source's task, evaluated through the kept old head."""

    class_names: list[str]
    eval_def: Any
    val: tuple[np.ndarray, np.ndarray] | None = None
    test: tuple[np.ndarray, np.ndarray] | None = None
    test_top1_before: float | None = None  # the source's own accuracy, to measure forgetting against

    def evaluate(self, params, rest, split) -> dict[str, Any]:

        x, y = split
        return evaluate(self.eval_def, params, rest, x, y, self.class_names, batch_size=1000, mesh=data_mesh())


def load_old_splits(old: OldTask, data: DataConfig, seed: int) -> str | None:
    """Load the source's validation and test images into `old`; returns why not, if they cannot be loaded."""

    try:
        splits = load_splits(data, seed)
    except UserError as e:
        return str(e)
    if splits.num_classes != len(old.class_names):
        return f"its data has {splits.num_classes} classes, the old head {len(old.class_names)}"
    if len(splits.val_x):
        old.val = (splits.val_x, np.asarray(splits.val_y, np.int32))
    if splits.test_x is not None and len(splits.test_x):
        old.test = (splits.test_x, np.asarray(splits.test_y, np.int32))
    return None


# ----------------------------------------------------------------------------- putting it together


@dataclass
class FineTuning:
    """Everything `train.loop.train` needs to fine-tune (see its `tune` argument)."""

    model: Any  # train.loop.Model: the merged model, train graphdef with frozen layers in inference mode
    plan: Plan
    labels: Any
    multipliers: Any
    head_replaced: bool
    distill: Callable | None = None
    aux: np.ndarray | None = None  # lwf: the old head's recorded logits on the training images
    old: OldTask | None = None
    notes: list[str] = field(default_factory=list)  # things the user should know before training

    def optimizer(self, optim: OptimConfig, lr: Callable, *, plateau: bool = False) -> optax.GradientTransformation:
        return partitioned_optimizer(optim, lr, self.model.params, self.labels, self.multipliers, plateau=plateau)

    def counts(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts."""
        sizes = zip(jax.tree.leaves(self.model.params), jax.tree.leaves(self.labels))
        trainable = frozen = 0
        for p, label in sizes:
            if label == TRAIN:
                trainable += p.size
            else:
                frozen += p.size
        return trainable, frozen

    def describe(self) -> str:
        """The line printed before training: what trains, what is frozen, what happened to the head."""
        trainable, frozen = self.counts()
        plan = self.plan
        head = ".".join(map(str, plan.head))
        head_text = f"head {head} {'replaced' if self.head_replaced else 'loaded'}"
        if self.old is not None:
            head_text += f", old head kept ({'trains' if plan.mode == 'lwf' else 'frozen'})"
        frozen_stages = [s for s in plan.stages if s not in plan.trainable_stages]
        stages = (f"trains: {', '.join([HEAD, *plan.trainable_stages])}"
                  + (f"; frozen: {', '.join(frozen_stages)}" if frozen_stages else ""))
        rates = {k: v for k, v in plan.multipliers.items() if v != 1.0 and (k == HEAD or k in plan.trainable_stages)}
        lr_text = f"; lr x {', '.join(f'{k} {v:g}' for k, v in rates.items())}" if rates else ""
        return (f"fine-tune ({plan.mode}): {trainable:,} trainable / {frozen:,} frozen parameters; {head_text}; "
                f"{stages}{lr_text}")

    def epoch_metrics(self, params, rest) -> dict[str, float]:
        # in head mode nothing the old head sees changes: its accuracy is reported once, at the end
        if self.old is None or self.old.val is None or self.plan.mode == "head":
            return {}
        result = self.old.evaluate(params, rest, self.old.val)
        return {"old_val_loss": result["loss"], "old_val_acc": result["top1"]}

    def final_metrics(self, params, rest) -> dict[str, Any]:
        if self.old is None or self.old.test is None:
            return {}
        result = self.old.evaluate(params, rest, self.old.test)
        return {"old_task_test": {**{k: result[k] for k in ("n", "top1", "top5", "loss")},
                                  "top1_before": self.old.test_top1_before}}


def prepare(source, recipe: Recipe, splits) -> FineTuning:
    """Build the fine-tuning of `source` (a trained.Trained) for `recipe` on `splits`.

    Raises:
        UserError: the data does not fit the source (channels, size), parameters outside the head differ
            in shape, or the finetune section asks for something the model does not have.
    """

    cfg = recipe.finetune or FinetuneConfig()
    _check_input(source.image_shape, splits.image_shape)
    if recipe.model.name != source.recipe.model.name:
        raise UserError(f"the recipe's model is '{recipe.model.name}' but the source is a "
                        f"'{source.recipe.model.name}'; leave out the model section to use the source's")
    old_module = source_module(source)
    head, stages = anatomy(old_module, source.image_shape)
    # the head is kept only for the same classes, matched by name: their order and a subset do not matter
    classes = find_classes(splits.class_names, source.class_names)
    replace_head = cfg.new_head or cfg.mode == "lwf" or classes is None
    if cfg.mode == "lwf" and not cfg.keep_old_head:
        raise UserError("finetune.mode lwf distills into the old head: it needs finetune.keep_old_head: true")

    model = build_target(recipe, source, splits.image_shape, splits.num_classes)
    _, source_params, source_rest = nnx.split(old_module, nnx.Param, ...)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    reorder = not replace_head and classes != list(range(len(source.class_names)))
    problems = []
    merged = {}
    for name, src, dst in (("params", source_params, params), ("rest", source_rest, rest)):
        merged[name], found = transfer(nnx.to_pure_dict(src), nnx.to_pure_dict(dst),
                                       skip=head if replace_head or reorder else None)
        problems += found
        if reorder and not found:
            merged[name] = select_head_classes(nnx.to_pure_dict(src), merged[name], head, classes)
            if merged[name] is None:
                raise UserError(f"the source's head {'.'.join(map(str, head))} cannot be matched to the new "
                                "classes by name; set finetune.new_head: true to train a new one")
    if problems:
        raise UserError(f"the source model does not fit the recipe: {len(problems)} parameters differ outside the "
                        f"head ({'; '.join(problems[:8])}{', ...' if len(problems) > 8 else ''}); "
                        f"{_size_hint(source.image_shape, splits.image_shape)}")
    nnx.replace_by_pure_dict(params, merged["params"])
    nnx.replace_by_pure_dict(rest, merged["rest"])
    model = nnx.merge(graphdef, params, rest)

    keep_old = replace_head and cfg.keep_old_head
    if keep_old:
        set_module_at(model.net, head, TwoHeads(module_at(model.net, head), module_at(old_module.net, head)))
    plan = make_plan(cfg, head, stages, keep_old)

    model.train()
    set_inference_where_frozen(model, plan)
    if cfg.mode == "lwf":
        module_at(model.net, head).output = "both"
    precision = resolve_precision(recipe.train.precision)
    with layer_dtype(model, precision):  # mixed precision, as train.state.split_model does
        train_def, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        if keep_old:
            module_at(model.net, head).output = "new"
        eval_def, _, _ = nnx.split(model, nnx.Param, ...)
    built = Model(train_def, eval_def, params, rest, precision)
    tuning = FineTuning(model=built, plan=plan, labels=param_labels(params, plan),
                        multipliers=lr_multipliers(params, plan), head_replaced=replace_head)
    if reorder:
        tuning.notes.append(f"the source's head is kept for the {len(classes)} classes the data shares with it "
                            f"({len(source.class_names)} in the source), matched by name, not by position")
    elif replace_head and not cfg.new_head and cfg.mode != "lwf":
        tuning.notes.append(f"new head: the data's classes ({', '.join(splits.class_names[:6])}"
                            f"{', ...' if splits.num_classes > 6 else ''}) are not among the source's by name")
    if keep_old:
        tuning.old = OldTask(class_names=source.class_names, eval_def=output_graphdef(built, "old"))
        why = load_old_splits(tuning.old, source.recipe.data, source.recipe.seed)
        if why:
            tuning.notes.append(f"old-task accuracy is not reported: the source's data cannot be loaded ({why})")
        elif tuning.old.test is not None:
            tuning.old.test_top1_before = tuning.old.evaluate(params, rest, tuning.old.test)["top1"]
    if cfg.mode == "lwf":
        tuning.aux = predict_logits(tuning.old.eval_def, params, rest, splits.train_x)
        tuning.distill = lwf_distill(splits.num_classes, cfg.lwf_lambda, cfg.lwf_temperature)
    return tuning


def run_data(source, recipe: Recipe, splits, tuning: FineTuning) -> dict[str, Any]:
    """data.json of the fine-tuned run: the new classes, the source's normalization, and the old task."""
    data = {"source": recipe.data.source, "class_names": splits.class_names, "image_shape": list(splits.image_shape),
            "mean": list(source.data["mean"]), "std": list(source.data["std"]), "n_train": len(splits.train_x),
            "n_val": len(splits.val_x), "finetuned_from": str(source.checkpoint)}
    if tuning.old is not None:
        data["old_task"] = {"class_names": source.class_names, "image_shape": list(source.image_shape),
                            "head": ".".join(map(str, tuning.plan.head)),
                            "data": source.recipe.data.model_dump(mode="json"), "seed": source.recipe.seed}
    return data
