"""`cnncli plot RUN`: learning curves of a run (also while it trains), with a one-line diagnosis."""

from pathlib import Path

import typer

from cnncli.cli import INSPECT, app


@app.command(rich_help_panel=INSPECT)
def plot(
    run: Path = typer.Argument(..., help="Run directory (also while it is training)."),
    out: Path = typer.Option(None, "--out", help="Folder for the PNG [default: RUN/plots]."),
) -> None:
    """Loss and accuracy curves, train vs validation, with a one-line diagnosis (over- or under-fitting)."""
    from cnncli.console import console
    from cnncli.inspect.figures import run_curves
    from cnncli.run.rundir import resolve

    path, diagnosis = run_curves(resolve(run), out)
    console.print(diagnosis, highlight=False, soft_wrap=True)
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)
