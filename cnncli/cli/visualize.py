"""`cnncli plot RUN` (learning curves) and `cnncli visualize RUN --what ...` (what the network learned).

PNGs go to the run's plots/ folder unless --out; each command prints the path it wrote.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from cnncli.cli import app
from cnncli.errors import UserError, suggest

WHATS = ("filters", "activations", "top-patches", "tsne", "saliency", "gradcam", "confusion", "errors")
# How many filters / feature maps / units / images a figure shows when --n is not given.
DEFAULT_N = {"filters": 64, "activations": 64, "top-patches": 9, "saliency": 8, "gradcam": 8, "errors": 16}
TSNE_LIMIT = 2000  # t-SNE of more points takes minutes on a laptop CPU


@app.command()
def plot(
    run: Path = typer.Argument(..., help="Run directory (also while it is training)."),
    out: Path = typer.Option(None, "--out", help="Folder for the PNG [default: RUN/plots]."),
) -> None:
    """Loss and accuracy curves, train vs validation, with a one-line diagnosis (over- or under-fitting)."""
    from cnncli import viz
    from cnncli.console import console
    from cnncli.interpret import diagnose
    from cnncli.runs import resolve

    run_dir = resolve(run)
    rows = run_dir.read_metrics()
    if not rows:
        raise UserError(f"{run_dir.path} has no finished epoch yet (no rows in {run_dir.metrics.name}); "
                        "plot again after the first epoch")
    diagnosis = diagnose(rows)
    epochs = _planned_epochs(run_dir)
    progress = f" (epoch {rows[-1]['epoch']} of {epochs}, in progress)" if epochs and rows[-1]["epoch"] < epochs else ""
    path = (out or run_dir.plots) / "curves.png"
    viz.plot_curves([(run_dir.path.name, rows)], path, title=f"{run_dir.path.name}{progress}\n{diagnosis}")
    console.print(diagnosis, highlight=False, soft_wrap=True)
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def _planned_epochs(run_dir) -> int | None:
    from cnncli import recipe as recipe_lib

    if not run_dir.recipe.is_file():
        return None
    return recipe_lib.load(run_dir.recipe).train.epochs


@dataclass
class _Job:
    """What one `visualize` figure needs: the run, its model and layer table, and the user's options."""

    trained: Any
    model: Any
    rows: dict
    layer: str | None
    image: Path | None
    n: int | None
    split: str
    limit: int | None
    batch_size: int

    def split_data(self, default_limit: int | None = None):
        """(uint8 images, labels, class names, indices in the split) of a seeded sample of `limit` examples."""
        from cnncli.interpret import sample
        from cnncli.trained import eval_data

        x, y, names = eval_data(self.trained, self.split)
        keep = sample(len(x), self.limit or default_limit)
        return x[keep], y[keep], names, keep

    def count(self, what: str, available: int) -> int:
        return min(self.n or DEFAULT_N[what], available)

    def images(self, what: str):
        """--image, or `count` images of the split: (uint8 images, true labels or None, names for titles)."""
        from cnncli.interpret import read_images

        if self.image is not None:
            return read_images([self.image], self.trained.image_shape), None, [self.image.name]
        x, y, _, keep = self.split_data()
        k = self.count(what, len(x))
        return x[:k], y[:k], [f"{self.split} image {i}" for i in keep[:k]]


@app.command()
def visualize(
    run: Path = typer.Argument(..., help="Run directory (or one checkpoint inside it)."),
    what: str = typer.Option(..., "--what", help=f"One of: {', '.join(WHATS)}."),
    layer: str = typer.Option(None, "--layer", help="Layer name as `cnncli summary` prints it [default: the first "
                                                    "layer with weights (filters), the first layer (activations), "
                                                    "the last convolutional one (top-patches, gradcam)]."),
    image: Path = typer.Option(None, "--image", help="An image file for activations, saliency, gradcam [default: "
                                                     "images of --split]."),
    n: int = typer.Option(None, "--n", min=1, help="How many filters, feature maps, units (top-patches: 9) or "
                                                   "images (saliency, gradcam: 8; errors: 16)."),
    split: str = typer.Option("test", "--split", help="train, val or test."),
    limit: int = typer.Option(None, "--limit", min=1, help=f"Use a random sample of this many images of the split "
                                                           f"[default: all; tsne: {TSNE_LIMIT}]."),
    out: Path = typer.Option(None, "--out", help="Folder for the PNG [default: RUN/plots]."),
    which: str = typer.Option("best", "--checkpoint", help="best or latest checkpoint of the run."),
    ema: bool = typer.Option(False, "--ema", help="Use the EMA weights (runs trained with train.ema)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per batch in passes over the split."),
) -> None:
    """Filters, feature maps, top-9 patches, t-SNE, saliency, Grad-CAM, confusion or errors of a trained run."""
    from cnncli import viz
    from cnncli.console import console
    from cnncli.interpret import load_model, rows_by_name
    from cnncli.trained import load_trained

    if what not in WHATS:
        raise UserError(f"--what '{what}' is unknown{suggest(what, WHATS)}; choose one of: {', '.join(WHATS)}")
    if image is not None and what not in ("activations", "saliency", "gradcam"):
        raise UserError(f"--image applies to activations, saliency and gradcam, not to {what}")
    trained = load_trained(run, which, ema=ema)
    model = load_model(trained)
    job = _Job(trained, model, rows_by_name(model), layer, image, n, split, limit, batch_size)
    fig, name = _FIGURES[what](job)
    path = viz.save(fig, (out or trained.run.plots) / f"{name}.png")
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- one function per --what


def _filters(job: _Job):
    from cnncli import viz
    from cnncli.interpret import kernels, pictured_layers

    layer = job.layer or pictured_layers(job.model, job.rows)[0]
    k = kernels(job.model, layer, job.rows)
    shown = job.count("filters", len(k))
    fh, fw, c = k.shape[1:]
    title = f"{layer}: {shown} of {len(k)} filters, {fh}x{fw}x{c}; gray = 0, bright = positive"
    return viz.filters(k[:shown], title), f"filters_{layer}"


def _activations(job: _Job):
    from cnncli import viz
    from cnncli.interpret import activations, check_layer, spatial_layers, to_pixels

    layer = job.layer or spatial_layers(job.rows)[0]
    check_layer(layer, job.rows, spatial=True)
    x, _, names = job.images("activations")
    maps = activations(job.model, to_pixels(x[:1]), [layer])[layer][0]
    shown = job.count("activations", maps.shape[-1])
    title = f"{layer} feature maps ({shown} of {maps.shape[-1]}) for {names[0]}"
    return viz.feature_maps(x[0], maps[..., :shown], title), f"activations_{layer}"


def _top_patches(job: _Job):
    import numpy as np

    from cnncli import viz
    from cnncli.console import progress_bar
    from cnncli.interpret import TOP, check_layer, last_spatial_layer, top_units, unit_patch

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
    return viz.top_patches(patches, units, top.value[units, 0], title), f"top_patches_{layer}"


def _tsne(job: _Job):
    from cnncli import viz
    from cnncli.console import progress_bar
    from cnncli.interpret import features, penultimate_layer, tsne

    layer = penultimate_layer(job.model)
    x, y, names, _ = job.split_data(TSNE_LIMIT)
    with progress_bar(f"features of {layer}") as advance:
        feats = features(job.model, x, layer, batch_size=job.batch_size, progress=advance)
    with progress_bar(f"t-SNE of {len(x):,} points"):
        points = tsne(feats, seed=job.trained.recipe.seed)
    title = f"t-SNE of {layer} features ({feats.shape[1]} dims), {len(x):,} {job.split} images"
    return viz.tsne(points, y, names, title), f"tsne_{job.split}"


def _predicted(job: _Job, x):
    from cnncli.interpret import probabilities

    probs = probabilities(job.model, x, batch_size=job.batch_size)
    return probs.argmax(-1), probs.max(-1)


def _captions(job: _Job, pred, conf, y, names) -> tuple[list[str], list[str]]:
    """Captions of the image tiles (true class, or the file name) and of the map tiles (prediction)."""
    classes = job.trained.class_names
    image_captions = names if y is None else [f"true {classes[t]}" for t in y]
    return image_captions, [f"pred {classes[p]} {c:.0%}" for p, c in zip(pred, conf)]


def _saliency(job: _Job):
    from cnncli import viz
    from cnncli.interpret import saliency, to_pixels

    x, y, names = job.images("saliency")
    pred, conf = _predicted(job, x)
    maps = saliency(job.model, to_pixels(x), pred)
    title = "saliency: |d score / d pixel| of the predicted class, maximum over channels"
    return viz.heat_maps(x, maps, *_captions(job, pred, conf, y, names), title, overlay=False), "saliency"


def _gradcam(job: _Job):
    from cnncli import viz
    from cnncli.interpret import check_layer, gradcam, last_spatial_layer, to_pixels

    layer = job.layer or last_spatial_layer(job.rows)
    check_layer(layer, job.rows, spatial=True)
    x, y, names = job.images("gradcam")
    pred, conf = _predicted(job, x)
    maps = gradcam(job.model, to_pixels(x), layer, pred)
    title = f"Grad-CAM at {layer} for the predicted class"
    return viz.heat_maps(x, maps, *_captions(job, pred, conf, y, names), title, overlay=True), f"gradcam_{layer}"


def _split_probabilities(job: _Job):
    from cnncli.console import progress_bar
    from cnncli.interpret import probabilities

    x, y, names, _ = job.split_data()
    with progress_bar(f"predict {job.split}") as advance:
        probs = probabilities(job.model, x, batch_size=job.batch_size, progress=advance)
    return x, y, names, probs


def _confusion(job: _Job):
    from sklearn.metrics import confusion_matrix

    from cnncli import viz

    _, y, names, probs = _split_probabilities(job)
    pred = probs.argmax(-1)
    matrix = confusion_matrix(y, pred, labels=range(len(names)))
    title = f"{job.split}: {len(y):,} images, top-1 {(pred == y).mean():.1%} (rows: true, columns: predicted)"
    return viz.confusion(matrix, names, title), f"confusion_{job.split}"


def _errors(job: _Job):
    from cnncli import viz
    from cnncli.interpret import confident_errors

    x, y, names, probs = _split_probabilities(job)
    wrong = confident_errors(probs, y, job.count("errors", len(x)))
    if not len(wrong):
        raise UserError(f"the model makes no mistake on the {len(x):,} {job.split} images")
    pred = probs[wrong].argmax(-1)
    captions = [f"true {names[t]}\npred {names[p]} {probs[i, p]:.0%}" for i, t, p in zip(wrong, y[wrong], pred)]
    title = f"the {len(wrong)} most confident mistakes on {len(x):,} {job.split} images"
    return viz.examples(x[wrong], captions, title), f"errors_{job.split}"


_FIGURES = {"filters": _filters, "activations": _activations, "top-patches": _top_patches, "tsne": _tsne,
            "saliency": _saliency, "gradcam": _gradcam, "confusion": _confusion, "errors": _errors}
