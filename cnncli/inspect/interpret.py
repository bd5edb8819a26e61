"""What a trained network computes: probabilities, features, strongest units, saliency, Grad-CAM.

The numerical side of `cnncli predict` and `cnncli visualize` (figures are drawn by `cnncli.inspect.figures`).
Models are Classifiers (pixels in [0, 1] in, logits out, in eval mode); images are uint8 NHWC as the
dataset sources give them. Passes over a split run through `cnncli.train.batched.Batched` (the split on the
device once, one jitted function per batch, the last batch padded and masked).
Layer names and receptive fields are those of `cnncli.inspect.summary` (what `cnncli summary` prints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnncli.data.images import decode_image, resize_image, to_channels
from cnncli.errors import UserError, suggest
from cnncli.inspect.summary import INPUT, LayerRow, activations, layer_names, summarize
from cnncli.models.layers import recording, stop_recording
from cnncli.models.layers.activations import relu_backward
from cnncli.train.batched import Batched
from cnncli.train.steps import to_pixels
from cnncli.train.toolbox import compute_module, flip_tta_logits

BATCH = 256  # images per jitted batch in passes over a split
TOP = 9  # patches per unit, as Zeiler & Fergus show them
CAM_METHOD = "bilinear"  # Grad-CAM maps are upsampled to the image like the paper's figures
SMOOTH_SAMPLES = 50  # SmoothGrad: noisy copies per image (Smilkov et al. 2017 found 50 enough)
SMOOTH_NOISE = 0.15  # SmoothGrad: noise std as a fraction of the image's value range (the paper's 10-20%)


def load_model(trained) -> nnx.Module:
    """The Classifier of a `cnncli.train.trained_run.Trained` run, in eval mode, computing in the run's
    precision on this machine (the weights cast as the train and eval steps cast them)."""
    return compute_module(trained.model.eval_def, trained.model.params, trained.model.rest)


# ----------------------------------------------------------------------------- images and layers


def read_images(paths: Sequence[Path], image_shape: tuple[int, int, int]) -> np.ndarray:
    """Decode image files to uint8 (N, H, W, C) at the model's size and channel count.

    The same decoding, channel conversion and bilinear resize as the `folder:` source, so an image
    gets the same prediction from `cnncli predict` as from `cnncli eval --data folder:...`.

    Raises:
        UserError: A missing or unreadable file (named in the message).
    """

    h, w, c = image_shape
    out = np.empty((len(paths), h, w, c), np.uint8)
    for i, path in enumerate(paths):
        if not Path(path).is_file():
            raise UserError(f"no such image file: {path}")
        out[i] = resize_image(to_channels(decode_image(Path(path))[None], c)[0], (h, w))
    return out


def rows_by_name(model: nnx.Module) -> dict[str, LayerRow]:
    """The `cnncli summary` rows of a model at its input shape, by layer name ("input" first)."""
    return {r.name: r for r in summarize(model).layers}


def check_layer(name: str, rows: dict[str, LayerRow], *, spatial: bool = False) -> LayerRow:
    """The row of layer `name`; an unknown name (or a flat one where a feature map is needed) lists the valid ones.

    Raises:
        UserError: `name` is not a layer of the model, or is fully connected while `spatial` is asked.
    """
    valid = [n for n, r in rows.items() if not spatial or len(r.output_shape) == 3]
    if name not in valid:
        reason = "has no feature map" if name in rows else "is not a layer of this model"
        raise UserError(f"layer '{name}' {reason}{suggest(name, valid)}; choose one of: {', '.join(valid)}")
    return rows[name]


def spatial_layers(rows: dict[str, LayerRow]) -> list[str]:
    """The layers that output feature maps (H x W x C), in forward order, without the input.

    Raises:
        UserError: The model has none (an MLP).
    """
    spatial = [n for n, r in rows.items() if len(r.output_shape) == 3 and n != INPUT]
    if not spatial:
        raise UserError("this model has no convolutional layer (no feature maps to show)")
    return spatial


def last_spatial_layer(rows: dict[str, LayerRow]) -> str:
    """The deepest layer that still has a feature map (the default for top-patches and Grad-CAM)."""
    return spatial_layers(rows)[-1]


def penultimate_layer(model: nnx.Module) -> str:
    """The layer whose output feeds the last (classification) layer: the features t-SNE embeds.

    For a linear model that is the input itself.
    """
    return layer_names(model)[-2]


def sample_indices(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of `limit` examples out of n drawn without replacement (all of them without a limit).

    Random rather than the first `limit`: a split stored class by class would otherwise show one class.
    """
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


# ----------------------------------------------------------------------------- passes over a split


def _batched(model: nnx.Module, fn: Callable, batch_size: int) -> tuple[Any, Batched]:
    """The model's state and a `Batched` applying fn(model, pixels) to uint8 images."""
    graphdef, state = nnx.split(model)

    def apply(state, carry, batch, index):
        return carry, fn(nnx.merge(graphdef, state), to_pixels(batch[0]))

    return state, Batched(apply, batch_size=batch_size)


def map_batches(model: nnx.Module, fn: Callable, x: np.ndarray, *, batch_size: int = BATCH,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """fn(model, pixels) -> (B, ...) applied to uint8 images `x` in jitted batches; returns (N, ...)."""
    state, run = _batched(model, fn, min(batch_size, len(x)))
    return run(state, (x,), progress=progress)[1]


def map_stream(model: nnx.Module, fn: Callable, batches: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """fn(model, pixels) over uint8 batches of at most `batch_size` images as they arrive (decoded from files,
    never all in memory), each padded to `batch_size`: one step, compiled once."""
    state, run = _batched(model, fn, batch_size)
    for xb in batches:
        yield run(state, (xb,))[1]


def logits(model: nnx.Module, x: np.ndarray, *, tta: bool = False, **kw) -> np.ndarray:
    """Class logits (N, K) of uint8 images; with `tta`, the log of the mean softmax of each image and its flip."""
    if tta:
        return map_batches(model, lambda m, px: flip_tta_logits(m, px), x, **kw)
    return map_batches(model, lambda m, px: m(px), x, **kw)


def softmax_fn(temperature: float = 1.0) -> Callable:
    """fn(model, pixels) -> softmax class probabilities of logits / `temperature`: what every prediction shows.

    `temperature` is a run's fitted temperature (`TrainedRun.temperature`, from `cnncli eval
    --temperature`); it changes the probabilities, never their order.
    """
    return lambda m, px: jax.nn.softmax(m(px) / temperature, axis=-1)


def probabilities(model: nnx.Module, x: np.ndarray, *, temperature: float = 1.0, **kw) -> np.ndarray:
    """Softmax class probabilities (N, K) of uint8 images, of logits / `temperature` (see `softmax_fn`)."""
    return map_batches(model, softmax_fn(temperature), x, **kw)


def top_classes(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and probabilities of the k most probable classes of each row, most probable first."""
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=-1)


def features(model: nnx.Module, x: np.ndarray, layer: str, **kw) -> np.ndarray:
    """The output of `layer` for uint8 images, flattened to (N, F)."""
    return map_batches(model, lambda m, px: activations(m, px, [layer])[layer].reshape(len(px), -1), x, **kw)


def confident_errors(probs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n misclassified examples with the highest predicted probability, most confident first."""
    pred = probs.argmax(-1)
    wrong = np.flatnonzero(pred != labels)
    confidence = probs[wrong, pred[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:n]]


# ----------------------------------------------------------------------------- top-9 patches


@dataclass
class TopUnits:
    """For every unit (channel) of a layer, its `TOP` strongest images, strongest first.

    Attributes:
        value: (units, TOP) the unit's maximum activation over positions in each image.
        index: (units, TOP) the image's index in the array that was scanned.
        position: (units, TOP, 2) the (row, column) of that maximum in the layer's output map.
    """

    value: np.ndarray
    index: np.ndarray
    position: np.ndarray

    def strongest(self, n: int) -> np.ndarray:
        """The n units whose TOP-th best activation is highest (dead units come last)."""
        return np.argsort(-self.value[:, -1], kind="stable")[:n]


def top_units(model: nnx.Module, x: np.ndarray, layer: str, *, k: int = TOP, batch_size: int = BATCH,
              progress: Callable[[int, int], None] | None = None) -> TopUnits:
    """Scan uint8 images once, keeping for every unit of `layer` the k images that excite it most.

    One jitted function per batch computes the layer's output, each unit's maximum over positions
    and merges it into a running top-k kept on the device, so nothing but the result leaves it.
    A fully connected layer counts as a 1x1 map.
    """
    shape = rows_by_name(model)[layer].output_shape
    width, units = (shape[1], shape[2]) if len(shape) == 3 else (1, shape[0])
    graphdef, state = nnx.split(model)
    k = min(k, len(x))
    batch = min(batch_size, len(x))

    def step(state, carry, images_and_mask, i):
        images, mask = images_and_mask
        valid = mask > 0
        a = activations(nnx.merge(graphdef, state), to_pixels(images), [layer])[layer]
        flat = a.reshape(batch, -1, units)  # (B, positions, units)
        best = jnp.where(valid[:, None], flat.max(axis=1), -jnp.inf).T  # (units, B); padding never wins
        where = flat.argmax(axis=1).T.astype(jnp.int32)
        image = jnp.broadcast_to(i * batch + jnp.arange(batch, dtype=jnp.int32), best.shape)
        value = jnp.concatenate([carry[0], best], axis=1)
        _, order = jax.lax.top_k(value, k)

        def pick(a):
            return jnp.take_along_axis(a, order, axis=1)

        return (pick(value), pick(jnp.concatenate([carry[1], image], axis=1)),
                pick(jnp.concatenate([carry[2], where], axis=1))), None

    carry = (jnp.full((units, k), -jnp.inf), jnp.zeros((units, k), jnp.int32), jnp.zeros((units, k), jnp.int32))
    carry, _ = Batched(step, batch_size=batch)(state, (x,), carry, progress)
    value, index, flat = (np.asarray(c) for c in carry)
    return TopUnits(value, index, np.stack([flat // width, flat % width], axis=-1))


def patch_box(row: LayerRow, position: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) in input pixels of the receptive field of one output position.

    From the summary's geometry: position i is centred at rf_start + i * jump and spans the
    receptive field around it. The box may reach past the image border (padding).
    """
    (rh, rw), (jh, jw), (sh, sw) = row.receptive_field, row.jump, row.rf_start
    r, c = position
    # centre - (rf - 1) / 2 is always a whole pixel: the padding shifts start and rf together.
    return int(round(sh + r * jh - (rh - 1) / 2)), int(round(sw + c * jw - (rw - 1) / 2)), rh, rw


def crop_box(image: np.ndarray, box: tuple[int, int, int, int], fill: int = 0) -> np.ndarray:
    """The (height, width) box of an HWC image; pixels outside the image are `fill` (zero padding)."""
    top, left, h, w = box
    out = np.full((h, w, image.shape[-1]), fill, image.dtype)
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, image.shape[0]), min(left + w, image.shape[1])
    if t1 > t0 and l1 > l0:
        out[t0 - top: t1 - top, l0 - left: l1 - left] = image[t0:t1, l0:l1]
    return out


def unit_patch(image: np.ndarray, row: LayerRow, position: tuple[int, int]) -> np.ndarray:
    """What the unit at `position` of layer `row` sees in an HWC image: its receptive-field crop.

    Once the receptive field is at least the image's size (the deep layers of small images) the
    crop would be mostly padding, so the whole image is returned instead.
    """
    if all(rf >= size for rf, size in zip(row.receptive_field, image.shape[:2])):
        return image
    return crop_box(image, patch_box(row, position))


# ----------------------------------------------------------------------------- gradients


def saliency(model: nnx.Module, pixels: jax.Array, classes: np.ndarray, *, samples: int = 0,
             noise: float = SMOOTH_NOISE, seed: int = 0) -> np.ndarray:
    """|d score(class) / d pixel|, maximum over channels (Simonyan et al. 2014): (N, H, W).

    The score is the class logit (before the softmax), as in the paper. With `samples` > 0 this is
    SmoothGrad (Smilkov et al. 2017): the gradient averaged over `samples` copies of each image with
    Gaussian noise of std `noise` x (the image's max - min) added, which removes most of the
    vanilla gradient's speckle; the absolute value is taken after averaging.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def grad(state, px, classes, key):
        def gradient(px):
            def score(px):
                logits = nnx.merge(graphdef, state)(px)
                return jnp.take_along_axis(logits, classes[:, None], axis=1).sum()

            return jax.grad(score)(px)

        if samples == 0:
            g = gradient(px)
        else:
            span = (px.max(axis=(1, 2, 3)) - px.min(axis=(1, 2, 3)))[:, None, None, None]

            def add(total, k):
                return total + gradient(px + noise * span * jax.random.normal(k, px.shape)), None

            g = jax.lax.scan(add, jnp.zeros_like(px), jax.random.split(key, samples))[0] / samples
        return jnp.abs(g).max(axis=-1)

    return np.asarray(grad(state, pixels, jnp.asarray(classes, jnp.int32), jax.random.key(seed)))


class _Watch:
    """A layer recorder that keeps the output of the `index`-th layer called (-1: none).

    Any active recorder also keeps each convolution's ReLU before the max-pool that follows it
    (`activates_after_pool`), so the backward pass sees the layers in the paper's order.
    """

    def __init__(self, index: int = -1):
        self.index, self.calls, self.value = index, 0, None

    def record(self, layer, xs, y):
        if self.calls == self.index:
            self.value = y
        self.calls += 1


def projections(model: nnx.Module, pixels: jax.Array, rule: str, *, classes: np.ndarray | None = None,
                layer: str | None = None, units: np.ndarray | None = None,
                positions: np.ndarray | None = None) -> np.ndarray:
    """A score of each image projected back to pixel space: (N, H, W, C), signed.

    The score is the logit of `classes`, or the activation of `units` of `layer` at `positions`
    (row, column; ignored for a flat layer), all other activations of the layer set to zero as in
    Zeiler & Fergus. The pass back follows `rule` at every ReLU: 'deconvnet' (Zeiler & Fergus
    2014: the signal is rectified, whatever the forward pass did; max-pools unpool with the
    forward pass' switches and convolutions apply their transposed filters, which is what their
    gradients do), 'guided' (guided backpropagation, Springenberg et al. 2015: the gradient, also
    rectified) or 'gradient' (plain backpropagation).
    """
    index = -1 if layer is None else layer_names(model).index(layer) - 1  # minus "input"
    graphdef, state = nnx.split(model)

    @jax.jit
    def project(state, px, which, positions):
        def score(px):
            watch = _Watch(index)
            token = recording(watch)
            try:
                logits = nnx.merge(graphdef, state)(px)
            finally:
                stop_recording(token)
            out = logits if watch.value is None else watch.value
            n = len(px)
            if out.ndim == 4:
                return out[jnp.arange(n), positions[:, 0], positions[:, 1], which].sum()
            return out[jnp.arange(n), which].sum()

        with relu_backward(rule):
            return jax.grad(score)(px)

    which = classes if layer is None else units
    positions = np.zeros((len(pixels), 2), np.int32) if positions is None else positions
    return np.asarray(project(state, pixels, jnp.asarray(which, jnp.int32), jnp.asarray(positions, jnp.int32)))


class _Tap:
    """A layer recorder that adds `delta` to the output of the `index`-th layer called and keeps that output.

    The gradient with respect to `delta` (zero) is the gradient with respect to the layer's output.
    Layers are counted in call order, the order of `analysis.layer_names` (after "input").
    """

    def __init__(self, index: int, delta: jax.Array):
        self.index, self.delta, self.calls, self.value = index, delta, 0, None

    def record(self, layer, xs, y):
        self.calls += 1
        if self.calls - 1 != self.index:
            return None
        self.value = y
        return y + self.delta


def gradcam(model: nnx.Module, pixels: jax.Array, layer: str, classes: np.ndarray) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of `classes` at `layer`: (N, H, W) in [0, 1], upsampled to the image.

    relu(sum_k alpha_k A_k) with alpha_k the spatial mean of d score / d A_k, normalized per image.
    """
    index = layer_names(model).index(layer) - 1  # minus "input"
    shape = (len(pixels), *rows_by_name(model)[layer].output_shape)
    graphdef, state = nnx.split(model)

    @jax.jit
    def cam(state, px, classes):
        def score(delta):
            tap = _Tap(index, delta)
            token = recording(tap)
            try:
                logits = nnx.merge(graphdef, state)(px)
            finally:
                stop_recording(token)
            return jnp.take_along_axis(logits, classes[:, None], axis=1).sum(), tap.value

        grads, maps = jax.grad(score, has_aux=True)(jnp.zeros(shape, pixels.dtype))
        weights = grads.mean(axis=(1, 2), keepdims=True)
        heat = jax.nn.relu((weights * maps).sum(axis=-1))
        heat = jax.image.resize(heat, (len(px), *px.shape[1:3]), CAM_METHOD)
        return heat / jnp.maximum(heat.max(axis=(1, 2), keepdims=True), 1e-12)

    return np.asarray(cam(state, pixels, jnp.asarray(classes, jnp.int32)))


# ----------------------------------------------------------------------------- kernels


def layer_module(model: nnx.Module, name: str) -> nnx.Module:
    """The module of a summary row name ("conv1", "layer1.0.conv1") inside a Classifier."""
    for path, module in nnx.iter_modules(model.net):
        if ".".join(str(p) for p in path) == name:
            return module
    raise KeyError(name)


def kernels(model: nnx.Module, name: str, rows: dict[str, LayerRow]) -> np.ndarray:
    """The spatial kernels of layer `name` as (filters, kh, kw, in_channels).

    A fully connected layer on the image (a linear model's only layer) gives one image-sized
    template per output unit.

    Raises:
        UserError: The layer has no kernel, or a fully connected one that does not read the image.
    """
    check_layer(name, rows)
    k = _pictured(layer_module(model, name), rows[INPUT].output_shape) if name != INPUT else None
    if k is None:
        raise UserError(f"layer '{name}' has no weights that are pictures; choose one of: "
                        f"{', '.join(pictured_layers(model, rows))}")
    return k


def pictured_layers(model: nnx.Module, rows: dict[str, LayerRow]) -> list[str]:
    """The layers whose weights `kernels` can show (convolutions, and fully connected layers on the image)."""
    image = rows[INPUT].output_shape
    return [n for n in rows if n != INPUT and _pictured(layer_module(model, n), image) is not None]


def _pictured(module: nnx.Module, image: tuple[int, int, int]) -> np.ndarray | None:
    """A module's kernel as (filters, kh, kw, in_channels), or None when it has no spatial kernel."""
    kernel = getattr(module, "kernel", None)
    if kernel is None:
        return None
    k = np.asarray(kernel[...])
    if k.ndim == 4:  # HWIO (a grouped or depthwise convolution shows the input channels each filter reads)
        return k.transpose(3, 0, 1, 2)
    if k.shape[0] == int(np.prod(image)):  # fully connected to the image itself
        return k.T.reshape(-1, *image)
    return None


# ----------------------------------------------------------------------------- t-SNE

PCA_DIMS = 50  # t-SNE on more dimensions than this is first reduced by PCA (van der Maaten's practice)
PERPLEXITY = 30.0
# scikit-learn's Barnes-Hut t-SNE synchronizes its OpenMP threads at every iteration, which a busy
# machine makes far slower than one thread (docs/performance.md, "The rules").
TSNE_THREADS = 1


def embed_tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """scikit-learn's t-SNE of (N, F) features: (N, 2) points, one per example.

    Raises:
        UserError: Fewer than 3 examples (t-SNE needs a perplexity below the number of points).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(features)
    if n < 3:
        raise UserError(f"t-SNE needs at least 3 examples, got {n}; raise --limit")
    x = features.astype(np.float32)
    if x.shape[1] > PCA_DIMS and n > PCA_DIMS:
        x = PCA(PCA_DIMS, random_state=seed).fit_transform(x)
    perplexity = min(PERPLEXITY, (n - 1) / 3)
    with threadpool_limits(TSNE_THREADS, user_api="openmp"):
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


# ----------------------------------------------------------------------------- learning curves

GAP_LARGE = 0.05  # train - validation accuracy above this: over-fitting
ACC_LOW = 0.90  # training accuracy below this with no gap: under-fitting


def diagnose(rows: Sequence[dict]) -> str:
    """One line reading the last epoch of metrics.jsonl the way the lectures read learning curves."""
    if not rows:
        return "no epoch has finished yet"
    last = rows[-1]
    train = last["train_acc"]
    if "val_acc" not in last:
        return (f"train accuracy {train:.1%} at epoch {last['epoch']}; no validation split (data.val_fraction=0), "
                "so over-fitting cannot be read from the curves")
    val = last["val_acc"]
    gap = train - val
    head = f"epoch {last['epoch']}: train {train:.1%}, validation {val:.1%}"
    if gap > GAP_LARGE:
        return (f"{head}: a gap of {gap * 100:.1f} points, over-fitting: more regularization (dropout, weight "
                "decay, augmentation) or more data")
    if train < ACC_LOW:
        return (f"{head}: no gap and low accuracy, under-fitting: more capacity (wider or deeper model) or "
                "longer training")
    return f"{head}: small gap and high accuracy, a good fit"
