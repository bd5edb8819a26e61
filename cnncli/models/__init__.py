"""Model registry and the builder that turns a recipe's `model` section into an nnx.Module.

Every registered builder has the signature
    builder(*, input_shape: (H, W, C), num_classes: int, rngs: nnx.Rngs, **options) -> nnx.Module
and returns a network mapping normalized float images (N, H, W, C) to logits (N, num_classes).
`build_model` wraps it in a `Classifier` whose first op is the mean/std normalization, so every
cnncli model takes pixels in [0, 1] (see docs/design.md).
"""

import inspect
from typing import Any

from cnncli.errors import UserError, suggest
from cnncli.models.registry import CIFAR_INPUT, DEFAULT_INPUTS, MODELS

# Modules of this package that are not model families (the families register their presets on import).
_NOT_FAMILIES = ("registry", "fitting")


def default_input(name: str) -> tuple[tuple[int, int, int], int]:
    """The (input shape, classes) a registered model is designed for (CIFAR-sized if it has no preference)."""
    _import_families()
    MODELS.get(name)
    return DEFAULT_INPUTS.get(name, CIFAR_INPUT)


def _import_families() -> None:
    """Import every family module in this folder (lazily: they import jax and flax)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg and module.name not in _NOT_FAMILIES:
            importlib.import_module(f"{__name__}.{module.name}")


def model_options(cfg: Any) -> dict[str, Any]:
    """The keyword options a ModelConfig passes to its builder (unset fields keep the model's default)."""
    options = {k: getattr(cfg, k) for k in ("dropout", "activation", "norm", "pool", "layers")
               if getattr(cfg, k) is not None}
    options.update(cfg.args)
    return options


def build_network(name: str, *, input_shape: tuple[int, int, int], num_classes: int, seed: int = 0,
                  **options: Any):
    """Build the registered network `name` (without normalization), checking its options."""
    from flax import nnx

    _import_families()
    builder = MODELS.get(name)
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes", "rngs")]
    for key in options:
        if key not in accepted:
            raise UserError(f"model '{name}' has no option '{key}'{suggest(key, accepted)}; "
                            f"its options: {', '.join(accepted) or 'none'}")
    net = builder(input_shape=tuple(input_shape), num_classes=num_classes, rngs=nnx.Rngs(seed), **options)
    net.input_shape = tuple(input_shape)  # lets the analysis trace a built model without being told its input
    return net


def build_model(cfg: Any, *, input_shape: tuple[int, int, int], num_classes: int, mean=None, std=None,
                seed: int = 0):
    """Build the recipe's model as a Classifier that takes pixels in [0, 1]."""
    from cnncli.models.layers import Classifier

    net = build_network(cfg.name, input_shape=input_shape, num_classes=num_classes, seed=seed,
                        **model_options(cfg))
    return Classifier(net, channels=input_shape[-1], mean=mean, std=std)


def registered_models() -> list[str]:
    _import_families()
    return MODELS.names()
