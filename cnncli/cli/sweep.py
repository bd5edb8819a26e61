"""`cnncli sweep`: train a grid of recipe variants; `cnncli compare`: tabulate and plot finished runs."""

from pathlib import Path

import typer

from cnncli.cli import app


@app.command()
def sweep(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a bundled recipe."),
    grids: list[str] = typer.Option(..., "--grid", "-g", metavar="KEY=V1,V2,...",
                                    help="A recipe key and its values, e.g. optim.name=sgd,adam (repeatable: "
                                         "the sweep runs every combination)."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a recipe key for every point (repeatable)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Train each point for this many epochs."),
    out: Path = typer.Option(None, "--out", help="Sweep directory (default: runs/sweep_<recipe name>)."),
) -> None:
    """Train every combination of the --grid values, one run after the other, then rank them.

    Each point is an ordinary run directory under the sweep directory; finished points are skipped
    and an interrupted one resumes, so rerunning the same command continues a sweep. When the grid
    varies optim.name but not optim.lr, each optimizer gets its suggested learning rate
    (sgd 0.05, momentum/nesterov/adagrad 0.01, adadelta 1.0, adam/adamw/rmsprop 0.001).
    Prints a table sorted by validation accuracy and writes sweep.json and sweep.png (curves).
    """
    from cnncli import recipe as recipe_lib
    from cnncli.console import TrainDisplay, console, err_console
    from cnncli.sweep import CURVES_PNG, default_out, grid_points, parse_grid, run_sweep
    from cnncli.train.loop import Interrupted

    if epochs is not None:
        overrides = [*overrides, f"train.epochs={epochs}"]
    base = recipe_lib.load(recipe, overrides)
    points = grid_points([parse_grid(g) for g in grids], overrides)
    out = out or default_out(base.name)

    def announce(i, point, status):
        verb = {"done": "finished, skipped", "resume": "resuming", "start": "training"}[status]
        err_console.print(f"[bold][{i + 1}/{len(points)}] {point.name}[/]: {verb}  ({' '.join(point.assignments)})",
                          highlight=False)

    try:
        results = run_sweep(recipe, points, overrides, out, on_point=announce, display_factory=TrainDisplay)
    except Interrupted as e:
        err_console.print(f"sweep interrupted at {e}; run the same command to continue it", highlight=False)
        raise typer.Exit(130) from None
    _report(results, out / CURVES_PNG, f"sweep of {base.name}: {', '.join(g.partition('=')[0] for g in grids)}",
            console)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories."),
    out: Path = typer.Option(Path("compare.png"), "--out", help="PNG of their curves."),
) -> None:
    """Rank runs by validation accuracy and overlay their accuracy and loss curves in one PNG."""
    from cnncli.console import console
    from cnncli.runs import resolve
    from cnncli.sweep import ranked, run_result

    results = ranked([run_result(resolve(path), path.name) for path in runs])
    _report(results, out, "", console)


def _report(results: list[dict], png: Path, title: str, console) -> None:
    """Print the ranking table and write the curves PNG."""
    from rich.table import Table

    from cnncli.viz import plot_curves

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
