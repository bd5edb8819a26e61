"""`cnncli compare RUN...`: rank finished runs by validation accuracy and overlay their curves."""

from pathlib import Path

import typer

from cnncli.cli import INSPECT, app


@app.command(rich_help_panel=INSPECT)
def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories."),
    out: Path = typer.Option(Path("compare.png"), "--out", help="PNG of their curves."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (the runs, their results and the "
                                                       "recipe keys that differ) instead of the table."),
) -> None:
    """Rank runs by validation accuracy, show the recipe keys that differ, overlay their curves in one PNG."""
    from cnncli.console import console
    from cnncli.run.rundir import resolve
    from cnncli.tools.sweep import ranked, run_labels, run_result

    results = ranked([run_result(resolve(path), label) for path, label in zip(runs, run_labels(runs))])
    report(results, out, "", console, as_json=as_json)


# Columns of the differing recipe keys shown in the table (all of them are in --json).
MAX_KEY_COLUMNS = 6


def report(results: list[dict], png: Path, title: str, console, *, as_json: bool = False,
           labelled: tuple[str, ...] = ()) -> None:
    """Print the ranking table (one column per recipe key that differs between the runs, except the `labelled`
    ones the run labels already show) and write the PNG."""
    from rich.markup import escape
    from rich.table import Table

    from cnncli.console import to_json
    from cnncli.inspect.figures import plot_curves
    from cnncli.tools.sweep import differing_keys

    keys = differing_keys(results)
    plot_curves([(r["run"], r["rows"]) for r in results if r["rows"]], png, title)
    if as_json:
        print(to_json({"differing_keys": keys, "curves": str(png), "runs": [
            {**{k: v for k, v in r.items() if k not in ("rows", "recipe")},
             "differs": {k: _value(r["recipe"], k) for k in keys}} for r in results]}))
        return
    table = Table(title=title or None)
    table.add_column("run", no_wrap=True)
    shown = [k for k in keys if k not in labelled][:MAX_KEY_COLUMNS]
    last = [k.rpartition(".")[2] for k in shown]  # optim.lr -> lr, where that is unambiguous
    headers = [short if last.count(short) == 1 else key for key, short in zip(shown, last)]
    for column in (*headers, "epochs", "best val", "at epoch", "train acc", "test acc", "time"):
        table.add_column(column, justify="right")

    def pct(x):
        return "-" if x is None else f"{x:.2%}"

    for r in results:
        table.add_row(escape(r["run"]), *[escape(_text(_value(r["recipe"], k))) for k in shown], str(r["epochs"]),
                      pct(r["best_val_acc"]), str(r["best_epoch"] or "-"), pct(r["final_train_acc"]),
                      pct(r["test_acc"]), f"{r['train_seconds']:.0f} s")
    console.print(table)
    hidden = [k for k in keys if k not in shown and k not in labelled]
    if hidden:
        console.print(f"also differ: {', '.join(hidden)} (see --json)", highlight=False)
    elif not keys and len(results) > 1:
        console.print("the runs' recipes are the same (their names aside)", highlight=False)
    console.print(f"curves: {png}", highlight=False)


def _value(recipe: dict | None, key: str):
    node = recipe
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _text(value) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)
