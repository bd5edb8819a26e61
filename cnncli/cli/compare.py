"""`cnncli compare RUN...`: rank finished runs by validation accuracy and overlay their curves."""

from pathlib import Path

import typer

from cnncli.cli import INSPECT, app


@app.command(rich_help_panel=INSPECT)
def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories."),
    out: Path = typer.Option(Path("compare.png"), "--out", help="PNG of their curves."),
) -> None:
    """Rank runs by validation accuracy and overlay their accuracy and loss curves in one PNG."""
    from cnncli.console import console
    from cnncli.run.rundir import resolve
    from cnncli.tools.sweep import ranked, run_result

    results = ranked([run_result(resolve(path), path.name) for path in runs])
    report(results, out, "", console)


def report(results: list[dict], png: Path, title: str, console) -> None:
    """Print the ranking table and write the curves PNG."""
    from rich.table import Table

    from cnncli.inspect.figures import plot_curves

    table = Table(title=title or None)
    table.add_column("run", no_wrap=True)
    for column in ("lr", "epochs", "best val", "at epoch", "train acc", "test acc", "time"):
        table.add_column(column, justify="right")

    def pct(x):
        return "-" if x is None else f"{x:.2%}"

    for r in results:
        table.add_row(r["run"], "-" if r["lr"] is None else f"{r['lr']:g}", str(r["epochs"]), pct(r["best_val_acc"]),
                      str(r["best_epoch"] or "-"), pct(r["final_train_acc"]), pct(r["test_acc"]),
                      f"{r['train_seconds']:.0f} s")
    console.print(table)
    plot_curves([(r["run"], r["rows"]) for r in results if r["rows"]], png, title)
    console.print(f"curves: {png}", highlight=False)
