"""`cnncli eval`: metrics of a trained run on any split or another dataset source."""

import json
from pathlib import Path

import typer

from cnncli.cli import INSPECT, app

MAX_CONFUSION_CLASSES = 20  # larger confusion matrices are in --json only


@app.command("eval", rich_help_panel=INSPECT)
def eval_command(
    path: Path = typer.Argument(..., help="Run directory (or one checkpoint inside it)."),
    split: str = typer.Option("test", "--split", help="train, val or test."),
    data: str = typer.Option(None, "--data", help="Evaluate on another dataset source with the same classes "
                                                       "[default: the run's own data]."),
    which: str = typer.Option("best", "--checkpoint", help="best or latest checkpoint of the run."),
    head: str = typer.Option("new", "--head", help="new, or old: the head a fine-tuned run kept from its source, "
                                                   "evaluated on the source's data."),
    batch_size: int = typer.Option(1000, "--batch-size", min=1, help="Evaluation batch size."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    ema: bool = typer.Option(False, "--ema", help="Use the EMA weights (runs trained with train.ema)."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average the softmax of each image "
                                                  "and its horizontal flip."),
) -> None:
    """Top-1/top-5 accuracy, loss, per-class accuracy and the confusion matrix of a trained model."""
    from cnncli.console import console, progress_bar
    from cnncli.train.evaluate import evaluate
    from cnncli.train.steps import data_mesh
    from cnncli.train.trained_run import eval_data, load_trained

    trained = load_trained(path, which, ema=ema)
    if head == "old":
        from cnncli.transfer.finetune import old_head_view

        trained = old_head_view(trained)
    elif head != "new":
        from cnncli.errors import UserError

        raise UserError(f"--head must be new or old, got '{head}'")
    x, y, names = eval_data(trained, split, data)
    with progress_bar(f"eval {split}", disable=as_json) as advance:
        result = evaluate(trained.model.eval_def, trained.model.params, trained.model.rest, x, y,
                          trained.class_names, batch_size=batch_size, mesh=data_mesh(), progress=advance, tta=tta)
    result.update(split=split, source=data or trained.recipe.data.source, checkpoint=str(trained.checkpoint),
                  weights="ema" if ema else "raw", tta=tta)
    if as_json:
        print(json.dumps(result))
        return
    render(result, console)


def render(result: dict, console) -> None:
    from rich.table import Table

    extras = [label for label, on in (("EMA weights", result.get("weights") == "ema"), ("flip TTA", result.get("tta")))
              if on]
    title = f"{result['source']} / {result['split']}: {result['n']:,} images"
    head = Table(title=title + (f" ({', '.join(extras)})" if extras else ""), show_header=False)
    head.add_row("top-1 accuracy", f"{result['top1']:.2%}")
    head.add_row(f"top-{result['top_k']} accuracy", f"{result['top5']:.2%}")
    head.add_row("mean loss", f"{result['loss']:.4f}")
    console.print(head)
    per_class = Table(title="per class")
    for column in ("class", "images", "accuracy"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for row in result["per_class"]:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
        per_class.add_row(row["class"], f"{row['n']:,}", acc)
    console.print(per_class)
    if len(result["class_names"]) <= MAX_CONFUSION_CLASSES:
        confusion = Table(title="confusion matrix (rows: true class, columns: predicted)")
        confusion.add_column("")
        for i in range(len(result["class_names"])):
            confusion.add_column(str(i), justify="right")
        for i, (name, row) in enumerate(zip(result["class_names"], result["confusion"])):
            confusion.add_row(f"{i} {name}", *[f"[bold]{v}[/]" if j == i else str(v) for j, v in enumerate(row)])
        console.print(confusion)
