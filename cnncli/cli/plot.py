"""`cnncli plot RUN`: learning curves of a run (also while it trains), with a one-line diagnosis."""

from pathlib import Path

import typer

from cnncli.cli import INSPECT, app
from cnncli.errors import UserError


@app.command(rich_help_panel=INSPECT)
def plot(
    run: Path = typer.Argument(..., help="Run directory (also while it is training)."),
    out: Path = typer.Option(None, "--out", help="Folder for the PNG [default: RUN/plots]."),
) -> None:
    """Loss and accuracy curves, train vs validation, with a one-line diagnosis (over- or under-fitting)."""
    from cnncli.console import console
    from cnncli.inspect import figures
    from cnncli.inspect.interpret import diagnose
    from cnncli.run.rundir import resolve

    run_dir = resolve(run)
    rows = run_dir.read_metrics()
    if not rows:
        raise UserError(f"{run_dir.path} has no finished epoch yet (no rows in {run_dir.metrics.name}); "
                        "plot again after the first epoch")
    diagnosis = diagnose(rows)
    epochs = _planned_epochs(run_dir)
    progress = f" (epoch {rows[-1]['epoch']} of {epochs}, in progress)" if epochs and rows[-1]["epoch"] < epochs else ""
    path = (out or run_dir.plots) / "curves.png"
    figures.plot_curves([(run_dir.path.name, rows)], path, title=f"{run_dir.path.name}{progress}\n{diagnosis}")
    console.print(diagnosis, highlight=False, soft_wrap=True)
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def _planned_epochs(run_dir) -> int | None:
    from cnncli import recipe as recipe_lib

    if not run_dir.recipe.is_file():
        return None
    return recipe_lib.load(run_dir.recipe).train.epochs
