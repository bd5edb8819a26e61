"""The Layer base class, window geometry and the recording hook of the per-layer analysis."""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx

from cnncli.errors import UserError

# Convolutions: He initialization over fan-out as torchvision's VGG/ResNet; dense layers: PyTorch's
# default uniform(+-1/sqrt(fan_in)), i.e. variance 1/(3 fan_in).
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


DENSE_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise UserError(f"expected one number or a pair [height, width], got {list(v)}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def padding_pair(p) -> tuple:
    if isinstance(p, str):
        p = p.lower()
        if p not in ("same", "valid"):
            raise UserError(f"padding must be 'same', 'valid' or a number of pixels, got '{p}'")
        return p, p
    return pair(p)


@dataclass(frozen=True)
class Window:
    """The spatial footprint of a layer along one axis: what the receptive-field recursion needs.

    kernel is the effective (dilated) extent, pad the padding before the first pixel.
    """

    kernel: int
    stride: int
    pad: int


def resolve_axis(size: int, kernel: int, stride: int, dilation: int, padding, *, ceil: bool = False,
                 exact: bool = False) -> tuple[int, int, int]:
    """Output size and (low, high) padding of a window sliding along one axis.

    Follows out = (W - F + 2P) / S + 1 with the dilated extent F = (K - 1) * D + 1. A window that
    does not fit in the padded input is an error. By default the division floors (PyTorch,
    trailing pixels are dropped); `exact` makes a non-integer result an error, as the lectures
    demand; `ceil` rounds up as PyTorch's ceil_mode (the last window starts inside the input).
    'same' gives ceil(W / S) outputs, padding split as TensorFlow and XLA do.
    """
    extent = (kernel - 1) * dilation + 1
    if stride < 1 or kernel < 1 or dilation < 1:
        raise UserError(f"kernel, stride and dilation must be at least 1 (got {kernel}, {stride}, {dilation})")
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + extent - size, 0)
        return out, total // 2, total - total // 2
    pad = 0 if padding == "valid" else int(padding)
    span = size + 2 * pad - extent
    if span < 0:
        raise UserError(f"a {extent}-pixel window does not fit in {size} pixels padded by {pad} "
                        f"(W - F + 2P = {size} - {extent} + 2*{pad} = {span} < 0)")
    if exact and span % stride:
        raise UserError(f"(W - F + 2P)/S + 1 = ({size} - {extent} + 2*{pad})/{stride} + 1 = "
                        f"{span / stride + 1:.2f} is not an integer: the window does not tile the input; "
                        f"change the padding or the stride")
    if ceil:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + pad:  # PyTorch: the last window must start inside the input or left pad
            out -= 1
        return out, pad, max((out - 1) * stride + extent - size - pad, pad)
    return span // stride + 1, pad, pad


_RECORDER: contextvars.ContextVar[Any] = contextvars.ContextVar("cnncli_layer_recorder", default=None)


def recording(recorder) -> contextvars.Token:
    """Make `recorder` receive `record(layer, inputs, output)` from every Layer call (see analysis).

    `record` returns None, or an array of the output's shape that the layer returns instead.
    """
    return _RECORDER.set(recorder)


def stop_recording(token: contextvars.Token) -> None:
    _RECORDER.reset(token)


def is_recording() -> bool:
    """True while the analysis traces the network (optional branches then show in its table)."""
    return _RECORDER.get() is not None


class Layer(nnx.Module):
    """A block that is one row of the per-layer analysis.

    Subclasses implement `forward`, `output_shape` (batched NHWC or (N, F) shapes), and where it
    applies `macs` and `windows` (None: the layer does not move or widen the receptive field).
    """

    kind = "layer"

    def __call__(self, *xs: jax.Array) -> jax.Array:
        y = self.forward(*xs)
        recorder = _RECORDER.get()
        if recorder is not None:
            # A recorder may return a replacement output (Grad-CAM adds a zero tap to take the
            # gradient with respect to this layer's output); None keeps the output as it is.
            replaced = recorder.record(self, xs, y)
            if replaced is not None:
                y = replaced
        return y

    def forward(self, *xs: jax.Array) -> jax.Array:
        raise NotImplementedError

    def output_shape(self, *shapes: tuple[int, ...]) -> tuple[int, ...]:
        return shapes[0]

    def macs(self, in_shapes: Sequence[tuple[int, ...]], out_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates per image."""
        return 0

    def windows(self, in_shape: tuple[int, ...]) -> tuple[Window, Window] | None:
        return None

    def describe(self) -> str:
        return self.kind


def describe_suffix(norm: str | None, act: str | None, dropout: float = 0.0) -> str:
    parts = []
    if dropout:
        parts.append(f"dropout {dropout:g} in")
    if norm and norm != "none":
        parts.append(norm if norm != "batch" else "bn")
    if act and act != "identity":
        parts.append(act)
    return (" +" + "+".join(parts)) if parts else ""


def spatial_shape(shape: tuple[int, ...], what: str) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise UserError(f"{what} needs an image-shaped input (H x W x C), got a flat vector of {shape[-1]}")
    return shape


def global_windows(in_shape):
    """A layer that sees the whole map (flatten, global pooling, FC on an image)."""
    if len(in_shape) != 4:
        return None
    return Window(in_shape[1], in_shape[1], 0), Window(in_shape[2], in_shape[2], 0)


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape[1:]))

