"""Weights from PyTorch: torchvision and timm state dicts mapped onto cnncli models (`cnncli import-weights`).

Layouts: torch convolution kernels are OIHW, cnncli's HWIO; torch linear weights are (out, in), cnncli's
(in, out); a linear layer on a flattened feature map (VGG's and AlexNet's fc6) flattens C, H, W in torch
and H, W, C in cnncli, so its input rows are permuted. Batch norm weight, bias, running_mean and
running_var become scale, bias, mean and var (eps 1e-5 in both).

Names: ResNets map by name (torchvision's and timm's ResNets share conv1, bn1, layerN.i.convK / bnK,
downsample.0 / .1 and fc). The "features + classifier" families (VGG, AlexNet) map by position: their
layers with weights, in order (timm's VGG head, a 7x7 convolution `pre_logits.fc1`, maps like a linear
layer on the flattened map).

`.safetensors` files are read without torch; `.pth`/`.pt` files need torch (`torch.load`, weights only).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from cnncli.errors import UserError, suggest
from cnncli.inspect.summary import input_shape_of
from cnncli.models import build_model, registered_models
from cnncli.models.paths import module_at
from cnncli.models.resnet import IMAGENET, Bottleneck
from cnncli.models.vgg import CONFIGS
from cnncli.recipe import DataConfig, ModelConfig, Recipe
from cnncli.run import checkpoint
from cnncli.train.state import TrainState, init_totals
from cnncli.transfer.finetune import forward_layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's normalization of ImageNet pixels in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SOURCE = "tfds:imagenet2012"
DEFAULT_INPUT = (224, 224, 3)
TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")  # checkpoints that wrap the state dict
IGNORED = ("num_batches_tracked",)  # torch's BN step counter: nothing to map
SHOWN = 6  # keys named in an error before "..."
BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
SECTIONS = ("features", "pre_logits", "classifier", "head")  # order of the parts of sequential models

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = tuple(f"{n}{bn}" for n in ("vgg11", "vgg13", "vgg16", "vgg19") for bn in ("", "_bn"))
# torchvision's name -> (cnncli's model, the args that make it torchvision's architecture at any input size)
ARCHS = {**{n: (n, {"stem": "imagenet"}) for n in RESNETS}, **{n: (n, {"classifier": "paper"}) for n in VGGS},
         "alexnet": ("alexnet_tv", {})}  # cnncli's `alexnet` is the paper's (96 filters, LRN, two towers)


def architectures() -> list[str]:
    """The (torchvision) architecture names import-weights maps."""

    return [name for name, (model, _) in ARCHS.items() if model in registered_models()]


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The float32 arrays of a .safetensors or .pth/.pt state dict, keys without a DataParallel 'module.'."""
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a .pth, .pt or .safetensors file of PyTorch weights")
    if path.suffix == SAFETENSORS_SUFFIX:
        tensors = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        tensors = _read_torch(path)
    else:
        raise UserError(f"{path}: expected a .pth, .pt or .safetensors file, not '{path.suffix}'")
    if not tensors:
        raise UserError(f"{path} holds no tensors")
    return {k.removeprefix("module."): np.asarray(v, np.float32) for k, v in tensors.items()
            if not k.endswith(IGNORED)}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"reading {path} needs PyTorch (pip install torch); or save the weights as .safetensors, "
                        "which cnncli reads without it") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, weights-only refusal): all mean "cannot read"
        raise UserError(f"{path} cannot be read as PyTorch weights ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "save the model's state_dict() with torch.save") from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    return {k: v.detach().float().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------- layouts


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO."""
    return np.transpose(w, (2, 3, 1, 0))


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """(out, in) -> (in, out); a 1x1 convolution used as a linear layer (timm's VGG fc2) as (out, in)."""
    return np.transpose(w.reshape(w.shape[0], -1))


def flattened_map_kernel(channels: int) -> Callable[[np.ndarray], np.ndarray]:
    """A linear layer on a flattened C x H x W map (or its convolution form O x C x H x W) -> (H*W*C, out)."""

    def convert(w: np.ndarray) -> np.ndarray:
        out = w.shape[0]
        spatial = w.size // (out * channels)
        side = int(round(spatial ** 0.5))
        if side * side * channels * out != w.size:
            return linear_kernel(w)  # not a square map: let the shape check report it
        return np.transpose(w.reshape(out, channels, side, side), (2, 3, 1, 0)).reshape(-1, out)

    return convert


def copy(w: np.ndarray) -> np.ndarray:
    return w


# ----------------------------------------------------------------------------- name mappings
# Each maps cnncli's flat state paths ('net', 'layer1', 0, 'conv1', 'kernel'), given with their arrays, to
# (torch key, converter).


def _resnet_bn(unit: tuple) -> str:
    """torch's batch-norm module of a cnncli conv unit: conv1 -> bn1, layerN.i.convK -> layerN.i.bnK,
    layerN.i.downsample -> layerN.i.downsample.1."""
    *prefix, last = unit
    name = "downsample.1" if last == "downsample" else "bn" + str(last).removeprefix("conv")
    return ".".join([*map(str, prefix), name])


def resnet_mapping(targets: dict[tuple, Any], tensors: dict[str, np.ndarray], model
                   ) -> dict[tuple, tuple[str, Callable]]:
    mapping = {}
    for path, target in targets.items():
        *unit, leaf = path[1:]
        if unit[-1] == "bn":
            mapping[path] = (f"{_resnet_bn(tuple(unit[:-1]))}.{BN_NAMES[leaf]}", copy)
            continue
        module = ".".join(map(str, unit)) + (".0" if unit[-1] == "downsample" else "")
        if leaf == "kernel":
            mapping[path] = (f"{module}.weight", conv_kernel if target.ndim == 4 else linear_kernel)
        else:
            mapping[path] = (f"{module}.{leaf}", copy)
    return mapping


def _torch_modules(tensors: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(module name, kind) of a sequential model's layers with weights in forward order; kind is conv,
    bn or linear."""
    names = {k.rsplit(".", 1)[0] for k in tensors if "." in k}

    def order(name):  # features.0 < features.3 < features.10 < classifier.0; numbers before names
        section, *rest = name.split(".")
        rank = SECTIONS.index(section) if section in SECTIONS else len(SECTIONS)
        return rank, section, [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in rest]

    modules = []
    for name in sorted((n for n in names if f"{n}.weight" in tensors), key=order):
        if f"{name}.running_mean" in tensors:
            kind = "bn"
        elif tensors[f"{name}.weight"].ndim == 4 and name.startswith("features."):
            kind = "conv"
        else:
            kind = "linear"
        modules.append((name, kind))
    return modules


def sequential_mapping(targets: dict[tuple, Any], tensors: dict[str, np.ndarray], model
                       ) -> dict[tuple, tuple[str, Callable]]:
    """VGG/AlexNet: cnncli's layers with weights, in forward order, against torch's, in order."""

    torch_modules = iter(_torch_modules(tensors))
    mapping: dict[tuple, tuple[str, Callable]] = {}
    channels = None  # output channels of the last convolution: the map a first linear layer flattens
    net = model.net
    for unit in forward_layers(model, input_shape_of(model)):
        layer = module_at(net, unit)
        is_conv = layer.kernel.ndim == 4
        name, kind = next(torch_modules, (None, None))
        if kind != ("conv" if is_conv else "linear"):
            return mapping  # the rest is reported as missing / unexpected keys
        base = ("net", *unit)
        if is_conv:
            mapping[(*base, "kernel")] = (f"{name}.weight", conv_kernel)
            channels = layer.out_channels
        else:
            convert = flattened_map_kernel(channels) if channels is not None else linear_kernel
            mapping[(*base, "kernel")] = (f"{name}.weight", convert)
            channels = None
        if getattr(layer, "bias", None) is not None:
            mapping[(*base, "bias")] = (f"{name}.bias", copy)
        if getattr(layer, "bn", None) is not None:
            bn, kind = next(torch_modules, (None, None))
            if kind != "bn":
                return mapping
            for leaf, torch_leaf in BN_NAMES.items():
                mapping[(*base, "bn", leaf)] = (f"{bn}.{torch_leaf}", copy)
    return mapping


def mapping_for(arch: str) -> Callable:
    return resnet_mapping if arch.startswith("resnet") else sequential_mapping


# ----------------------------------------------------------------------------- guessing the architecture


def guess_architecture(tensors: dict[str, np.ndarray]) -> str | None:
    """The cnncli architecture a state dict's keys describe, if one fits exactly."""

    keys = set(tensors)
    if "layer1.0.conv1.weight" in keys:
        stages = []
        for stage in range(1, 5):
            indices = {int(m.group(1)) for k in keys if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
            stages.append(max(indices, default=-1) + 1)
        bottleneck = "layer1.0.conv3.weight" in keys
        for depth, (block, blocks) in IMAGENET.items():
            if tuple(stages) == blocks and (block is Bottleneck) == bottleneck:
                return f"resnet{depth}"
        return None
    modules = _torch_modules(tensors)
    convs = sum(kind == "conv" for _, kind in modules)
    has_bn = any(kind == "bn" for _, kind in modules)
    for name, config in CONFIGS.items():
        if sum(config) == convs:
            return f"{name}_bn" if has_bn else name
    return "alexnet" if convs == 5 and not has_bn else None


# ----------------------------------------------------------------------------- import


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > SHOWN else "")


def num_classes_of(arch: str, tensors: dict[str, np.ndarray], default: int = 1000) -> int:
    """The class count the file's classifier was trained for."""
    if arch.startswith("resnet"):
        head = tensors.get("fc.weight")
    else:
        modules = [name for name, kind in _torch_modules(tensors) if kind == "linear"]
        head = tensors.get(f"{modules[-1]}.weight") if modules else None
    return int(head.shape[0]) if head is not None else default


@dataclass
class Imported:
    """A cnncli model (a Classifier with the weights) built from a state dict."""

    arch: str
    model: Any
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))


def import_state_dict(arch: str, tensors: dict[str, np.ndarray], *, source: str, input_shape=DEFAULT_INPUT,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Imported:
    """Build cnncli's `arch` from a torch state dict.

    Raises:
        UserError: an unknown architecture, keys the model needs that the file lacks, keys it does not
            use, or shapes that differ, all listed (with the architecture the file looks like).
    """

    archs = architectures()
    if arch not in archs:
        raise UserError(f"import-weights maps {', '.join(archs)}; not '{arch}'{suggest(arch, archs)}")
    if len(mean) != input_shape[2] or len(std) != input_shape[2]:
        raise UserError(f"--mean and --std need {input_shape[2]} values (one per input channel)")
    if input_shape[2] not in (1, 3):
        raise UserError(f"--input must have 1 or 3 channels, got {input_shape[2]}")
    num_classes = num_classes_of(arch, tensors)
    model_name, args = ARCHS[arch]
    cfg = ModelConfig(name=model_name, args=args)
    def build():
        return build_model(cfg, input_shape=input_shape, num_classes=num_classes, mean=mean, std=std)

    # shapes only until the file is known to fit: a wrong file costs no VGG-sized random initialization
    abstract = nnx.eval_shape(build)
    _, params, stats, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
    targets = {**flatten_dict(nnx.to_pure_dict(params)), **flatten_dict(nnx.to_pure_dict(stats))}
    mapping = mapping_for(arch)(targets, tensors, abstract)

    guess = guess_architecture(tensors)
    hint = f"; the file looks like {guess}: `cnncli import-weights {guess} {source} ...`" if guess not in (None, arch) \
        else ""
    needed = {key for key, _ in mapping.values()}
    unmapped = [".".join(map(str, p[1:])) for p in targets if p not in mapping]
    missing = sorted(needed - set(tensors))
    unexpected = sorted(set(tensors) - needed)
    if missing or unexpected or unmapped:
        parts = [f"{len(missing)} keys {arch} needs are missing ({_listing(missing)})" if missing else "",
                 f"{len(unexpected)} keys are not used ({_listing(unexpected)})" if unexpected else "",
                 f"no weights for {_listing(unmapped)}" if unmapped else ""]
        raise UserError(f"{source} does not hold cnncli's {arch}: {'; '.join(p for p in parts if p)}{hint}")
    values, wrong = {}, []
    for path, (key, convert) in mapping.items():
        value = convert(tensors[key])
        if value.shape != tuple(targets[path].shape):
            wrong.append(f"{key} {tuple(tensors[key].shape)} (cnncli {'.'.join(map(str, path[1:]))} "
                         f"{tuple(targets[path].shape)})")
        values[path] = jnp.asarray(value)
    if wrong:
        raise UserError(f"{source} does not hold cnncli's {arch} at input {'x'.join(map(str, input_shape))}: "
                        f"{len(wrong)} shapes differ: {_listing(wrong)}{hint}")
    graphdef, params, stats, rest = nnx.split(build(), nnx.Param, nnx.BatchStat, ...)
    for state in (params, stats):
        flat = flatten_dict(nnx.to_pure_dict(state))
        nnx.replace_by_pure_dict(state, unflatten_dict({p: values[p] for p in flat}))
    model = nnx.merge(graphdef, params, stats, rest)
    model.eval()  # inference: batch norm on the imported running statistics
    return Imported(arch, model, tuple(input_shape), num_classes, tuple(mean), tuple(std))


def write_run(run, imported: Imported, *, source: Path, class_names: list[str], data_source: str,
              overwrite: bool = False) -> None:
    """Write the run directory other commands read: recipe.yaml, data.json and one checkpoint (step 0)."""
    h, w, c = imported.input_shape
    recipe = Recipe(name=run.path.name, description=f"{imported.arch} imported from {Path(source).name}",
                    model=ModelConfig(name=ARCHS[imported.arch][0], args=ARCHS[imported.arch][1]),
                    data=DataConfig(source=data_source, image_size=(h, w), channels=c))
    if overwrite and run.has_run():
        run.clear()  # the run's own files only
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_text(run.recipe, recipe.to_yaml())
    run.write_json(run.data, {"source": data_source, "class_names": class_names, "image_shape": [h, w, c],
                              "mean": list(imported.mean), "std": list(imported.std),
                              "imported_from": str(Path(source).resolve())})
    _, params, rest = nnx.split(imported.model, nnx.Param, ...)
    state = TrainState(params, rest, (), jnp.zeros((), jnp.int32))
    meta = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": {"val_top1": -1.0, "epoch": 0}}
    checkpoint.save(run.checkpoints, state=state, totals=init_totals(), meta=meta, best=True)
