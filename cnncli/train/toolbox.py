"""The training toolbox: weight EMA, mixed precision, class weights, balanced sampling, early stopping, TTA.

Small pure functions the steps and the loop plug in where a recipe asks for them. Device-side ones
(EMA update, weighted loss, balanced draw, flip TTA) run inside jit; host-side ones (class weight
vector, early stopping) are functions of the run's history, so a resumed run decides exactly as the
uninterrupted one did (which is why early stopping is not flax.training.early_stopping, whose state
would need checkpointing).
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnncli.errors import UserError

# The EMA decay ramps up as min(decay, (1 + step) / (EMA_WARMUP + step)) (as TensorFlow's
# ExponentialMovingAverage with num_updates): with a fixed 0.999 the average of a short run would
# still be mostly the random initialization.
EMA_WARMUP = 10.0

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------- weight EMA


def init_ema(params, rest) -> dict:
    """The EMA of a fresh run: a copy of the weights and of the model state (batch-norm statistics)."""
    return {"params": jax.tree.map(jnp.copy, params), "rest": jax.tree.map(jnp.copy, rest)}


def ema_update(ema: dict, params, rest, decay: float, step: jax.Array, every: int = 1) -> dict:
    """One EMA step after optimizer step `step` (0-based): ema <- d ** every * ema + (1 - d ** every) * new,
    d the warmed-up decay.

    Batch-norm statistics are averaged too, so the EMA weights are evaluated with statistics that
    match them; integer and key leaves (dropout RNG state) are copied, not averaged.

    Args:
        ema: {'params', 'rest'} as from `init_ema`.
        params, rest: the weights and model state after the step.
        decay: the recipe's train.ema; 0 makes the EMA equal to the raw weights.
        step: the optimizer step just taken.
        every: the update stands for this many steps' (train.ema_every).
    """
    d = jnp.minimum(decay, (1.0 + step) / (EMA_WARMUP + step)) ** every

    def average(old, new):
        if not jnp.issubdtype(new.dtype, jnp.floating):
            return new
        return (d * old + (1.0 - d) * new).astype(new.dtype)

    return {"params": jax.tree.map(average, ema["params"], params), "rest": jax.tree.map(average, ema["rest"], rest)}


# ----------------------------------------------------------------------------- mixed precision
# bfloat16 compute keeps float32 master weights: the model's graphdef carries the compute dtype (the
# Classifier's and every Flax layer's `dtype`, set by `layer_dtype`), and `compute_module` hands the
# model bfloat16 copies of its weights (gradients flow back to the float32 weights through the cast).
# The Classifier normalizes its float32 pixels in float32, computes in bfloat16 and returns float32
# logits, so losses, softmaxes and attacks' perturbations stay float32. Batch-norm running statistics
# and the normalization constants stay float32: an EMA with momentum 0.9 updated from a
# bfloat16-rounded value drifts by up to 10x bfloat16's rounding error. Flax's batch norm still
# computes in bfloat16 (else its float32 statistics would promote every later activation back).

# `auto`: bfloat16 where the hardware computes it natively and fast (NVIDIA GPUs from Ampere on,
# compute capability 8.0, and TPUs); float32 elsewhere (CPUs emulate bfloat16 matmuls slowly, older
# GPUs have no bfloat16 tensor cores).
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)


def resolve_precision(setting: str, device=None) -> str:
    """The compute precision of `setting` (auto, float32, bfloat16) on `device` (default: JAX's first device).

    `device` is anything with JAX's device attributes: `platform` ('cpu', 'gpu', 'cuda', 'rocm',
    'tpu') and, on NVIDIA GPUs, `compute_capability` ('9.0').
    """
    if setting != "auto":
        return setting
    if device is None:
        device = jax.devices()[0]
    platform = str(device.platform).lower()
    if platform == "tpu":
        return "bfloat16"
    if platform in ("gpu", "cuda"):
        capability = getattr(device, "compute_capability", None)
        try:
            version = tuple(int(part) for part in str(capability).split(".")[:2])
        except ValueError:  # no CUDA compute capability (e.g. a ROCm GPU): keep float32
            return "float32"
        return "bfloat16" if version >= BF16_MIN_COMPUTE_CAPABILITY else "float32"
    return "float32"


@contextmanager
def layer_dtype(model: nnx.Module, precision: str) -> Iterator[None]:
    """Within the block, modules of `model` that have a computation `dtype` compute in `precision`.

    Split the model inside the block to get a graphdef with that setting; the model is restored after.
    """
    modules = [m for _, m in nnx.iter_modules(model) if hasattr(m, "dtype")]
    before = [m.dtype for m in modules]
    for m in modules:
        m.dtype = COMPUTE_DTYPES[precision]
    try:
        yield
    finally:
        for m, dtype in zip(modules, before):
            m.dtype = dtype


def compute_module(graphdef, params, rest, *, copy: bool = False) -> nnx.Module:
    """The module of (graphdef, params, rest) with its weights in the graphdef's compute dtype.

    The root module's `dtype` (a Classifier's) is the compute dtype; float32 merges the state as it is.
    """
    model = nnx.merge(graphdef, params, rest, copy=copy)
    dtype = getattr(model, "dtype", jnp.float32)
    if dtype == jnp.float32:
        return model
    return nnx.merge(graphdef, to_compute_dtype(params, dtype), rest, copy=copy)


def to_compute_dtype(params, dtype):
    """A copy of a parameter nnx.State with its floating arrays in `dtype`."""

    def cast(v):
        value = v.get_value()
        return v.replace(value.astype(dtype)) if jnp.issubdtype(value.dtype, jnp.floating) else v

    return jax.tree.map(cast, params, is_leaf=lambda v: isinstance(v, nnx.Variable))


# ----------------------------------------------------------------------------- imbalanced data


def class_weight_vector(spec: str | Sequence[float] | None, labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """Per-class loss weights from the recipe's train.class_weights.

    Args:
        spec: None, 'balanced' (n / (k * n_c), scikit-learn's definition: 1 on a balanced set) or one
            weight per class.
        labels: the training labels (for 'balanced').
        num_classes: k.

    Returns:
        A float32 (k,) vector, or None for no weighting.

    Raises:
        UserError: a list whose length is not the class count.
    """
    if spec is None:
        return None
    if spec == "balanced":
        counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
        # a class absent from training has no examples to weight: 0 keeps the vector finite
        weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1.0)), 0.0)
        return weights.astype(np.float32)
    if len(spec) != num_classes:
        raise UserError(f"train.class_weights has {len(spec)} weights, the data has {num_classes} classes")
    return np.asarray(spec, np.float32)


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None,
                           example_weights: jax.Array | None = None, per_example=None) -> jax.Array:
    """Mean softmax cross-entropy; with weights, the weighted mean sum(w_i ce_i) / sum(w_i).

    With class weights, each example's weight is its target distribution dotted with them (mixup and
    label smoothing give soft targets); `example_weights` (e.g. the clean/adversarial mix) multiply
    in. Normalizing by the summed weights (PyTorch's convention) keeps the loss scale independent of
    the weights' overall scale. `per_example(logits, targets)` replaces the cross-entropy
    (`train.loss`, see `cnncli.train.losses`).
    """
    import optax

    ce = (per_example or optax.softmax_cross_entropy)(logits, targets)
    if weights is None and example_weights is None:
        return ce.mean()
    w = jnp.ones_like(ce) if example_weights is None else example_weights
    if weights is not None:
        w = w * (targets @ weights)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)


@partial(jax.jit, static_argnames="num_classes")
def balanced_shuffle(xs: jax.Array, ys: jax.Array, key: jax.Array, num_classes: int):
    """An epoch of len(xs) images drawn with replacement, each class equally likely.

    Image i is drawn with probability proportional to 1 / count(class of i), made on device once per
    epoch like `steps.shuffle`.
    """
    order = balanced_order(ys, key, num_classes)
    return xs[order], ys[order]


def balanced_order(ys: jax.Array, key: jax.Array, num_classes: int) -> jax.Array:
    """The indices `balanced_shuffle` draws for labels `ys` and `key`."""
    counts = jnp.bincount(ys, length=num_classes)
    p = 1.0 / counts[ys].astype(jnp.float32)
    return jax.random.choice(key, ys.shape[0], (ys.shape[0],), replace=True, p=p / p.sum())


# ----------------------------------------------------------------------------- early stopping


def epochs_without_improvement(val_accs: Sequence[float], min_delta: float) -> int:
    """Epochs since validation accuracy last rose by more than `min_delta` over the best so far."""
    best, since = -np.inf, 0
    for acc in val_accs:
        if acc > best + min_delta:
            best, since = acc, 0
        else:
            since += 1
    return since


# ----------------------------------------------------------------------------- test-time augmentation


TTA_AUGMENT = "hflip"  # the training augmentation whose transform flip TTA applies at test time


def tta_warning(recipe) -> str | None:
    """Why flip TTA may lower this run's accuracy: its training never saw a horizontal flip (None if it did)."""
    if any(op.name == TTA_AUGMENT and op.p > 0 for op in recipe.augment):
        return None
    return (f"--tta averages each image with its horizontal flip, but '{recipe.name}' was trained without "
            f"{TTA_AUGMENT} (its augment section has none), so flipped images are new to it and TTA can lower "
            "the accuracy: compare with the plain eval")


def flip_tta_logits(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Log of the mean softmax over the images and their horizontal flips (NHWC).

    The result is used as logits: its argmax, top-k and cross-entropy are those of the averaged
    probabilities. It is computed as a log-mean-exp of log-probabilities, which stays finite where a
    probability underflows to 0.
    """
    log_probs = jnp.stack([jax.nn.log_softmax(logits_fn(x)), jax.nn.log_softmax(logits_fn(x[:, :, ::-1, :]))])
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(2.0)
