"""The Recipe schema: one validated object describes a run.

Recipes are YAML files with the sections `model`, `data`, `augment`, `optim`, `schedule` and
`train`. Unknown keys and wrong types are user errors that name the key's path and the closest
valid key. `--set a.b=c` overrides are applied to the raw YAML before validation, so they are
type-checked exactly like the file.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from cnncli.errors import UserError, brief, suggest

# Package data (pyproject.toml), so that `pip install cnncli` ships them; a plain directory once installed.
BUNDLED_RECIPES = Path(str(resources.files("cnncli") / "recipes"))
# Bounds on what a recipe file (or --set) may ask for: real recipes are a few KB, a few levels deep and a
# few hundred values; the bounds stop a small hostile file (an alias bomb, a 20,000-deep list) early.
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 50
MAX_VALUES = 100_000  # after YAML aliases are expanded
MAX_IMAGE_SIDE = 8192  # pixels; 224 is ImageNet's, medical and satellite crops stay below this
MAX_SEED = 2**63  # NumPy's generators take a non-negative seed, JAX's a 64-bit signed one
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")  # a recipe name is a directory name under runs/


class Section(BaseModel):
    """A recipe section: unknown keys are errors, defaults are explicit."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="dropout rate where the model has it")
    activation: str | None = Field(None, description="activation used throughout (model default if unset)")
    norm: str | None = Field(None, description="normalization layer: batch, lrn, lcn, none")
    pool: str | None = Field(None, description="pooling: max, avg, l2, conv (strided conv)")
    layers: list[Any] | None = Field(None, description="layer list for the `sequential` model")
    args: dict[str, Any] = Field(default_factory=dict, description="further keyword arguments of the model")


class GeneratedConfig(Section):
    """Images of a class-conditional GAN mixed into every training batch (GAN-based augmentation)."""

    gan: str = Field(description="a GAN run directory written by `cnncli gan train`, trained on this recipe's "
                                 "training split (the same data section and seed)")
    fraction: float = Field(0.5, ge=0.0, lt=1.0, description="share of each training batch that is generated "
                                                             "images; the rest are real, and an epoch still passes "
                                                             "over every real image once")
    pool: int = Field(10_000, ge=1, description="generated images sampled once before training (balanced "
                                                "classes); each step draws its share from them at random")
    seed: int = Field(0, description="noise seed of the pool: the same GAN and seed give the same images")


class RandomResizedCropConfig(Section):
    """torchvision's RandomResizedCrop: a random area fraction and aspect ratio, resized to data.image_size."""

    scale: tuple[float, float] = Field((0.08, 1.0), description="range of the crop's share of the image area")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="range of the crop's aspect ratio (width / height)")

    @field_validator("scale", "ratio")
    @classmethod
    def _increasing_positive(cls, value):
        if not 0 < value[0] <= value[1]:
            raise ValueError("expected [low, high] with 0 < low <= high")
        return value

    @field_validator("scale")
    @classmethod
    def _fraction(cls, value):
        if value[1] > 1:
            raise ValueError("the area fraction cannot exceed 1")
        return value


class DataConfig(Section):
    source: str = Field("fashion_mnist", description="dataset: fashion_mnist, digits, cifar10:DIR, cifar100:DIR, "
                                                     "tfds:NAME, folder:PATH, arrayrecord:DIR, npz:PATH, idx:DIR, "
                                                     "synthetic")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of the training set held out for validation")
    image_size: tuple[Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)], Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)]] \
        | None = Field(None, description="resize images to [H, W], or 28 / 28x28 for square ones "
                                       "(folder sources need it)")
    channels: Literal[1, 3] | None = Field(None, description="convert images to 1 (gray) or 3 (RGB) channels")
    preprocess: Literal["scale", "center", "standardize"] = Field(
        "standardize", description="scale to [0,1]; then subtract the per-channel mean, or also divide by the std")
    classes: list[int] | None = Field(None, description="keep only these classes, relabelled 0..k-1 in this order")
    train_per_class: int | None = Field(None, ge=1, description="keep at most this many training images per class")
    limit: int | None = Field(None, ge=1, description="keep only the first N training images (quick runs)")
    balanced_sampling: bool = Field(False, description="draw each epoch's training images with replacement, "
                                                       "weighted by inverse class frequency (imbalanced data)")
    generated: GeneratedConfig | None = Field(None, description="mix a GAN's labelled samples into every training "
                                                                "batch (`cnncli gan train`)")
    pipeline: Literal["memory", "stream", "auto"] = Field(
        "auto", description="memory: decode everything once into memory and onto the device; stream: read, decode "
                            "and crop each batch from disk in worker processes (folder: and arrayrecord: sources); "
                            "auto: stream when the decoded data would exceed data.memory_budget or a stream-only "
                            "option (crops, jpeg_draft, skip_corrupt) is set")
    memory_budget: float = Field(0.25, gt=0.0, le=1.0, description="auto: the share of host RAM (and of one "
                                                                   "accelerator's memory) the decoded data may take")
    random_resized_crop: RandomResizedCropConfig | None = Field(
        None, description="stream: train on random-resized crops (ImageNet style; `{}` for torchvision's ranges)")
    eval_crop: float | None = Field(None, gt=0.0, le=1.0, description="stream: resize the shorter side to "
                                    "image_size / eval_crop, then crop the center image_size (0.875: 256 -> 224)")
    jpeg_draft: bool = Field(False, description="stream: decode JPEGs at 1/2, 1/4 or 1/8 size when that still "
                                                "covers the output (much faster on large photos)")
    workers: int | None = Field(None, ge=0, description="stream: Grain worker processes that decode batches "
                                                        "(default: one per core but one; 0: in the main process)")
    prefetch: int = Field(2, ge=1, description="stream: batches read ahead on the host, and again on the device")
    skip_corrupt: bool = Field(False, description="stream (auto streams with it): replace undecodable images "
                                                  "by the next one and count them, instead of stopping with the "
                                                  "image's name")


    @field_validator("image_size", mode="before")
    @classmethod
    def _size_forms(cls, value):
        """28 and '28x28' mean [28, 28]; '32x24' is [32, 24] (height first, as everywhere in cnncli)."""
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, value)
        if isinstance(value, str):
            parts = value.lower().replace(" ", "").split("x")
            if len(parts) in (1, 2) and all(p.isdigit() for p in parts):
                return (int(parts[0]), int(parts[-1]))
            raise ValueError("expected [H, W], HxW or one number for a square size, e.g. 28x28")
        return value


class AugmentOp(BaseModel):
    """One augmentation: its registered name, probability and its own parameters."""

    model_config = ConfigDict(extra="allow")
    name: str
    p: float = Field(1.0, ge=0.0, le=1.0)

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(Section):
    name: str = Field("sgd", description="sgd, momentum, nesterov, adagrad, adadelta, adam, adamw, rmsprop")
    lr: float = Field(0.01, gt=0.0, description="base (peak) learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    b1: float = Field(0.9, ge=0.0, lt=1.0)
    b2: float = Field(0.999, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0,
                                description="decoupled weight decay (multiplied by the lr; adamw: 0.01 if 0)")
    l2: float = Field(0.0, ge=0.0, description="L2 penalty added to the loss: l2/2 * sum(w^2)")
    l1: float = Field(0.0, ge=0.0, description="L1 penalty added to the loss: l1 * sum(|w|)")
    decay_all: bool = Field(False, description="also decay biases and normalization scales")
    clip_norm: float | None = Field(None, gt=0.0, description="clip gradients to this global norm")


class ScheduleConfig(Section):
    name: str = Field("constant", description="constant, step, multistep, exponential, cosine, cosine_restarts, "
                                              "onecycle, plateau")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warmup from 0 over this many epochs")
    step_epochs: int = Field(30, ge=1, description="step: multiply the lr by gamma every this many epochs")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step/multistep: factor at each drop; exponential: "
                                                          "factor per epoch")
    milestones: list[float] = Field(default_factory=list, description="multistep: epochs at which the lr is "
                                                                      "multiplied by gamma")
    final_fraction: float = Field(0.0, ge=0.0, le=1.0, description="cosine/onecycle/cosine_restarts: final lr as a "
                                                                   "fraction of lr")
    peak_at: float = Field(0.25, gt=0.0, lt=1.0, description="onecycle: fraction of training spent rising")
    cycle_epochs: float = Field(10.0, gt=0.0, description="cosine_restarts: length of the first cycle in epochs")
    cycle_mult: float = Field(1.0, ge=1.0, description="cosine_restarts: each cycle is this many times longer")
    factor: float = Field(0.1, gt=0.0, lt=1.0, description="plateau: multiply the lr by this when the validation "
                                                           "loss stops improving")
    patience: int = Field(5, ge=0, description="plateau: epochs without improvement before the lr drops")


class EarlyStoppingConfig(Section):
    patience: int = Field(5, ge=1, description="stop after this many epochs without validation-accuracy improvement")
    min_delta: float = Field(0.0, ge=0.0, description="an improvement must raise validation accuracy by more than this")
    restore_best: bool = Field(True, description="report the best epoch's weights, not the last epoch's "
                                                 "(also when stopped with Ctrl-C)")


class AdversarialConfig(Section):
    """Adversarial training: each step also trains on Linf attacks of its batch, made inside the step."""

    attack: Literal["fgsm", "pgd", "fast-fgsm"] = Field(
        "pgd", description="fgsm (Goodfellow et al.), pgd (Madry et al.) or fast-fgsm (Wong et al. 2020: one step "
                           "from a uniform random start)")
    eps: float = Field(0.1, gt=0.0, le=1.0, description="Linf radius in pixels [0, 1]")
    steps: int = Field(7, ge=1, description="pgd iterations")
    step_size: float | None = Field(None, gt=0.0, description="pgd step [default 0.02]; fast-fgsm step [default "
                                                              "1.25 * eps]")
    mix: float = Field(0.5, gt=0.0, le=1.0, description="weight of the adversarial loss; 1 - mix on the clean loss")
    trades: float | None = Field(None, gt=0.0, description="TRADES (Zhang et al. 2019) with this beta: the loss is "
                                                           "CE(clean) + beta * KL(clean || adversarial) and the attack "
                                                           "maximizes the KL (mix is unused; the paper: 1 to 6)")

    @field_validator("trades")
    @classmethod
    def _random_start(cls, value, info):
        # the KL is at its minimum at the clean image, where its gradient is zero: fgsm would never move
        if value is not None and info.data.get("attack") == "fgsm":
            raise ValueError("TRADES needs a random start: use attack pgd or fast-fgsm")
        return value


class TrainConfig(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    accumulate: int = Field(1, ge=1, description="gradient accumulation: average the gradients of this many "
                                                 "batches before each update (the update of a k-times larger "
                                                 "batch; batch norm still sees batch_size)")
    eval_batch_size: int = Field(1000, ge=1, description="images per evaluation step (validation and test share "
                                                        "one batch shape, the last batch padded)")
    tta: bool = Field(False, description="validation and test average each image's softmax with its horizontal "
                                         "flip's (as `cnncli eval --tta`)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    loss: str = Field("cross_entropy", description="cross_entropy, hinge (multiclass SVM), mse, or perceptron "
                                                   "(Rosenblatt's rule with optim sgd)")
    log_every: int = Field(50, ge=1, description="steps between progress updates")
    adversarial: AdversarialConfig | None = Field(None, description="train on adversarial examples too")
    ema: float | None = Field(None, ge=0.0, lt=1.0, description="decay of an exponential moving average of the "
                                                               "weights, validated and checkpointed beside them")
    ema_every: int = Field(1, ge=1, description="update the EMA every this many steps, with the decay raised to "
                                                "this power (about the same average for a fraction of the work, as "
                                                "airbench does; the EMA then lags the weights by up to k - 1 steps)")
    steps_per_call: int | Literal["auto"] = Field(
        "auto", description="training steps per dispatch to the device (a loop inside one program); auto: 1 on "
                            "CPUs, the steps between progress updates elsewhere; a multiple of ema_every with EMA")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute dtype of the layers (training, evaluation, attacks, visualizations); auto: "
                            "bfloat16 on GPUs of compute capability 8.0+ and TPUs, float32 elsewhere; weights, "
                            "optimizer state, batch-norm statistics, EMA and the loss stay float32")
    early_stopping: EarlyStoppingConfig | None = Field(None, description="stop when validation accuracy stalls")
    keep_checkpoints: int | None = Field(None, ge=1, description="also keep the k epoch checkpoints with the best "
                                                                 "validation accuracy")
    class_weights: str | list[float] | None = Field(
        None, description="per-class loss weights, or 'balanced' (inverse class frequency)")

    @field_validator("steps_per_call")
    @classmethod
    def _positive_steps(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("expected 'auto' or a positive number of steps")
        return value

    @field_validator("class_weights")
    @classmethod
    def _balanced_or_weights(cls, value):
        # one clear message instead of pydantic's per-branch errors of a Literal | list union
        if isinstance(value, str) and value != "balanced":
            raise ValueError("expected 'balanced' or a list of non-negative weights, one per class")
        if isinstance(value, list) and (not value or min(value) < 0 or not sum(value) > 0):
            raise ValueError("expected non-negative weights, one per class, not all zero")
        return value


class FinetuneConfig(Section):
    """How `cnncli fine-tune` adapts a trained model (the source) to this recipe's data."""

    mode: Literal["head", "partial", "full", "lwf"] = Field(
        "full", description="head: train only the new classifier; partial: also the last unfreeze_last stages; "
                            "full: everything; lwf: everything, plus distillation that keeps the old head's outputs")
    unfreeze_last: int = Field(1, ge=0, description="partial: how many stages below the head train")
    new_head: bool = Field(False, description="replace the head even when the class count is unchanged")
    keep_old_head: bool = Field(True, description="keep a replaced head (frozen unless lwf) to report old-task "
                                                  "accuracy; lwf needs it")
    lr_mult: dict[str, PositiveFloat] = Field(default_factory=dict,
                                      description="learning-rate multiplier per stage name ('head' for the head)")
    lr_decay: float = Field(1.0, gt=0.0, le=1.0, description="discriminative fine-tuning: each stage below the "
                                                             "head gets this times the lr of the stage above it")
    lwf_lambda: float = Field(1.0, ge=0.0, description="lwf: weight lambda_o of the distillation loss")
    lwf_temperature: float = Field(2.0, gt=0.0, description="lwf: temperature T of the distillation")
    source: str | None = Field(None, description="the source run (written by `cnncli fine-tune`)")


class Recipe(Section):
    name: str = Field(description="the run's name: runs/<name> by default, so a plain name (no path)")
    description: str = ""
    seed: int = Field(0, ge=0, lt=MAX_SEED)
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    augment: list[AugmentOp] = Field(default_factory=list)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig | None = Field(None, description="set by fine-tune recipes (`cnncli fine-tune`)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # the name becomes a directory under runs/: '../x' or '/x' would write (and --overwrite delete) elsewhere
        if not PLAIN_NAME.fullmatch(value) or ".." in value:
            raise ValueError("a recipe name is a plain name (letters, digits, '_', '-', '.', '+'; no path "
                             "separators or '..'), e.g. lenet5_fashion_mnist; use --run-dir to choose the directory")
        return value

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def resolve_path(name_or_path: str | Path) -> Path:
    """A recipe file, or the name of a bundled recipe (with or without `.yaml`, and as `recipes/NAME.yaml`
    from any directory: the recipe headers and the README use that form)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (BUNDLED_RECIPES / path.name, BUNDLED_RECIPES / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    bundled = [p.stem for p in bundled_recipes()]
    raise UserError(f"recipe '{name_or_path}' not found{suggest(path.stem, bundled)}; "
                    f"bundled recipes: {', '.join(bundled)}")


def bundled_recipes() -> list[Path]:
    return sorted(BUNDLED_RECIPES.glob("*.yaml"))


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing duplicate keys and nesting deeper than MAX_DEPTH."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                raise yaml.YAMLError(f"a key at line {key_node.start_mark.line + 1} is a list or a mapping")
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {brief(key, 40)} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _values(obj: Any, memo: dict[int, int]) -> int:
    """How many values `obj` holds once every YAML alias is expanded (shared objects counted once each)."""
    if not isinstance(obj, dict | list):
        return 1
    if id(obj) not in memo:
        memo[id(obj)] = 0  # a self-reference (a recursive alias) counts as one
        children = obj.values() if isinstance(obj, dict) else obj
        memo[id(obj)] = 1 + sum(_values(child, memo) for child in children)
    return memo[id(obj)]


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as Python values, within the bounds above; every problem is one UserError line."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{source} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise UserError(f"{source} is nested too deeply") from None
    if _values(value, {}) > MAX_VALUES:
        raise UserError(f"{source} expands to more than {MAX_VALUES:,} values (through YAML aliases?): a recipe is "
                        "far smaller")
    return value


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read recipe {path}: {e.strerror}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise UserError(f"{path} is larger than {MAX_RECIPE_BYTES >> 20} MB: not a recipe")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): save the "
                        "recipe as UTF-8") from None


def read_yaml_file(path: Path, source: str | None = None) -> Any:
    """A YAML (or JSON) file given by the user, within the bounds above; every problem is one UserError."""
    return parse_yaml(_read_text(path), source or str(path))


def read_yaml(path: Path) -> dict[str, Any]:
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a recipe: expected a YAML mapping with a 'model' section")
    return raw


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (3 -> int, [1,2] -> list)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects KEY=VALUE (e.g. optim.lr=0.05), got '{brief(assignment)}'")
    try:
        value = parse_yaml(text, f"--set {key.strip()}")
    except UserError:
        if len(text) > MAX_RECIPE_BYTES:
            raise
        value = text  # not YAML: the text itself (validation says whether a string fits here)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
        else:
            if node.get(part) is None:  # a missing or empty (null) section becomes a mapping
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict | list):
            raise UserError(f"--set {key.strip()}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
    if isinstance(node, list):
        node[_list_index(node, parts[-1], parts)] = value
    else:
        node[parts[-1]] = value


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"--set {'.'.join(path)}: expected an index below {len(node)}")
    return int(part)


def load(path_or_name: str | Path, overrides: list[str] = (), defaults: dict[str, Any] | None = None) -> Recipe:
    """Load, override and validate a recipe; every problem is a UserError naming the key.

    `defaults` fill top-level sections the file leaves out (a fine-tune recipe takes its model from the source).
    """
    path = resolve_path(path_or_name)
    raw = read_yaml(path)
    raw.setdefault("name", "_".join(re.split(r"[^A-Za-z0-9_.+-]+", path.stem)).lstrip("."))  # 'my run' -> my_run
    for key, value in (defaults or {}).items():
        raw.setdefault(key, value)
    if "gan" in raw and "model" not in raw:
        raise UserError(f"{path} is a GAN recipe: train it with `cnncli gan train {path_or_name}`")
    if "finetune" in raw and "model" not in raw:
        raise UserError(f"{path} is a fine-tune recipe (its model comes from the source): run it with "
                        f"`cnncli fine-tune SOURCE {path_or_name}`")
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate(raw, source=str(path), overrides=overrides)


def loads(text: str, source: str = "recipe") -> Recipe:
    """A recipe from YAML text (a run's recipe.yaml, or the copy a checkpoint keeps)."""
    raw = parse_yaml(text, source)
    if not isinstance(raw, dict):
        raise UserError(f"{source} is not a recipe: expected a YAML mapping with a 'model' section")
    return validate(raw, source)


def validate(raw: dict[str, Any], source: str = "recipe", overrides: list[str] = ()) -> Recipe:
    """The Recipe of `raw`; an error names the `--set` that set the bad key, else `source` (the file)."""
    return validate_section(Recipe, raw, source, overrides)


def validate_section(schema: type[BaseModel], raw: dict[str, Any], source: str = "recipe",
                     overrides: list[str] = ()):
    """`raw` validated as `schema` (a recipe-like model); the first problem is a UserError naming its key."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{_blame(err['loc'], overrides) or source}: {_describe(err, schema)}") from None


def _blame(loc: tuple, overrides: list[str]) -> str | None:
    """The last `--set` whose key is the error's key, or lies above or below it."""
    where = [str(p) for p in loc]
    for assignment in reversed(list(overrides)):
        key = assignment.partition("=")[0].strip().split(".")
        n = min(len(key), len(where))
        if key[:n] == where[:n]:
            return f"--set {assignment if len(assignment) <= 80 else assignment[:77] + '...'}"
    return None


def _describe(err: dict[str, Any], schema: type[BaseModel] | None = None) -> str:
    """One readable line for a pydantic error: the dotted key path, the problem, a suggestion."""
    loc = [str(p) for p in err["loc"]]
    path = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1], schema or Recipe)
        return f"unknown key '{path}'{suggest(loc[-1], valid)}; valid keys here: {', '.join(valid)}"
    if err["type"] == "missing":
        return f"missing key '{path}'"
    message = err["msg"].removeprefix("Value error, ")
    return f"key '{path}': {message} (got {brief(err.get('input'))})"


def recipe_keys(model: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key a recipe can set (`train.epochs`, `optim.lr`, ...), sections first-level order."""
    keys = []
    for name, field in (model or Recipe).model_fields.items():
        section = _section_model(field.annotation)
        if section is None:
            keys.append(prefix + name)
        else:
            keys.extend(recipe_keys(section, f"{prefix}{name}."))
    return keys


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The Section class of a field annotated `X` or `X | None`, else None."""
    candidates = [annotation, *(getattr(annotation, "__args__", None) or ())]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, Section)), None)


def _fields_at(loc: list[str], schema: type[BaseModel]) -> list[str]:
    """The valid field names of the section at `loc` of `schema` (list indices skipped)."""
    model: Any = schema
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        candidates = [annotation, *(inner or ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)
