"""Per-layer analysis of a network: shapes, parameters, MACs, activation memory, receptive fields.

Every row comes from the real forward pass: the network runs once under `jax.eval_shape` (nothing
is allocated or compiled) while each `Layer` (see `cnncli.models.layers`) reports its inputs and
output to a recorder. Branches (Inception) and residual additions are followed through the arrays
themselves, so the receptive field of a layer is that of the largest path into it.

Conventions:
- MACs count the multiply-accumulates of convolutions and fully connected layers (the learned
  weights); FLOPs = 2 * MACs. Pooling, normalization and activations are not counted, as in the
  lectures and torchvision's published GFLOPS.
- Activation memory is the output of every row (plus the input image), one number per table row,
  as the lectures tabulate VGG-16. Units that fuse conv + batch norm + activation count one output.
- Receptive field (per axis) r_out = r_in + (F - 1) * j_in and effective stride (jump)
  j_out = j_in * S, with F the dilated window; `rf_start` is the centre, in input pixels, of the
  receptive field of output position 0 (position i is centred at rf_start + i * jump), which is
  what cropping the image patch seen by a unit needs.
- Layer names are module paths inside the network ("conv1_1", "layer1.0.conv1"); a `Classifier`'s
  own "net." prefix is dropped, so names are the same for a bare network and a built model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from cnncli.errors import UserError, suggest
from cnncli.models.layers import Classifier, recording, stop_recording

INPUT = "input"


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one array along (height, width)."""

    rf: tuple[int, int] = (1, 1)
    jump: tuple[int, int] = (1, 1)
    start: tuple[float, float] = (0.0, 0.0)

    def through(self, windows) -> ReceptiveField:
        if windows is None:
            return self
        rf, jump, start = [], [], []
        for r, j, s, w in zip(self.rf, self.jump, self.start, windows, strict=True):
            rf.append(r + (w.kernel - 1) * j)
            start.append(s + ((w.kernel - 1) / 2 - w.pad) * j)
            jump.append(j * w.stride)
        return ReceptiveField(tuple(rf), tuple(jump), tuple(start))


@dataclass
class LayerRow:
    """One row of the analysis (shapes exclude the batch axis)."""

    name: str
    type: str
    description: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    activation_elements: int
    activation_bytes: int
    receptive_field: tuple[int, int]
    jump: tuple[int, int]
    rf_start: tuple[float, float]


@dataclass
class Summary:
    """The rows and totals of one network at one input shape."""

    layers: list[LayerRow]
    input_shape: tuple[int, int, int]
    batch: int
    total_params: int
    trainable_params: int

    @property
    def total_macs(self) -> int:
        return sum(r.macs for r in self.layers)

    @property
    def total_flops(self) -> int:
        return 2 * self.total_macs

    @property
    def activation_elements(self) -> int:
        return sum(r.activation_elements for r in self.layers)

    @property
    def activation_bytes(self) -> int:
        return sum(r.activation_bytes for r in self.layers)

    def row(self, name: str) -> LayerRow:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "input_shape": list(self.input_shape),
            "batch": self.batch,
            "layers": [asdict(r) for r in self.layers],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "total_macs": self.total_macs,
            "total_flops": self.total_flops,
            "activation_elements": self.activation_elements,
            "activation_bytes": self.activation_bytes,
            "activation_elements_batch": self.activation_elements * self.batch,
            "activation_bytes_batch": self.activation_bytes * self.batch,
        }


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def layer_paths(root: nnx.Module) -> dict[int, str]:
    """id(module) -> dotted path, relative to the network inside a Classifier."""
    names = {}
    for path, module in nnx.iter_modules(root):
        parts = [str(p) for p in path]
        if isinstance(root, Classifier):
            if not parts or parts[0] != "net":
                continue
            parts = parts[1:]
        names[id(module)] = ".".join(parts)
    return names


class _Recorder:
    """Collects rows (and, when asked, the outputs of named layers) as layers run."""

    def __init__(self, names: dict[int, str], x: jax.Array, capture: Sequence[str] = (), *, light: bool = False):
        self.names = names
        self.rows: list[LayerRow] = []
        self.geometry: dict[int, ReceptiveField] = {id(x): ReceptiveField()}
        self.last = ReceptiveField()
        self.alive = [x]  # keeps recorded arrays alive so their ids stay unique during the trace
        self.capture = set(capture)
        self.captured: dict[str, jax.Array] = {}
        self.light = light  # names and geometry only (no parameter counting)

    def record(self, layer, xs, y) -> None:
        name = self.names.get(id(layer), type(layer).__name__)
        # Arrays that did not come out of a Layer (e.g. after a reshape in a forward method) continue
        # the most recent layer's geometry.
        geoms = [self.geometry.get(id(x), self.last) for x in xs]
        widest = max(geoms, key=lambda g: g.rf)
        geom = widest.through(layer.windows(tuple(xs[0].shape)))
        self.geometry[id(y)] = self.last = geom
        self.alive.append(y)
        if name in self.capture:
            self.captured[name] = y
        if self.light:
            self.rows.append(LayerRow(name, layer.kind, "", (), 0, 0, 0, 0, geom.rf, geom.jump, geom.start))
            return
        in_shapes = [tuple(x.shape) for x in xs]
        elements = math.prod(y.shape[1:])
        self.rows.append(LayerRow(
            name=name, type=layer.kind, description=layer.describe(), output_shape=tuple(y.shape[1:]),
            params=_count(nnx.state(layer, nnx.Param)), macs=int(layer.macs(in_shapes, tuple(y.shape))),
            activation_elements=elements, activation_bytes=elements * jnp.dtype(y.dtype).itemsize,
            receptive_field=geom.rf, jump=geom.jump, rf_start=geom.start))


def input_shape_of(model: nnx.Module) -> tuple[int, int, int]:
    """The (H, W, C) a model was built for (set by `cnncli.models.build_network`)."""
    net = model.net if isinstance(model, Classifier) else model
    shape = getattr(net, "input_shape", None)
    if shape is None:
        raise ValueError("the model does not record its input shape; pass input_shape")
    return tuple(shape)


def _trace(model: nnx.Module, input_shape, batch: int, *, light: bool = False) -> _Recorder:
    graphdef, state = nnx.split(model)
    box = {}

    def run(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()  # the analysis describes inference: dropout off, batch norm on running statistics
        rec = box["rec"] = _Recorder(layer_paths(m), x, light=light)
        token = recording(rec)
        try:
            m(x)
        finally:
            stop_recording(token)
        return 0

    jax.eval_shape(run, state, jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32))
    return box["rec"]


def summarize(model: nnx.Module, input_shape: tuple[int, int, int] | None = None, *, batch: int = 1) -> Summary:
    """The per-layer table of `model` (a network or a Classifier) for images of `input_shape`.

    Works on abstract models (`nnx.eval_shape`), so ImageNet-sized networks cost no memory.
    """
    input_shape = tuple(input_shape or input_shape_of(model))
    rec = _trace(model, input_shape, 1)
    elements = math.prod(input_shape)
    head = LayerRow(INPUT, INPUT, "image", input_shape, 0, 0, elements, elements * 4, (1, 1), (1, 1), (0.0, 0.0))
    net = model.net if isinstance(model, Classifier) else model
    total = _count(nnx.state(net, nnx.Param))
    return Summary([head, *rec.rows], input_shape, batch, total_params=total, trainable_params=total)


def layer_names(model: nnx.Module, input_shape: tuple[int, int, int] | None = None) -> list[str]:
    """The names `activations` accepts, in forward order ("input" first)."""
    input_shape = tuple(input_shape or input_shape_of(model))
    return [INPUT, *(r.name for r in _trace(model, input_shape, 1, light=True).rows)]


def activations(model: nnx.Module, x: jax.Array, names: Sequence[str]) -> dict[str, jax.Array]:
    """The outputs of the named layers for the batch `x`, in inference mode (one jitted pass).

    `x` is what `model` takes (pixels in [0, 1] for a Classifier); "input" returns `x` itself.
    """
    graphdef, state = nnx.split(model)
    return _activation_fn(graphdef, tuple(names))(state, x)


@functools.lru_cache(maxsize=32)
def _activation_fn(graphdef, names: tuple[str, ...]):
    wanted = tuple(n for n in names if n != INPUT)

    def run(state, x):
        m = nnx.merge(graphdef, state)
        m.eval()
        rec = _Recorder(layer_paths(m), x, wanted, light=True)
        token = recording(rec)
        try:
            m(x)
        finally:
            stop_recording(token)
        missing = [n for n in wanted if n not in rec.captured]
        if missing:
            known = [INPUT, *(r.name for r in rec.rows)]
            raise UserError(f"no layer named '{missing[0]}'{suggest(missing[0], known)}; "
                            f"layers: {', '.join(known)}")
        out = dict(rec.captured)
        if INPUT in names:
            out[INPUT] = x
        return out

    return jax.jit(run)
