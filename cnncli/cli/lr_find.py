"""`cnncli lr-find RECIPE`: the learning-rate range test, a suggested lr and the loss-vs-lr figure."""

from pathlib import Path

import typer

from cnncli.cli import TOOLS, app


@app.command("lr-find", rich_help_panel=TOOLS)
def lr_find(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a bundled recipe."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a recipe key, e.g. --set optim.name=sgd (repeatable)."),
    start_lr: float = typer.Option(1e-7, "--start-lr", help="First learning rate of the sweep."),
    end_lr: float = typer.Option(10.0, "--end-lr", help="Last learning rate (if the loss has not diverged before)."),
    steps: int = typer.Option(100, "--steps", min=10, help="Training steps, one learning rate each."),
    out: Path = typer.Option(None, "--out", help="PNG of loss against lr [default: lr_find_NAME.png]."),
    as_json: bool = typer.Option(False, "--json", help="Print the lrs, losses and suggestions as one JSON object."),
) -> None:
    """Train a fresh model of the recipe for --steps steps while the learning rate grows exponentially,
    stop when the smoothed loss diverges (4x its minimum), and suggest a learning rate.

    The loss is smoothed over one decade of lr (a running median, robust to single bad batches, then
    a running mean). The suggestion is the middle (geometric mean) of its descent: between the
    steepest descent and the minimum of the smoothed loss, which are printed beside it with fastai's
    valley. The recipe's optimizer, augmentation and loss are used, its schedule is not; the
    suggestion is for 100 steps (more steps shift the whole curve to lower lrs). Nothing is written
    but the figure: no run directory.
    """

    from rich.table import Table

    from cnncli import recipe as recipe_lib
    from cnncli.console import console, progress_bar, to_json
    from cnncli.data.pipeline import load_splits
    from cnncli.inspect import figures
    from cnncli.tools.lr_find import range_test
    from cnncli.train.loop import check_recipe

    resolved = recipe_lib.load(recipe, overrides)
    check_recipe(resolved)
    splits = load_splits(resolved.data, resolved.seed)
    with progress_bar("lr range test", disable=as_json) as advance:
        result = range_test(resolved, splits, start=start_lr, end=end_lr, steps=steps, progress=advance)
    suggestions = result.suggestions()
    out = out or Path(f"lr_find_{resolved.name}.png")
    where = "the loss diverged" if result.stopped == "diverged" else "the last lr"
    title = (f"{resolved.name} ({resolved.model.name}, {resolved.optim.name}, batch {resolved.train.batch_size}): "
             f"{len(result.lrs)} steps, {result.lrs[0]:.0e} to {result.lrs[-1]:.1e} ({where})")
    figures.save(figures.lr_range_test(result.lrs, result.losses, result.smoothed, suggestions, title), out)
    if as_json:
        print(to_json({**result.to_dict(), "figure": str(out)}))
        return
    if not suggestions:
        console.print(f"no descent of the loss to read a learning rate from ({len(result.lrs)} steps, "
                      f"{result.lrs[0]:.0e} to {result.lrs[-1]:.1e}); lower --start-lr or raise --steps",
                      highlight=False)
    else:
        table = Table(title=f"{resolved.name}: learning-rate range test ({len(result.lrs)} steps, stopped at {where})")
        table.add_column("suggestion")
        table.add_column("lr", justify="right")
        for name, text in (("suggested", "middle of the descent (suggested)"),
                           ("steepest", "steepest descent of the smoothed loss"),
                           ("minimum", "minimum of the smoothed loss (the edge)"),
                           ("valley", "valley (fastai's rule, on its 0.98 moving average)")):
            table.add_row(text, f"{suggestions[name]:.2e}", style="bold" if name == "suggested" else None)
        console.print(table)
        console.print(f"suggested: --set optim.lr={suggestions['suggested']:.2g}", highlight=False)
    console.print(f"wrote {out}", highlight=False)
