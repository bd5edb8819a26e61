"""Export a trained run for serving outside cnncli: ONNX (through jax2onnx) or StableHLO (`jax.export`).

The exported function is the run's classifier in inference mode: float32 images with pixels in [0, 1]
(NHWC, or NCHW with `layout="nchw"`) and a free batch dimension in, logits out. The normalization by
the training set's mean and std is inside, as it is inside every cnncli model. Convolutions are
traced as the plain `lax` op (`cnncli.ops.conv.plain_convolutions`), not the forms that are fastest
on this CPU. The ONNX model carries the class names, the input convention, the fitted temperature
(`cnncli eval --temperature`) and where it came from in its metadata; a StableHLO export writes the
same description beside it as JSON.

Nothing is written unchecked: the exported model runs on random images (onnxruntime, or the
deserialized `jax.export.Exported`) and its logits must equal cnncli's within `CHECK_TOLERANCE`.
When jax2onnx cannot convert a model, each of its layers is converted alone to name the one that fails.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnncli import __version__
from cnncli.errors import UserError
from cnncli.inspect.interpret import load_model
from cnncli.inspect.summary import layer_paths
from cnncli.models.layers import recording, stop_recording
from cnncli.ops.conv import plain_convolutions

FORMATS = ("onnx", "stablehlo")
LAYOUTS = ("nhwc", "nchw")
ONNX_OPSET = 23  # jax2onnx's default opset; onnxruntime 1.2x runs it
CHECK_IMAGES = 8  # random images the exported model is checked on before it is written
CHECK_TOLERANCE = 1e-4  # max |logit difference| allowed between the export and cnncli
FRAGILE_PASS = "remove_redundant_transpose_pairs"  # a jax2onnx optimization retried without (see _without_pass)
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")  # one StableHLO file serves on any of them
BATCH = "batch"  # the name of the free batch dimension
# jax2onnx 0.17's package metadata pins orbax-checkpoint below the version cnncli needs (it never imports
# orbax), so pip cannot install it beside cnncli as a dependency: it is installed on its own.
INSTALL_HINT = "pip install 'cnncli[export]' && pip install --no-deps jax2onnx==0.17.1"


@dataclass
class Export:
    """What was written: the file, its format, and how closely it reproduces cnncli's logits."""

    path: Path
    format: str
    input_shape: list[Any]  # with BATCH for the free dimension
    max_abs_diff: float
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "input_shape": self.input_shape,
                "max_abs_diff": self.max_abs_diff, "bytes": self.path.stat().st_size, "metadata": self.metadata}


def inference_fn(trained, layout: str = "nhwc") -> Callable[[jax.Array], jax.Array]:
    """The run's classifier as a pure function of pixels (NHWC, or NCHW) -> logits, weights as constants."""
    graphdef, state = nnx.split(load_model(trained))

    def fn(x):
        if layout == "nchw":
            x = jnp.transpose(x, (0, 2, 3, 1))
        with plain_convolutions():
            return nnx.merge(graphdef, state)(x)

    return fn


def metadata(trained, fmt: str, layout: str, opset: int | None = None) -> dict[str, str]:
    """The description an export carries: classes, the input convention, the temperature and the source."""
    h, w, c = trained.image_shape
    shape = f"{BATCH}x{c}x{h}x{w}" if layout == "nchw" else f"{BATCH}x{h}x{w}x{c}"
    meta = {"class_names": json.dumps(trained.class_names),
            "input": f"float32 {layout.upper()} images {shape}, pixels in [0, 1]; the normalization "
                     f"(mean {list(trained.data['mean'])}, std {list(trained.data['std'])}) is inside the model",
            "output": f"logits {BATCH}x{len(trained.class_names)}; probabilities = softmax(logits / temperature)",
            "temperature": f"{trained.temperature:.6g}", "model": trained.recipe.model.name,
            "source_run": str(trained.run.path), "checkpoint": trained.checkpoint.name, "weights": trained.weights,
            "producer": f"cnncli {__version__}", "format": fmt}
    if opset is not None:
        meta["opset"] = str(opset)
    return meta


def input_shape(trained, layout: str, batch: int | None) -> tuple:
    h, w, c = trained.image_shape
    b = BATCH if batch is None else batch
    return (b, c, h, w) if layout == "nchw" else (b, h, w, c)


def check_images(shape: tuple, seed: int = 0) -> np.ndarray:
    """`CHECK_IMAGES` random images of the export's input shape (the batch dimension filled in)."""
    concrete = tuple(CHECK_IMAGES if d == BATCH else d for d in shape)
    return np.random.default_rng(seed).random(concrete, dtype=np.float32)


def export(trained, out: Path, fmt: str, *, layout: str = "nhwc", batch: int | None = None) -> Export:
    """Export `trained` (a `cnncli.train.trained_run.TrainedRun`) to `out` in `fmt` (onnx or stablehlo)."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got '{layout}'")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return (export_onnx if fmt == "onnx" else export_stablehlo)(trained, out, layout=layout, batch=batch)


# ----------------------------------------------------------------------------- ONNX


def _jax2onnx():
    for logger in ("jax2onnx", "onnx_ir"):  # example plugins warn at import, serialization about unused values
        logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        import jax2onnx
        import onnxruntime
    except ImportError as e:
        raise UserError(f"--format onnx needs jax2onnx and onnxruntime ({e.name} is missing): {INSTALL_HINT}") from None
    onnxruntime.set_default_logger_severity(3)  # its shape-merge warnings are ours to report, as one line
    return jax2onnx


def to_onnx(fn: Callable, shape: tuple, name: str):
    """The ONNX ModelProto of fn(x) for inputs of `shape` (a str entry is a free dimension)."""
    return _jax2onnx().to_onnx(fn, [shape], model_name=name, opset=ONNX_OPSET, input_names=["pixels"],
                               output_names=["logits"])


def run_onnx(model, x: np.ndarray) -> np.ndarray:
    """The first output of an ONNX model (a ModelProto) on x, in onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def export_onnx(trained, out: Path, *, layout: str = "nhwc", batch: int | None = None) -> Export:
    import onnx

    fn = inference_fn(trained, layout)
    shape = input_shape(trained, layout, batch)
    x = check_images(shape)
    expected = np.asarray(jax.jit(fn)(x))
    skipped: list[str] = []
    model, problem = _convert(fn, shape, trained.recipe.model.name, x, expected)
    if problem is not None:
        with _without_pass(FRAGILE_PASS) as removed:
            if removed:
                model, problem = _convert(fn, shape, trained.recipe.model.name, x, expected)
                skipped = [FRAGILE_PASS]
    if problem is not None:
        raise UserError(failing_layer_message(trained, layout, batch, problem))
    diff = float(np.abs(run_onnx(model, x) - expected).max())
    meta = metadata(trained, "onnx", layout, ONNX_OPSET)
    if skipped:
        meta["jax2onnx_passes_skipped"] = ",".join(skipped)
    onnx.helper.set_model_props(model, meta)
    model.doc_string = f"{trained.recipe.name}: {meta['input']}; {meta['output']}"
    onnx.save(model, str(out))
    return Export(out, "onnx", list(shape), diff, meta)


def _convert(fn: Callable, shape: tuple, name: str, x: np.ndarray, expected: np.ndarray):
    """(ONNX model, None) when fn converts and reproduces `expected` on x in onnxruntime, else (None, problem)."""
    try:
        model = to_onnx(fn, shape, name)
        diff = float(np.abs(run_onnx(model, x) - expected).max())
    except UserError:
        raise
    except Exception as e:  # jax2onnx or onnxruntime rejected the model
        return None, f"fails with {_first_line(e)}"
    if not diff <= CHECK_TOLERANCE:
        return None, f"gives logits that differ from cnncli's by {diff:.3g} (> {CHECK_TOLERANCE:g})"
    return model, None


@contextmanager
def _without_pass(name: str):
    """jax2onnx with one of its graph optimizations left out; yields whether it was there to leave out.

    jax2onnx 0.17.1's `remove_redundant_transpose_pairs` mislabels NCHW/NHWC shapes in ResNet-18 (28x28 and
    32x32 inputs: onnxruntime rejects an Add of the 64-channel stage); without it the graph keeps some
    Transpose pairs and reproduces the logits. Every export is checked, so the fallback cannot hide a bug.
    """
    from jax2onnx.converter import ir_optimizations

    passes = getattr(ir_optimizations, "_OPTIMIZER_PASSES", None)
    if passes is None or name not in [p.name for p in passes]:
        yield False
        return
    ir_optimizations._OPTIMIZER_PASSES = tuple(p for p in passes if p.name != name)
    try:
        yield True
    finally:
        ir_optimizations._OPTIMIZER_PASSES = passes


def failing_layer_message(trained, layout: str, batch: int | None, problem: str) -> str:
    """Name the layer jax2onnx or onnxruntime gets wrong: first each layer converted alone, then (when every
    layer converts alone) the model up to each layer, bisected, for the first layer where it breaks."""
    name = trained.recipe.model.name
    fixed = "" if batch is not None else ", or try a fixed --batch-size"
    graphdef, state = nnx.split(load_model(trained))
    x = check_images(input_shape(trained, layout, None))
    if layout == "nchw":
        x = np.transpose(x, (0, 2, 3, 1))
    layers = _recorded(graphdef, state, x)
    for path, kind, layer, inputs in layers:
        problem = _onnx_problem(_module_fn(layer), [(BATCH if batch is None else batch, *v.shape[1:]) for v in inputs],
                                [np.asarray(v) for v in inputs])
        if problem:
            return (f"jax2onnx cannot convert layer '{path}' ({kind}) of {name}: {problem}; `--format stablehlo` "
                    f"exports it for JAX{fixed}")
    order = list(dict.fromkeys(path for path, *_ in layers))
    shape = [(BATCH if batch is None else batch, *x.shape[1:])]

    def breaks(i: int) -> str | None:
        return _onnx_problem(_prefix_fn(graphdef, state, order[i]), shape, [x])

    lo, hi = -1, len(order) - 1  # the model up to order[lo] converts (nothing, at -1), up to order[hi] not
    last = breaks(hi)
    if last is None:
        return f"jax2onnx's ONNX model of {name} {problem}; `--format stablehlo` exports it for JAX"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        problem = breaks(mid)
        if problem:
            hi, last = mid, problem
        else:
            lo = mid
    kind = next(k for path, k, *_ in layers if path == order[hi])
    return (f"jax2onnx converts each layer of {name} alone, but the model breaks at layer '{order[hi]}' ({kind}): "
            f"up to {'the input' if lo < 0 else repr(order[lo])} it converts, up to '{order[hi]}' {last}; "
            "`--format stablehlo` exports it for JAX")


def _onnx_problem(fn: Callable, shapes: list, inputs: list[np.ndarray]) -> str | None:
    """None if fn converts to ONNX and runs in onnxruntime with the same outputs as in JAX, else what went wrong."""
    try:
        model = _jax2onnx().to_onnx(fn, shapes, model_name="part", opset=ONNX_OPSET)
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {i.name: v for i, v in zip(session.get_inputs(), inputs)})[0]
    except Exception as e:
        return f"fails with {_first_line(e)}"
    diff = float(np.abs(got - np.asarray(fn(*inputs))).max())
    return None if diff <= CHECK_TOLERANCE else f"gives outputs that differ by {diff:.3g}"


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


class _Reached(Exception):
    """The recorded forward pass reached the wanted layer."""


class _Capture:
    """A layer recorder (the protocol of cnncli.models.layers: record(layer, inputs, output)) that keeps
    every layer it sees, with its inputs, and the output of the layer named `wanted`."""

    def __init__(self, model, wanted: str | None = None):
        self.paths = layer_paths(model)
        self.wanted = wanted
        self.seen: list[tuple[str, str, Any, list]] = []
        self.output = None

    def record(self, layer, xs, y) -> None:
        path = self.paths.get(id(layer), type(layer).__name__)
        self.seen.append((path, getattr(layer, "kind", type(layer).__name__), layer, list(xs)))
        if path == self.wanted:
            self.output = y
            raise _Reached  # the rest of the model stays out of the trace


def _run_recorded(model, x, capture: _Capture) -> None:
    token = recording(capture)
    try:
        with plain_convolutions():
            model(x)
    except _Reached:
        pass
    finally:
        stop_recording(token)


def _recorded(graphdef, state, x: np.ndarray) -> list[tuple[str, str, Any, list]]:
    """(path, kind, Layer module, its inputs) of every layer as the model runs on x."""
    model = nnx.merge(graphdef, state)
    capture = _Capture(model)
    _run_recorded(model, jnp.asarray(x), capture)
    return capture.seen


def _module_fn(layer) -> Callable:
    graphdef, state = nnx.split(layer)

    def fn(*xs):
        with plain_convolutions():
            return nnx.merge(graphdef, state)(*xs)

    return fn


def _prefix_fn(graphdef, state, path: str) -> Callable:
    """x -> the output of the layer at `path` (the model up to that layer)."""

    def fn(x):
        model = nnx.merge(graphdef, state)
        capture = _Capture(model, path)
        _run_recorded(model, x, capture)
        return capture.output

    return fn


# ----------------------------------------------------------------------------- StableHLO


def export_stablehlo(trained, out: Path, *, layout: str = "nhwc", batch: int | None = None) -> Export:
    from jax import export as jax_export

    fn = inference_fn(trained, layout)
    shape = input_shape(trained, layout, batch)
    dims = tuple(jax_export.symbolic_shape(BATCH)[0] if d == BATCH else d for d in shape)
    exported = jax_export.export(jax.jit(fn), platforms=STABLEHLO_PLATFORMS)(jax.ShapeDtypeStruct(dims, jnp.float32))
    blob = exported.serialize()
    x = check_images(shape)
    diff = float(np.abs(np.asarray(jax_export.deserialize(blob).call(x)) - np.asarray(jax.jit(fn)(x))).max())
    if not diff <= CHECK_TOLERANCE:
        raise UserError(f"the StableHLO export's logits differ from cnncli's by {diff:.3g} (> {CHECK_TOLERANCE:g})")
    meta = metadata(trained, "stablehlo", layout)
    meta["platforms"] = ",".join(STABLEHLO_PLATFORMS)
    out.write_bytes(blob)
    out.with_name(out.name + ".json").write_text(json.dumps(meta, indent=1))
    return Export(out, "stablehlo", list(shape), diff, meta)
