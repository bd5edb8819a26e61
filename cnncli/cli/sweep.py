"""`cnncli sweep`: train a grid of recipe variants, then rank them as `cnncli compare` does."""

from pathlib import Path

import typer

from cnncli.cli import TRAIN, app
from cnncli.cli.compare import report


@app.command(rich_help_panel=TRAIN)
def sweep(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a bundled recipe."),
    grids: list[str] = typer.Option(..., "--grid", "-g", metavar="KEY=V1,V2,...",
                                    help="A recipe key and its values, e.g. optim.name=sgd,adam (repeatable: "
                                         "the sweep runs every combination)."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a recipe key for every point (repeatable)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Train each point for this many epochs [default: the "
                                                                  "recipe's]."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Sweep directory, one run directory per point inside "
                                                     "[default: runs/sweep_<recipe name>]."),
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
    from cnncli.tools.sweep import CURVES_PNG, default_out, grid_points, parse_grid, run_sweep
    from cnncli.train.loop import Interrupted

    if epochs is not None:
        overrides = [*overrides, f"train.epochs={epochs}"]
    base = recipe_lib.load(recipe, overrides)
    points = grid_points([parse_grid(g) for g in grids], overrides)
    out = run_dir or default_out(base.name)

    def announce(i, point, status):
        verb = {"done": "finished, skipped", "resume": "resuming", "start": "training"}[status]
        err_console.print(f"[bold][{i + 1}/{len(points)}] {point.name}[/]: {verb}  ({' '.join(point.assignments)})",
                          highlight=False)

    try:
        results = run_sweep(recipe, points, overrides, out, on_point=announce, display_factory=TrainDisplay)
    except Interrupted as e:
        err_console.print(f"sweep stopped by {e.by} at {e}; run the same command to continue it", highlight=False)
        raise typer.Exit(e.exit_code) from None
    keys = tuple(g.partition("=")[0].strip() for g in grids)
    report(results, out / CURVES_PNG, f"sweep of {base.name}: {', '.join(keys)}", console, labelled=keys)
