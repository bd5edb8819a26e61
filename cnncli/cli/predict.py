"""`cnncli predict RUN IMAGE...`: the most probable classes of image files, as on the slides."""

import json
from pathlib import Path

import typer

from cnncli.cli import INSPECT, app


@app.command(rich_help_panel=INSPECT)
def predict(
    run: Path = typer.Argument(..., help="Run directory (or one checkpoint inside it)."),
    images: list[Path] = typer.Argument(..., help="Image files (png, jpg, ...); resized and converted to the "
                                                  "model's input."),
    top: int = typer.Option(5, "--top", min=1, help="How many classes to show per image."),
    which: str = typer.Option("best", "--checkpoint", help="best or latest checkpoint of the run."),
    ema: bool = typer.Option(False, "--ema", help="Use the EMA weights (runs trained with train.ema)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list: {image, top: [{class, index, "
                                                       "probability}]} per image."),
) -> None:
    """Class probabilities of image files under a trained model (top-k per image).

    When `cnncli eval --temperature` has fitted a temperature for this checkpoint, the probabilities
    are those of the calibrated model (the ranking is the same).
    """
    from cnncli.inspect.interpret import load_model, probabilities, read_images, top_k
    from cnncli.train.trained_run import load_trained

    trained = load_trained(run, which, ema=ema)
    x = read_images(images, trained.image_shape)
    indices, probs = top_k(probabilities(load_model(trained), x, temperature=trained.temperature), top)
    names = trained.class_names
    results = [{"image": str(path), "top": [{"class": names[j], "index": int(j), "probability": float(p)}
                                            for j, p in zip(idx, ps)]}
               for path, idx, ps in zip(images, indices, probs)]
    if as_json:
        print(json.dumps(results))
        return
    _render(results)


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
