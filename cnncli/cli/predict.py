"""`cnncli predict RUN IMAGE...`: the most probable classes of image files (one, or a folder of thousands)."""

from pathlib import Path

import typer

from cnncli.cli import INSPECT, app

# More images than this are summarized by class instead of listed (--out or --json lists every one).
MAX_LISTED = 50


@app.command(rich_help_panel=INSPECT)
def predict(
    run: Path = typer.Argument(..., help="Run directory (or one checkpoint inside it)."),
    images: list[str] = typer.Argument(..., help="Image files (png, jpg, ...), folders (searched recursively) or "
                                                 "quoted glob patterns ('photos/**/*.jpg'); resized and converted "
                                                 "to the model's input."),
    top: int = typer.Option(5, "--top", min=1, help="How many classes to show per image."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images decoded and predicted at a time."),
    out: Path = typer.Option(None, "--out", help="File for every prediction: .csv (image, class_1, "
                                                 "probability_1, ...) or .json [default: none; a table]."),
    which: str = typer.Option("best", "--checkpoint", help="best or latest checkpoint of the run."),
    ema: bool = typer.Option(False, "--ema", help="Use the EMA weights (runs trained with train.ema)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list: {image, top: [{class, index, "
                                                       "probability}]} per image."),
) -> None:
    """Class probabilities of image files under a trained model (top-k per image), for one image or thousands.

    When `cnncli eval --temperature` has fitted a temperature for this checkpoint, the probabilities
    are those of the calibrated model (the ranking is the same).
    """
    from cnncli.console import console, progress_bar, to_json
    from cnncli.inspect.predict import check_out, find_images, predict_files, write_predictions
    from cnncli.train.trained_run import load_trained

    check_out(out)
    paths = find_images(images)
    trained = load_trained(run, which, ema=ema)
    with progress_bar(f"predict {len(paths):,} images", disable=as_json) as advance:
        results = list(predict_files(trained, paths, top=top, batch_size=batch_size, progress=advance))
    if out is not None:
        write_predictions(results, out)
        if not as_json:
            console.print(f"wrote {len(results):,} predictions to {out}", highlight=False, soft_wrap=True)
    if as_json:
        print(to_json(results))
    elif len(results) <= MAX_LISTED:
        _render(results)
    else:
        _render_counts(results, out)


def _render(results: list[dict]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from cnncli.console import console

    table = Table(title="predictions")
    for column, justify in (("image", "left"), ("rank", "right"), ("class", "left"), ("probability", "right")):
        table.add_column(column, justify=justify)
    for result in results:
        for rank, entry in enumerate(result["top"], start=1):
            image = escape(result["image"]) if rank == 1 else ""
            style = "bold" if rank == 1 else None
            table.add_row(image, str(rank), escape(entry["class"]), f"{entry['probability']:.2%}", style=style)
        table.add_section()
    console.print(table)


def _render_counts(results: list[dict], out: Path | None) -> None:
    from collections import Counter

    from rich.markup import escape
    from rich.table import Table

    from cnncli.console import console

    counts = Counter(r["top"][0]["class"] for r in results)
    table = Table(title=f"{len(results):,} images by most probable class")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    for name, n in counts.most_common():
        table.add_row(escape(name), f"{n:,}", f"{n / len(results):.1%}")
    console.print(table)
    if out is None:
        console.print("every image's top classes: --out predictions.csv (or .json)", highlight=False)
