"""What each `cnncli visualize --what` figure computes and draws, one function per figure.

Each function takes a `Job` (the run, its model and layer table, the user's options) and returns the
matplotlib figure and the PNG's base name; the CLI saves it.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix

from cnncli.console import progress_bar
from cnncli.errors import UserError
from cnncli.inspect import figures
from cnncli.inspect.interpret import (
    SMOOTH_NOISE,
    SMOOTH_SAMPLES,
    TOP,
    activations,
    check_layer,
    confident_errors,
    embed_tsne,
    features,
    gradcam,
    kernels,
    last_spatial_layer,
    penultimate_layer,
    pictured_layers,
    probabilities,
    projections,
    read_images,
    saliency,
    sample_indices,
    spatial_layers,
    top_units,
    unit_patch,
)
from cnncli.train.steps import to_pixels
from cnncli.train.trained_run import eval_data

# How many filters / feature maps / units / images a figure shows when --n is not given.
DEFAULT_N = {"filters": 64, "activations": 64, "top-patches": 9, "deconv": 9, "saliency": 8, "smoothgrad": 8,
             "guided-backprop": 8, "gradcam": 8, "errors": 16}
TSNE_LIMIT = 2000  # t-SNE of more points takes minutes on a laptop CPU
# What each `--normalize` of the confusion matrix divides by (sklearn's `normalize`).
NORMALIZED = {"true": "each row sums to 1: recall on the diagonal",
              "pred": "each column sums to 1: precision on the diagonal",
              "all": "all cells sum to 1"}


@dataclass
class Job:
    """What one `visualize` figure needs: the run, its model and layer table, and the user's options."""

    trained: Any
    model: Any
    rows: dict
    layer: str | None
    image: Path | None
    n: int | None
    split: str | None  # None: test, or all the images of a --data source without a test split
    limit: int | None
    batch_size: int
    normalize: str | None = None  # confusion: None (counts), true (rows), pred (columns) or all
    data: str | None = None  # another source, classes matched by name (train.trained_run.eval_data)
    class_map: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)  # about the class matching, for the user

    def split_data(self, default_limit: int | None = None):
        """(uint8 images, labels, class names, indices in the split) of a seeded sample of `limit` examples."""
        chosen = eval_data(self.trained, self.split, self.data, self.class_map)
        self.split, self.notes = chosen.split, chosen.notes
        x, y, names = chosen
        keep = sample_indices(len(x), self.limit or default_limit)
        return x[keep], y[keep], names, keep

    def count(self, what: str, available: int) -> int:
        return min(self.n or DEFAULT_N[what], available)

    def images(self, what: str):
        """--image, or `count` images of the split: (uint8 images, true labels or None, names for titles)."""
        if self.image is not None:
            return read_images([self.image], self.trained.image_shape), None, [self.image.name]
        x, y, _, keep = self.split_data()
        k = self.count(what, len(x))
        return x[:k], y[:k], [f"{self.split} image {i}" for i in keep[:k]]


def _filters(job: Job):

    layer = job.layer or pictured_layers(job.model, job.rows)[0]
    k = kernels(job.model, layer, job.rows)
    shown = job.count("filters", len(k))
    fh, fw, c = k.shape[1:]
    title = f"{layer}: {shown} of {len(k)} filters, {fh}x{fw}x{c}; gray = 0, bright = positive"
    return figures.filters(k[:shown], title), f"filters_{layer}"


def _activations(job: Job):
    from cnncli.inspect.interpret import check_layer

    layer = job.layer or spatial_layers(job.rows)[0]
    check_layer(layer, job.rows, spatial=True)
    x, _, names = job.images("activations")
    maps = activations(job.model, to_pixels(x[:1]), [layer])[layer][0]
    shown = job.count("activations", maps.shape[-1])
    title = f"{layer} feature maps ({shown} of {maps.shape[-1]}) for {names[0]}"
    return figures.feature_maps(x[0], maps[..., :shown], title), f"activations_{layer}"


def _top_patches(job: Job):

    from cnncli.inspect import figures

    layer = job.layer or last_spatial_layer(job.rows)
    row = check_layer(layer, job.rows)
    x, _, _, _ = job.split_data()
    with progress_bar(f"top patches of {layer}") as advance:
        top = top_units(job.model, x, layer, batch_size=job.batch_size, progress=advance)
    units = top.strongest(job.count("top-patches", len(top.value)))
    patches = [np.stack([unit_patch(x[i], row, pos) for i, pos in zip(top.index[u], top.position[u])])
               for u in units]
    (rh, rw), (h, w) = row.receptive_field, x.shape[1:3]
    seen = f"receptive field {rh}x{rw}" + (f" covers the {h}x{w} image" if rh >= h and rw >= w else "")
    title = (f"{layer}: the {TOP} {job.split} patches ({len(x):,} images) that excite each of its "
             f"{len(units)} strongest units most; {seen}")
    return figures.top_patches(patches, units, top.value[units, 0], title), f"top_patches_{layer}"


def _deconv(job: Job):
    """Zeiler & Fergus: each strong unit's top-9 activations projected to pixels, beside its top-9 patches."""
    layer = job.layer or last_spatial_layer(job.rows)
    row = check_layer(layer, job.rows)
    x, _, _, _ = job.split_data()
    with progress_bar(f"top activations of {layer}") as advance:
        top = top_units(job.model, x, layer, batch_size=job.batch_size, progress=advance)
    units = top.strongest(job.count("deconv", len(top.value)))
    images = top.index[units].reshape(-1)
    with progress_bar(f"deconvnet projections of {len(units)} units"):
        maps = projections(job.model, to_pixels(x[images]), "deconvnet", layer=layer,
                           units=np.repeat(units, top.index.shape[1]), positions=top.position[units].reshape(-1, 2))
    maps = maps.reshape(len(units), -1, *maps.shape[1:])
    crops = [np.stack([unit_patch(m, row, pos) for m, pos in zip(maps[k], top.position[u])])
             for k, u in enumerate(units)]
    patches = [np.stack([unit_patch(x[i], row, pos) for i, pos in zip(top.index[u], top.position[u])])
               for u in units]
    title = (f"{layer}: deconvnet projections of each unit's {TOP} strongest activations ({job.split}, "
             f"{len(x):,} images; the rest of the layer set to 0), beside the patches that caused them")
    return figures.projections_beside_patches(crops, patches, units, top.value[units, 0], title), f"deconv_{layer}"


def _tsne(job: Job):
    from cnncli.inspect import figures

    layer = penultimate_layer(job.model)
    x, y, names, _ = job.split_data(TSNE_LIMIT)
    with progress_bar(f"features of {layer}") as advance:
        feats = features(job.model, x, layer, batch_size=job.batch_size, progress=advance)
    with progress_bar(f"t-SNE of {len(x):,} points"):
        points = embed_tsne(feats, seed=job.trained.recipe.seed)
    title = f"t-SNE of {layer} features ({feats.shape[1]} dims), {len(x):,} {job.split} images"
    return figures.tsne(points, y, names, title), f"tsne_{job.split}"


def _predicted(job: Job, x):

    probs = probabilities(job.model, x, batch_size=job.batch_size)
    return probs.argmax(-1), probs.max(-1)


def _captions(job: Job, pred, conf, y, names) -> tuple[list[str], list[str]]:
    """Captions of the image tiles (true class, or the file name) and of the map tiles (prediction)."""
    classes = job.trained.class_names
    image_captions = names if y is None else [f"true {classes[t]}" for t in y]
    return image_captions, [f"pred {classes[p]} {c:.0%}" for p, c in zip(pred, conf)]


def _saliency(job: Job):

    x, y, names = job.images("saliency")
    pred, conf = _predicted(job, x)
    maps = saliency(job.model, to_pixels(x), pred)
    title = "saliency: |d score / d pixel| of the predicted class, maximum over channels"
    return figures.heat_maps(x, maps, *_captions(job, pred, conf, y, names), title, overlay=False), "saliency"


def _smoothgrad(job: Job):
    x, y, names = job.images("smoothgrad")
    pred, conf = _predicted(job, x)
    maps = saliency(job.model, to_pixels(x), pred, samples=SMOOTH_SAMPLES, noise=SMOOTH_NOISE)
    title = (f"SmoothGrad: |mean d score / d pixel| over {SMOOTH_SAMPLES} copies with noise "
             f"{SMOOTH_NOISE:g} x range, predicted class")
    return figures.heat_maps(x, maps, *_captions(job, pred, conf, y, names), title, overlay=False), "smoothgrad"


def _guided_backprop(job: Job):
    x, y, names = job.images("guided-backprop")
    pred, conf = _predicted(job, x)
    maps = projections(job.model, to_pixels(x), "guided", classes=pred)
    title = "guided backpropagation of the predicted class (gray = 0, bright = raises the score)"
    return figures.signed_maps(x, maps, *_captions(job, pred, conf, y, names), title), "guided_backprop"


def _gradcam(job: Job):
    from cnncli.inspect.interpret import check_layer, last_spatial_layer

    layer = job.layer or last_spatial_layer(job.rows)
    check_layer(layer, job.rows, spatial=True)
    x, y, names = job.images("gradcam")
    pred, conf = _predicted(job, x)
    maps = gradcam(job.model, to_pixels(x), layer, pred)
    title = f"Grad-CAM at {layer} for the predicted class"
    return figures.heat_maps(x, maps, *_captions(job, pred, conf, y, names), title, overlay=True), f"gradcam_{layer}"


def _split_probabilities(job: Job):
    from cnncli.inspect.interpret import probabilities

    x, y, names, _ = job.split_data()
    with progress_bar(f"predict {job.split}") as advance:
        probs = probabilities(job.model, x, batch_size=job.batch_size, progress=advance)
    return x, y, names, probs


def _confusion(job: Job):


    _, y, names, probs = _split_probabilities(job)
    pred = probs.argmax(-1)
    matrix = confusion_matrix(y, pred, labels=range(len(names)), normalize=job.normalize)
    title = f"{job.split}: {len(y):,} images, top-1 {(pred == y).mean():.1%} (rows: true, columns: predicted)"
    if job.normalize:
        title += "\n" + NORMALIZED[job.normalize]
    name = f"confusion_{job.split}" + (f"_{job.normalize}" if job.normalize else "")
    return figures.confusion(matrix, names, title, normalized=job.normalize is not None), name


def _errors(job: Job):

    x, y, names, probs = _split_probabilities(job)
    wrong = confident_errors(probs, y, job.count("errors", len(x)))
    if not len(wrong):
        raise UserError(f"the model makes no mistake on the {len(x):,} {job.split} images")
    pred = probs[wrong].argmax(-1)
    captions = [f"true {names[t]}\npred {names[p]} {probs[i, p]:.0%}" for i, t, p in zip(wrong, y[wrong], pred)]
    title = f"the {len(wrong)} most confident mistakes on {len(x):,} {job.split} images"
    return figures.examples(x[wrong], captions, title), f"errors_{job.split}"


FIGURES = {"filters": _filters, "activations": _activations, "top-patches": _top_patches, "deconv": _deconv,
           "tsne": _tsne, "saliency": _saliency, "smoothgrad": _smoothgrad, "guided-backprop": _guided_backprop,
           "gradcam": _gradcam, "confusion": _confusion, "errors": _errors}
WHATS = tuple(FIGURES)
