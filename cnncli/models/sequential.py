"""`sequential`: a network written in the recipe as a list of layers.

    model:
      name: sequential
      layers:
        - {repeat: 2, layers: [{conv: 32, kernel: 3, act: relu}]}    # (CONV-RELU)*2
        - {pool: max}                                                # POOL
        - {conv: 64, kernel: 3, stride: 1, padding: 1, norm: batch, act: relu}
        - {pool: max, window: 2}
        - {fc: 128, act: relu, dropout: 0.5}                         # FC-RELU (an image input is flattened)
        - {fc: classes}                                              # the class scores (softmax is in the loss)

Each item has one kind key: `conv` (output channels; kernel, stride, padding same/valid/N,
dilation, groups, depthwise, separable, norm, act, bias), `local` (a locally connected layer: a
convolution's windows with a different filter at every position; output channels; kernel, stride,
padding, act, bias), `pool` (max/avg/l2/conv/global; window,
stride, padding, ceil), `act` (any activation), `norm` (batch/lrn/lcn), `dropout` (rate), `fc`
(width or `classes`; act, norm, dropout), `flatten`, `softmax` (accepted last and ignored: the loss
applies it), `repeat` (N times its own `layers`). Strings are a compact form of the same:
`conv32k3s1p1`, `conv64k5`, `local16k5`, `maxpool`, `maxpool3s2`, `avgpool`, `l2pool`, `gap`, `relu`, `bn`, `lrn`,
`lcn`, `dropout0.5`, `fc128`, `fc`, `flatten`; one string may chain them with '-':
`"conv32k3-relu-maxpool-fc10"`.

Convolutions and pools follow the lectures' rule (W - F + 2P)/S + 1 strictly: a window that does not
tile its input is an error naming the layer (`fit: floor` drops the trailing pixels instead, as
PyTorch does). Any impossible shape is reported as `layers[i] (kind): ...` with the sizes.
"""

import re
from typing import Any

from cnncli.errors import UserError, brief, suggest
from cnncli.models.layers import (
    ACTIVATIONS,
    Act,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalPool,
    LocallyConnected,
    Norm,
    Pool,
    SeparableConv,
    StackBuilder,
)
from cnncli.models.registry import DEFAULT_INPUTS, MNIST_INPUT, MODELS

KINDS = ("conv", "local", "pool", "fc", "repeat", "flatten", "softmax", "dropout", "act", "norm")
PRIMARY = KINDS[:7]  # with one of these, `act`, `norm` and `dropout` are its options
OPTIONS = {
    "conv": {"kernel", "stride", "padding", "dilation", "groups", "depthwise", "separable", "norm", "act", "bias",
             "fit"},
    "local": {"kernel", "stride", "padding", "act", "bias", "fit"},
    "pool": {"window", "stride", "padding", "ceil", "fit"},
    "fc": {"act", "norm", "dropout", "bias"},
    "repeat": {"layers"},
    "act": set(), "norm": set(), "dropout": set(), "flatten": set(), "softmax": set(),
}
NORM_TOKENS = {"bn": "batch", "batchnorm": "batch", "lrn": "lrn", "lcn": "lcn"}
CONV_TOKEN = re.compile(r"^(sep)?(conv|local)(\d+)(?:k(\d+))?(?:s(\d+))?(?:p(\d+))?(?:d(\d+))?$")
POOL_TOKEN = re.compile(r"^(max|avg|l2)pool(?:(\d+))?(?:s(\d+))?$")
NUMBER_TOKEN = re.compile(r"^(fc|dropout)([\d.]+)?$")
FITS = ("exact", "floor")
MAX_LAYERS = 10_000  # far beyond any real network; a larger list is a typo or a hostile recipe


def parse_token(token: str, where: str) -> dict[str, Any]:
    """One compact layer string -> the layer's mapping form."""
    t = token.strip().lower()
    if m := CONV_TOKEN.match(t):
        spec: dict[str, Any] = {m[2]: int(m[3])}
        for key, value in zip(("kernel", "stride", "padding", "dilation"), m.groups()[3:], strict=True):
            if value is not None:
                spec[key] = int(value)
        if m[1]:
            if m[2] == "local":
                raise UserError(f"{where}: '{token}': a locally connected layer has no separable form")
            spec["separable"] = True
        if m[2] == "local" and "dilation" in spec:
            raise UserError(f"{where}: '{token}': a locally connected layer has no dilation")
        return spec
    if m := POOL_TOKEN.match(t):
        spec = {"pool": m[1]}
        if m[2]:
            spec["window"] = int(m[2])
        if m[3]:
            spec["stride"] = int(m[3])
        return spec
    if t == "gap":
        return {"pool": "global"}
    if t in ("flatten", "softmax"):
        return {t: True}
    if t in NORM_TOKENS:
        return {"norm": NORM_TOKENS[t]}
    if t in ACTIVATIONS:
        return {"act": t}
    if m := NUMBER_TOKEN.match(t):
        if m[1] == "fc":
            return {"fc": int(m[2]) if m[2] else "classes"}
        return {"dropout": float(m[2] or 0.5)}
    known = ["conv32k3s1p1", "local16k5", "maxpool", "avgpool", "gap", "bn", "dropout0.5", "fc10", "flatten",
             *ACTIVATIONS.names()]
    raise UserError(f"{where}: cannot read layer '{token}'{suggest(t, known)}; e.g. {', '.join(known[:8])}")


def expand(layers: list[Any], where: str = "layers") -> list[tuple[str, dict[str, Any]]]:
    """Flatten the recipe's list (strings, chains, repeats) into (position label, mapping) pairs."""
    if not isinstance(layers, list) or not layers:
        raise UserError(f"model.{where} must be a non-empty list of layers, e.g. [conv32k3, relu, maxpool, fc10]")
    out = []
    for i, item in enumerate(layers):
        label = f"{where}[{i}]"
        if isinstance(item, str):
            parts = [p for p in item.split("-") if p.strip()]
            for j, part in enumerate(parts):
                out.append((label if len(parts) == 1 else f"{label}.{j}", parse_token(part, label)))
            continue
        if not isinstance(item, dict):
            raise UserError(f"{label}: a layer is a mapping like {{conv: 32, kernel: 3}} or a string like "
                            f"'conv32k3', got {brief(item)}")
        kinds = [k for k in item if k in PRIMARY] or [k for k in item if k in KINDS]
        if len(kinds) != 1:
            unknown = [k for k in item if k not in KINDS and not any(k in o for o in OPTIONS.values())]
            hint = suggest(unknown[0], KINDS) if unknown else ""
            raise UserError(f"{label}: a layer needs exactly one of {', '.join(KINDS)}; got keys "
                            f"{', '.join(map(str, item)) or 'none'}{hint}")
        kind = kinds[0]
        extra = [k for k in item if k != kind and k not in OPTIONS[kind]]
        if extra:
            raise UserError(f"{label}: {kind} has no option '{extra[0]}'{suggest(extra[0], OPTIONS[kind])}; "
                            f"its options: {', '.join(sorted(OPTIONS[kind])) or 'none'}")
        if kind == "repeat":
            count = item["repeat"]
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise UserError(f"{label}: repeat needs a positive count, got {brief(count)}")
            inner = expand(item.get("layers"), f"{where}[{i}].layers")
            _check_size(len(out) + count * len(inner), label)  # before expanding: a count can be 10**9
            out += [(f"{lab}#{r + 1}", spec) for r in range(count) for lab, spec in inner]
            continue
        out.append((label, item))
    _check_size(len(out), where)
    return out


def _check_size(n: int, label: str) -> None:
    if n > MAX_LAYERS:
        raise UserError(f"{label}: the layer list expands to {n:,} layers, more than the {MAX_LAYERS:,} a "
                        "sequential model may have (check the repeat counts)")


def _fit(spec: dict, label: str) -> bool:
    fit = spec.get("fit", "exact")
    if fit not in FITS:
        raise UserError(f"{label}: fit must be 'exact' or 'floor', got '{fit}'")
    return fit == "exact"


def _build_layer(kind: str, spec: dict, b: StackBuilder, num_classes: int, rngs):
    value = spec[kind]
    if kind == "conv":
        common = dict(stride=spec.get("stride", 1), padding=spec.get("padding", "same"),
                      dilation=spec.get("dilation", 1), bias=spec.get("bias"), norm=spec.get("norm"),
                      act=spec.get("act"), exact=_fit(spec, "conv"), rngs=rngs)
        kernel = spec.get("kernel", 3)
        if spec.get("separable"):
            return "sepconv", SeparableConv(b.channels, int(value), kernel, **common)
        groups = b.channels if spec.get("depthwise") else int(spec.get("groups", 1))
        return "conv", Conv(b.channels, int(value), kernel, groups=groups, **common)
    if kind == "local":
        if b.spatial is None:
            raise UserError("a locally connected layer needs an image-shaped input (H x W x C), got a flat vector")
        return "local", LocallyConnected(b.channels, int(value), spec.get("kernel", 3), input_hw=b.spatial,
                                         stride=spec.get("stride", 1), padding=spec.get("padding", "same"),
                                         bias=spec.get("bias", True), act=spec.get("act"),
                                         exact=_fit(spec, "local"), rngs=rngs)
    if kind == "pool":
        if value == "global":
            return "gap", GlobalPool()
        return "pool", Pool(value, spec.get("window", 2), spec.get("stride"), padding=spec.get("padding", 0),
                            ceil=bool(spec.get("ceil", False)), exact=_fit(spec, "pool"), channels=b.channels,
                            rngs=rngs)
    if kind == "act":
        return "act", Act(value, b.channels)
    if kind == "norm":
        return "norm", Norm(value, b.channels, rngs=rngs)
    if kind == "dropout":
        return "dropout", Dropout(float(value), rngs=rngs)
    if kind == "flatten":
        return "flatten", Flatten()
    if kind == "fc":
        width = num_classes if value == "classes" else value
        if not isinstance(width, int) or width < 1:
            raise UserError(f"fc needs a positive width or 'classes', got {brief(value)}")
        return "fc", Dense(b.features, width, act=spec.get("act"), norm=spec.get("norm"),
                           dropout=float(spec.get("dropout", 0.0)), bias=spec.get("bias", True), rngs=rngs)
    raise AssertionError(kind)


@MODELS.register("sequential", help="layers written in the recipe (model.layers), e.g. [conv32k3, relu, maxpool, "
                                    "fc10]")
def sequential(*, input_shape, num_classes, rngs, layers=None):
    if layers is None:
        raise UserError("model 'sequential' needs model.layers, e.g. layers: [conv32k3, relu, maxpool, fc10]")
    items = expand(list(layers))
    b = StackBuilder(input_shape)
    for index, (label, spec) in enumerate(items):
        kind = next((k for k in spec if k in PRIMARY), None) or next(k for k in spec if k in KINDS)
        if kind == "softmax":
            if index != len(items) - 1:
                raise UserError(f"{label}: softmax can only be the last layer (the loss applies it)")
            continue
        try:
            short, layer = _build_layer(kind, spec, b, num_classes, rngs)
        except UserError as e:
            raise UserError(f"{label} ({kind}): {e}") from None
        b.add(f"{short}{index}", layer, label=f"{label} ({short}{index})")
    if len(b.shape) != 2 or b.shape[1] != num_classes:
        got = "x".join(map(str, b.shape[1:]))
        raise UserError(f"model.layers end with an output of {got}, but the data has {num_classes} classes; "
                        f"end with {{fc: classes}}")
    return b.build()


DEFAULT_INPUTS["sequential"] = MNIST_INPUT
