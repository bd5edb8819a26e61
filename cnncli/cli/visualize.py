"""`cnncli visualize RUN --what ...`: what the network learned, as PNGs in the run's plots/ folder."""

from pathlib import Path

import typer

from cnncli.cli import INSPECT, app
from cnncli.cli.eval import CLASS_MAP
from cnncli.errors import UserError, suggest

# The names of cnncli.inspect.visualize.FIGURES and its t-SNE sample size, here so that --help imports no jax
# (tests/test_layout.py checks that they agree).
WHATS = ("filters", "activations", "top-patches", "deconv", "tsne", "saliency", "smoothgrad", "guided-backprop",
         "gradcam", "confusion", "errors")
IMAGE_WHATS = ("activations", "saliency", "smoothgrad", "guided-backprop", "gradcam")
TSNE_LIMIT = 2000
NORMALIZE = ("true", "pred", "all")  # the keys of cnncli.inspect.visualize.NORMALIZED


@app.command(rich_help_panel=INSPECT)
def visualize(
    run: Path = typer.Argument(..., help="Run directory (or one checkpoint inside it)."),
    what: str = typer.Option(..., "--what", help=f"One of: {', '.join(WHATS)}."),
    layer: str = typer.Option(None, "--layer", help="Layer name as `cnncli summary` prints it [default: the first "
                                                    "layer with weights (filters), the first layer (activations), "
                                                    "the last convolutional one (top-patches, deconv, "
                                                    "gradcam)]."),
    image: Path = typer.Option(None, "--image", help="An image file for activations, saliency, smoothgrad, "
                                                     "guided-backprop, gradcam [default: images of --split]."),
    n: int = typer.Option(None, "--n", min=1, help="How many filters, feature maps, units (top-patches, deconv: 9) "
                                                   "or images [default: filters, activations 64; top-patches, "
                                                   "deconv 9; saliency, smoothgrad, guided-backprop, gradcam 8; "
                                                   "errors 16]."),
    split: str = typer.Option(None, "--split", help="train, val, test or all [default: test; with --data: test "
                                                    "where the source has one, else all]."),
    data: str = typer.Option(None, "--data", help="Images of another dataset source, e.g. folder:PATH, classes "
                                                  "matched to the run's by name [default: the run's own data]."),
    class_map: str = CLASS_MAP,
    limit: int = typer.Option(None, "--limit", min=1, help=f"Use a random sample of this many images of the split "
                                                           f"[default: all; tsne: {TSNE_LIMIT}]."),
    out: Path = typer.Option(None, "--out", help="Folder for the PNG [default: RUN/plots]."),
    which: str = typer.Option("best", "--checkpoint", help="best or latest checkpoint of the run."),
    ema: bool = typer.Option(False, "--ema", help="Use the EMA weights (runs trained with train.ema)."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per batch in passes over the split."),
    normalize: str = typer.Option(None, "--normalize", help="confusion: divide by the true class (rows: recall on the "
                                                            "diagonal), pred (columns: precision) or all "
                                                            "[default: counts]."),
) -> None:
    """Filters, feature maps, top-9 patches, deconvnet projections, t-SNE, saliency (vanilla, SmoothGrad, guided
    backpropagation), Grad-CAM, confusion or errors of a trained run."""
    from rich.markup import escape

    from cnncli.console import console, err_console
    from cnncli.data.classes import parse_class_map
    from cnncli.inspect import figures
    from cnncli.inspect.interpret import load_model, rows_by_name
    from cnncli.inspect.visualize import FIGURES, Job
    from cnncli.train.trained_run import load_trained

    if what not in WHATS:
        raise UserError(f"--what '{what}' is unknown{suggest(what, WHATS)}; choose one of: {', '.join(WHATS)}")
    if image is not None and what not in IMAGE_WHATS:
        raise UserError(f"--image applies to {', '.join(IMAGE_WHATS)}, not to {what}")
    if normalize is not None and (what != "confusion" or normalize not in NORMALIZE):
        raise UserError(f"--normalize applies to --what confusion and is one of: {', '.join(NORMALIZE)}"
                        + (f"; got '{normalize}'" if what == "confusion" else f", not to {what}"))
    trained = load_trained(run, which, ema=ema)
    model = load_model(trained)
    job = Job(trained, model, rows_by_name(model), layer, image, n, split, limit, batch_size, normalize, data,
              parse_class_map(class_map))
    fig, name = FIGURES[what](job)
    for note in job.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    path = figures.save(fig, (out or trained.run.plots) / f"{name}.png")
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)
