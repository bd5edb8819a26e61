"""`cnncli eval`: metrics of a trained run on any split or another dataset source."""

from pathlib import Path

import typer

from cnncli.cli import INSPECT, app

MAX_CONFUSION_CLASSES = 20  # larger confusion matrices are in --json only

# --class-map of every command that takes --data (eval, adversarial, visualize)
CLASS_MAP = typer.Option(None, "--class-map", metavar="DATA=RUN,...|FILE",
                         help="With --data: map the source's class names to the run's where they differ, e.g. "
                              "'tshirt=T-shirt/top,other=-' ('-' leaves a class out, '*=-' every class the run "
                              "lacks), or a YAML file of that mapping [default: match by name].")


@app.command("eval", rich_help_panel=INSPECT)
def eval_command(
    path: Path = typer.Argument(..., help="Run directory (or one checkpoint inside it)."),
    split: str = typer.Option(None, "--split", help="train, val, test, or all (every image) [default: test; with "
                                                    "--data: test where the source has one, else all]."),
    data: str = typer.Option(None, "--data", help="Evaluate on another dataset source, e.g. folder:PATH; its classes "
                                                  "are matched to the run's by name (any order, a subset is fine) "
                                                  "[default: the run's own data]."),
    class_map: str = CLASS_MAP,
    which: str = typer.Option("best", "--checkpoint", help="best or latest checkpoint of the run."),
    head: str = typer.Option("new", "--head", help="new, or old: the head a fine-tuned run kept from its source, "
                                                   "evaluated on the source's data."),
    batch_size: int = typer.Option(1000, "--batch-size", min=1, help="Evaluation batch size."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    ema: bool = typer.Option(False, "--ema", help="Use the EMA weights (runs trained with train.ema)."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation: average the softmax of each image "
                                                  "and its horizontal flip (for runs trained with hflip; others "
                                                  "get a warning)."),
    calibration: bool = typer.Option(False, "--calibration", help="Also report the expected calibration error "
                                                                  "(15 equal-width bins, top label) and write a "
                                                                  "reliability diagram to RUN/plots."),
    temperature: bool = typer.Option(False, "--temperature", help="Fit temperature scaling on the validation split, "
                                                                  "store it in the run for `cnncli predict`, and "
                                                                  "report ECE and NLL before and after "
                                                                  "(implies --calibration)."),
) -> None:
    """Top-1/top-5 accuracy, loss, per-class precision/recall/F1, the confusion matrix and its most-confused pairs."""
    from rich.markup import escape

    from cnncli.console import console, err_console, progress_bar, to_json
    from cnncli.data.classes import parse_class_map
    from cnncli.train.evaluate import evaluate
    from cnncli.train.steps import data_mesh
    from cnncli.train.toolbox import tta_warning
    from cnncli.train.trained_run import eval_data, eval_stream_data, load_trained, old_head_view

    trained = load_trained(path, which, ema=ema)
    if head == "old":
        trained = old_head_view(trained)
    elif head != "new":
        from cnncli.errors import UserError

        raise UserError(f"--head must be new or old, got '{head}'")
    warning = tta_warning(trained.recipe) if tta else None
    if warning:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    streamed = None
    if data is None and class_map is None and split != "all" and not (calibration or temperature):
        streamed = eval_stream_data(trained)
    if streamed is not None:  # the run's data streams: read from disk batch by batch, never the whole split
        from cnncli.train.evaluate import eval_batch
        from cnncli.train.streamed import evaluate_split

        split = split or "test"
        mesh = data_mesh()
        batch = eval_batch(len(streamed.split_ids(split)[0]), batch_size, mesh)
        with progress_bar(f"eval {split}", disable=as_json) as advance:
            (result,) = evaluate_split(trained.model.eval_def, [(trained.model.params, trained.model.rest)], streamed,
                                       split, batch_size=batch, mesh=mesh, seed=trained.recipe.seed, progress=advance,
                                       tta=tta)
    else:
        chosen = eval_data(trained, split, data, parse_class_map(class_map))
        for note in chosen.notes:
            err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
        split = chosen.split
        with progress_bar(f"eval {chosen.split}", disable=as_json) as advance:
            result = evaluate(trained.model.eval_def, trained.model.params, trained.model.rest, chosen.x, chosen.y,
                              trained.class_names, batch_size=batch_size, mesh=data_mesh(), progress=advance, tta=tta)
    result.update(split=split, source=data or trained.recipe.data.source, checkpoint=str(trained.checkpoint),
                  weights="ema" if ema else "raw", tta=tta)
    if calibration or temperature:
        from cnncli.inspect.calibration import calibrate

        with progress_bar(f"calibration {chosen.split}", disable=as_json) as advance:
            result["calibration"] = calibrate(trained, chosen.x, chosen.y, split=chosen.split,
                                              out_dir=trained.run.plots, fit=temperature, tta=tta,
                                              batch_size=batch_size, progress=advance)
    if as_json:
        print(to_json(result))
        return
    render(result, console)


def render(result: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    extras = [label for label, on in (("EMA weights", result.get("weights") == "ema"), ("flip TTA", result.get("tta")))
              if on]
    title = f"{result['source']} / {result['split']}: {result['n']:,} images"
    head = Table(title=title + (f" ({', '.join(extras)})" if extras else ""), show_header=False)
    head.add_row("top-1 accuracy", f"{result['top1']:.2%}")
    head.add_row(f"top-{result['top_k']} accuracy", f"{result['top5']:.2%}")
    head.add_row("mean loss", f"{result['loss']:.4f}")
    console.print(head)
    console.print(_per_class_table(result))
    if len(result["class_names"]) <= MAX_CONFUSION_CLASSES:
        confusion = Table(title="confusion matrix (rows: true class, columns: predicted)")
        confusion.add_column("")
        for i in range(len(result["class_names"])):
            confusion.add_column(str(i), justify="right")
        for i, (name, row) in enumerate(zip(result["class_names"], result["confusion"])):
            confusion.add_row(f"{i} {name}", *[f"[bold]{v}[/]" if j == i else str(v) for j, v in enumerate(row)])
        console.print(confusion)
    if result["most_confused"]:
        pairs = Table(title="most confused (true -> predicted)")
        for column in ("true class", "predicted as", "images", "share of the class"):
            pairs.add_column(column, justify="right" if column in ("images", "share of the class") else "left")
        for pair in result["most_confused"]:
            pairs.add_row(escape(pair["true"]), escape(pair["predicted"]), f"{pair['count']:,}", f"{pair['share']:.1%}")
        console.print(pairs)
    if "calibration" in result:
        _render_calibration(result["calibration"], console)


def _per_class_table(result: dict):
    from rich.markup import escape
    from rich.table import Table

    def score(value):
        return "-" if value is None else f"{value:.4f}"

    report = result["report"]
    table = Table(title="per class (precision, recall and F1 as sklearn's classification_report)")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in report["classes"]:
        table.add_row(escape(row["class"]), score(row["precision"]), score(row["recall"]), score(row["f1"]),
                      f"{row['support']:,}")
    table.add_section()
    for name in ("macro", "weighted"):
        avg = report[name]
        table.add_row(f"{name} avg", score(avg["precision"]), score(avg["recall"]), score(avg["f1"]),
                      f"{avg['support']:,}", style="bold")
    return table


def _render_calibration(cal: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"calibration ({cal['raw']['bins']} equal-width bins, top label)")
    for column in ("", "temperature", "ECE", "NLL", "mean confidence", "accuracy"):
        table.add_column(column, justify="left" if not column else "right")
    rows = [("raw", cal["raw"])] + ([("scaled", cal["scaled"])] if "scaled" in cal else [])
    for label, r in rows:
        table.add_row(label, f"{r['temperature']:.4f}", f"{r['ece']:.2%}", f"{r['nll']:.4f}",
                      f"{r['mean_confidence']:.2%}", f"{r['accuracy']:.2%}")
    console.print(table)
    if "fit" in cal:
        fit = cal["fit"]
        console.print(f"temperature {fit['temperature']:.4f} fitted on {fit['n']:,} validation images "
                      f"(val NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f}, ECE {fit['ece_before']:.2%} -> "
                      f"{fit['ece_after']:.2%}); stored in the run for `cnncli predict`", highlight=False,
                      soft_wrap=True)
    console.print(f"wrote {cal['figure']}", highlight=False, soft_wrap=True)
