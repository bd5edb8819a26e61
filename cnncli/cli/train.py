"""`cnncli train`: train a model from a YAML recipe into a run directory."""

from pathlib import Path

import typer

from cnncli.cli import app
from cnncli.errors import UserError


@app.command()
def train(
    recipe: str = typer.Argument(None, help="Recipe file, or the name of a bundled recipe (see `cnncli recipes`)."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a recipe key, e.g. --set optim.lr=0.05 (repeatable)."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Where to write the run (default: runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a run directory that holds a run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and model size; train nothing."),
) -> None:
    """Train a CNN from a recipe: progress, validation each epoch, checkpoints, test accuracy at the end.

    Ctrl-C saves a checkpoint and stops; `--resume` continues exactly where it stopped.
    """
    from cnncli import recipe as recipe_lib
    from cnncli.runs import DEFAULT_ROOT, RunDir

    if resume:
        run = RunDir(run_dir or (DEFAULT_ROOT / recipe_lib.load(_require(recipe), overrides).name))
        if not run.recipe.is_file():
            raise UserError(f"nothing to resume in {run.path}: it holds no run; start the run without --resume")
        if overrides:
            raise UserError("--set cannot change a run being resumed; start a new run (--run-dir) instead")
        resolved = recipe_lib.load(run.recipe)
    else:
        resolved = recipe_lib.load(_require(recipe), overrides)
        run = RunDir(run_dir or DEFAULT_ROOT / resolved.name)
        if run.has_run() and not (overwrite or dry_run):
            raise UserError(f"{run.path} already holds a run: --resume to continue it, --overwrite to start over, "
                            "or --run-dir for another directory")
    _train(resolved, run, resume=resume, overwrite=overwrite, dry_run=dry_run)


def _require(recipe: str | None) -> str:
    if recipe is None:
        raise UserError("give a recipe (a YAML file or a bundled recipe name); see `cnncli recipes`")
    return recipe


def _train(recipe, run, *, resume: bool, overwrite: bool, dry_run: bool) -> None:
    import shutil

    from cnncli.console import TrainDisplay, console, err_console
    from cnncli.data.pipeline import load_splits
    from cnncli.train.loop import Interrupted, build, check_recipe, start_run, train

    check_recipe(recipe)
    splits = load_splits(recipe.data, recipe.seed)
    model = build(recipe, splits.image_shape, splits.num_classes, splits.mean, splits.std)
    h, w, c = splits.image_shape
    model_line = (f"{recipe.model.name}: {model.num_params:,} parameters, input {h}x{w}x{c}, "
                  f"{splits.num_classes} classes; data {recipe.data.source}: {len(splits.train_x):,} train / "
                  f"{len(splits.val_x):,} val / {0 if splits.test_x is None else len(splits.test_x):,} test")
    if dry_run:
        console.print(recipe.to_yaml(), highlight=False, markup=False)
        console.print(model_line, highlight=False)
        return
    if overwrite and run.path.exists() and not resume:
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    if not resume:
        start_run(recipe, splits, run)
    err_console.print(model_line, highlight=False)
    err_console.print(f"run directory: {run.path}", highlight=False)
    try:
        summary = train(recipe, splits, run, resume=resume, display=TrainDisplay())
    except Interrupted as e:
        err_console.print(f"interrupted at {e}: checkpoint saved; continue with "
                          f"`cnncli train --resume --run-dir {run.path}`", highlight=False)
        raise typer.Exit(130) from None
    _print_summary(summary, console)


def _print_summary(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['name']}: results", show_header=False)
    table.add_row("best epoch", str(summary["best_epoch"]))
    if summary.get("stopped"):
        how = "early stopping" if summary["stopped"] == "early" else "Ctrl-C"
        table.add_row("stopped", f"by {how} after {summary['epochs_run']} epochs")
    if summary.get("best_val_acc") is not None:
        table.add_row("validation accuracy", f"{summary['best_val_acc']:.2%}")
    if summary.get("best_val_robust_acc") is not None:
        table.add_row("validation robust accuracy", f"{summary['best_val_robust_acc']:.2%}")
    if "test" in summary:
        test = summary["test"]
        table.add_row("test top-1", f"{test['top1']:.2%}")
        table.add_row(f"test top-{test['top_k']}", f"{test['top5']:.2%}")
        table.add_row("test loss", f"{test['loss']:.4f}")
    if "test_ema" in summary:
        table.add_row("test top-1 (EMA weights)", f"{summary['test_ema']['top1']:.2%}")
    table.add_row("training time", f"{summary['train_seconds']:.1f} s")
    console.print(table)
