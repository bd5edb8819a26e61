"""`cnncli fine-tune`: adapt a trained model to new data (new head, freezing, LwF)."""

from pathlib import Path

import typer

from cnncli.cli import TRAIN, app
from cnncli.cli.train import BATCH_SIZE, DATA, EPOCHS, LR
from cnncli.errors import UserError

MODES = ("head", "partial", "full", "lwf")


@app.command("fine-tune", rich_help_panel=TRAIN)
def fine_tune(
    source: Path = typer.Argument(None, help="Run directory (or checkpoint) to start from: `cnncli train` or "
                                             "`cnncli import-weights` output."),
    recipe: str = typer.Argument(None, help="Recipe for the new data (file or bundled name); its model section "
                                            "may be left out, its finetune section says how to adapt."),
    mode: str = typer.Option(None, "--mode", help="head, partial, full or lwf [default: the recipe's, else full]."),
    unfreeze_last: int = typer.Option(None, "--unfreeze-last", min=0,
                                      help="Train the last N stages below the head too (implies --mode "
                                           "partial) [default: the recipe's finetune.unfreeze_last]."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a recipe key, e.g. --set finetune.lwf_lambda=2 (repeatable)."),
    epochs: int = EPOCHS,
    data: str = DATA,
    lr: float = LR,
    batch_size: int = BATCH_SIZE,
    run_dir: Path = typer.Option(None, "--run-dir", help="Where to write the run [default: runs/<recipe name>]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the fine-tuning in --run-dir from its last "
                                                        "checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a run directory that holds a run."),
) -> None:
    """Fine-tune a trained model on a recipe's data.

    The head is replaced when the class count changes (or finetune.new_head),
    the rest is loaded; the source's head is kept to report old-task accuracy.

    Modes: head trains the new head only (frozen layers in inference mode);
    partial also the last --unfreeze-last stages; full everything
    (finetune.lr_mult, lr_decay: layer-wise rates); lwf everything, distilling
    the old head's recorded outputs (Learning without Forgetting).
    """
    import json

    from cnncli import recipe as recipe_lib
    from cnncli.cli.train import shortcut_overrides, writing
    from cnncli.recipe import FinetuneConfig
    from cnncli.run import checkpoint
    from cnncli.run.rundir import DEFAULT_ROOT, RunDir, default_run_dir
    from cnncli.train.trained_run import load_trained

    overrides = [*overrides, *shortcut_overrides(epochs=epochs, data=data, lr=lr, batch_size=batch_size)]
    if resume:
        if run_dir is None:
            raise UserError("--resume needs --run-dir pointing at a fine-tuned run")
        if source is not None or recipe is not None or overrides or mode or unfreeze_last is not None:
            raise UserError("--resume continues a run as it was started; give only --run-dir")
        run = RunDir(run_dir)
        if not run.has_run() and checkpoint.read_index(run.checkpoints, quiet=True) is None:
            raise UserError(f"nothing to resume in {run.path}: --resume needs --run-dir pointing at a fine-tuned run")
        with writing(run):
            resolved = checkpoint.read_run_file(run.path, "recipe.yaml",
                                                lambda text: recipe_lib.loads(text, str(run.recipe)), repair=True)
            if resolved.finetune is None or resolved.finetune.source is None:
                raise UserError(f"{run.path} was not made by `cnncli fine-tune`; resume it with `cnncli train "
                                "--resume`")
            checkpoint.read_run_file(run.path, "data.json", json.loads, repair=True)
            trained = load_trained(resolved.finetune.source)
            _fine_tune(trained, resolved, run, resume=True, overwrite=False)
        return
    if source is None or recipe is None:
        raise UserError("give the SOURCE run and the RECIPE of the new data, e.g. "
                        "`cnncli fine-tune runs/base recipes/my_finetune.yaml`")
    trained = load_trained(source)
    defaults = {"model": trained.recipe.model.model_dump(mode="json")}
    resolved = recipe_lib.load(recipe, [*overrides, *_mode_overrides(mode, unfreeze_last)], defaults=defaults)
    # the resolved recipe names its source, so that --resume can rebuild the same fine-tuning
    resolved.finetune = (resolved.finetune or FinetuneConfig()).model_copy(update={"source": str(source.resolve())})
    # runs/NAME, or runs/NAME-2, ... when it holds a run (as `cnncli train`); --run-dir is never changed
    if run_dir is not None or overwrite:
        run = RunDir(run_dir or DEFAULT_ROOT / resolved.name)
    else:
        run = default_run_dir(DEFAULT_ROOT, resolved.name)
    with writing(run):
        run.check_new(overwrite, "`cnncli fine-tune --resume --run-dir DIR`")
        _fine_tune(trained, resolved, run, resume=False, overwrite=overwrite)


def _mode_overrides(mode: str | None, unfreeze_last: int | None) -> list[str]:
    """--mode / --unfreeze-last as recipe overrides (they win over the recipe and --set)."""
    if mode is not None and mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    if unfreeze_last is None:
        return [] if mode is None else [f"finetune.mode={mode}"]
    if mode not in (None, "partial"):
        raise UserError(f"--unfreeze-last applies to --mode partial, not {mode}")
    return ["finetune.mode=partial", f"finetune.unfreeze_last={unfreeze_last}"]


def _fine_tune(trained, recipe, run, *, resume: bool, overwrite: bool) -> None:
    from cnncli.cli.train import print_summary, stopped_message, stopped_outside_steps, write_curves
    from cnncli.console import TrainDisplay, console, err_console
    from cnncli.data.pipeline import load_splits
    from cnncli.interrupts import Interrupt
    from cnncli.train.loop import Interrupted, check_recipe, train
    from cnncli.transfer.finetune import prepare, run_data

    check_recipe(recipe, fine_tuning=True)
    splits = load_splits(recipe.data, recipe.seed)
    tuning = prepare(trained, recipe, splits)  # every check happens here, before anything is written
    err_console.print(f"source {trained.checkpoint} ({trained.recipe.model.name}, {len(trained.class_names)} "
                      f"classes) -> {recipe.data.source}: {splits.num_classes} classes, {len(splits.train_x):,} "
                      f"train / {len(splits.val_x):,} val images", highlight=False)
    err_console.print(tuning.describe(), highlight=False)
    for note in tuning.notes:
        err_console.print(note, highlight=False)
    if overwrite and not resume and run.has_run():
        run.clear()  # the run's own files only, once the data and the source loaded
    if not resume:
        run.write_text(run.recipe, recipe.to_yaml())
        run.write_json(run.data, run_data(trained, recipe, splits, tuning))
    err_console.print(f"run directory: {run.path}", highlight=False)
    try:
        summary = train(recipe, splits, run, resume=resume, display=TrainDisplay(), tune=tuning)
    except Interrupted as e:
        err_console.print(stopped_message(e, f"cnncli fine-tune --resume --run-dir {run.path}"), highlight=False)
        raise typer.Exit(e.exit_code) from None
    except Interrupt as e:  # a signal outside the steps (compiling, the test pass): the last checkpoint stands
        err_console.print(stopped_outside_steps(e, f"cnncli fine-tune --resume --run-dir {run.path}"),
                          highlight=False)
        raise typer.Exit(e.exit_code) from None
    print_summary(summary, console)
    write_curves(run)
    old = summary.get("old_task_test")
    if old is not None:
        console.print(f"old task ({len(trained.class_names)} classes, old head): test top-1 {old['top1']:.2%} "
                      f"(before fine-tuning {old['top1_before']:.2%}); `cnncli eval {run.path} --head old`",
                      highlight=False)
