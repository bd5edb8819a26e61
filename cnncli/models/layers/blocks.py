"""Parameter-free blocks and containers: dropout, flatten, concatenation, residual addition, Stack."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cnncli.errors import UserError
from cnncli.models.layers.activations import make_activation
from cnncli.models.layers.conv import Conv
from cnncli.models.layers.core import Layer, Window, describe_suffix, fmt_shape, global_windows, is_recording
from cnncli.models.layers.pools import Pool


class Dropout(Layer):
    """Standalone dropout: active in `model.train()` mode, the identity in `model.eval()` mode."""

    kind = "dropout"

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        self.rate = rate
        self.dropout = nnx.Dropout(rate, rngs=rngs)

    def forward(self, x):
        return self.dropout(x)

    def describe(self):
        return f"dropout {self.rate:g}"


class Flatten(Layer):
    kind = "flatten"

    def output_shape(self, shape):
        return (shape[0], math.prod(shape[1:]))

    def forward(self, x):
        return x.reshape(x.shape[0], -1)

    def windows(self, in_shape):
        return global_windows(in_shape)


class Concat(Layer):
    """Channel concatenation of parallel branches (Inception)."""

    kind = "concat"

    def output_shape(self, *shapes):
        if len({s[:-1] for s in shapes}) != 1:
            raise UserError(f"branches to concatenate have different sizes: {', '.join(map(str, shapes))}")
        return (*shapes[0][:-1], sum(s[-1] for s in shapes))

    def forward(self, *xs):
        return jnp.concatenate(xs, axis=-1)


class Add(Layer):
    """Residual addition followed by an optional activation (ResNet: relu(F(x) + shortcut))."""

    kind = "add"

    def __init__(self, act: str | None = "relu", channels: int = 0):
        self.act_name = act
        self.act = make_activation(act, channels) if act != "maxout" else None
        if act == "maxout":
            raise UserError("maxout cannot follow a residual addition (it would halve the channels)")

    def output_shape(self, *shapes):
        if len(set(shapes)) != 1:
            raise UserError(f"residual branches have different shapes: {', '.join(map(str, shapes))}")
        return shapes[0]

    def forward(self, *xs):
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return y if self.act is None else self.act(y)

    def describe(self):
        return f"add{describe_suffix(None, self.act_name)}"


class ShortcutA(Layer):
    """The ResNet paper's parameter-free shortcut (option A): subsample by the stride and pad the
    new channels with zeros."""

    kind = "shortcut"

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def output_shape(self, shape):
        n, h, w, _ = shape
        return (n, -(-h // self.stride), -(-w // self.stride), self.out_channels)

    def forward(self, x):
        x = x[:, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))

    def windows(self, in_shape):
        return Window(1, self.stride, 0), Window(1, self.stride, 0)

    def describe(self):
        return f"shortcut A /{self.stride}, {self.out_channels}"


# Activations f with max(f(a), f(b)) == f(max(a, b)) exactly, in floating point too.
ORDER_PRESERVING = ("relu", "leaky_relu")


def activates_after_pool(layer: nnx.Module, following: nnx.Module) -> bool:
    """Whether a convolution's activation may run after the max-pool that follows it.

    The values are the same (the activation preserves order, so it commutes with the maximum), and
    the activation and its gradient then cover a quarter of the pixels; with the max-pool's own
    gradient (`cnncli.ops.pool`) the convolution before it is stored once for the pool's gradient
    instead of recomputed for the activation's. Not while a recorder watches, so that every layer
    reports its own output.
    """
    return (isinstance(layer, Conv) and isinstance(following, Pool) and following.pool_kind == "max"
            and layer.act_name in ORDER_PRESERVING and layer.post_norm is None and not is_recording())


class Stack(nnx.Module):
    """Named layers applied in order; the names become the layer names of the analysis."""

    def __init__(self, layers: Sequence[tuple[str, nnx.Module]]):
        names = []
        for name, layer in layers:
            if not name.isidentifier() or hasattr(self, name):
                raise ValueError(f"bad or duplicate layer name '{name}'")
            setattr(self, name, layer)
            names.append(name)
        self.order = tuple(names)

    def __call__(self, x: jax.Array) -> jax.Array:
        layers = [getattr(self, name) for name in self.order]
        i = 0
        while i < len(layers):
            if i + 1 < len(layers) and activates_after_pool(layers[i], layers[i + 1]):
                conv, pool = layers[i], layers[i + 1]
                x = conv.act(pool(conv.pre_activation(x)))
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x

    def output_shape(self, shape):
        for name in self.order:
            shape = getattr(self, name).output_shape(shape)
        return shape


class StackBuilder:
    """Builds a Stack layer by layer, tracking the shape so each layer is sized from the one before.

    A layer that cannot take the current shape raises a UserError naming it and the sizes.
    """

    def __init__(self, input_shape: tuple[int, int, int], *, context: str = "layer"):
        self.shape: tuple[int, ...] = (1, *input_shape)
        self.items: list[tuple[str, nnx.Module]] = []
        self.context = context

    @property
    def channels(self) -> int:
        return self.shape[-1]

    @property
    def features(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def spatial(self) -> tuple[int, int] | None:
        return tuple(self.shape[1:3]) if len(self.shape) == 4 else None

    def add(self, name: str, layer: nnx.Module, *, label: str | None = None) -> nnx.Module:
        """Append `layer` as `name`; errors call it `label` (default: '<context> <name>')."""
        label = label or f"{self.context} {name}"
        try:
            out = layer.output_shape(self.shape)
        except UserError as e:
            raise UserError(f"{label} (input {fmt_shape(self.shape)}): {e}") from None
        if len(out) == 4 and (out[1] < 1 or out[2] < 1):
            raise UserError(f"{label}: the input {fmt_shape(self.shape)} shrinks to "
                            f"{fmt_shape(out)}; use a larger input or fewer downsampling layers")
        self.shape = out
        self.items.append((name, layer))
        return layer

    def build(self) -> Stack:
        return Stack(self.items)

