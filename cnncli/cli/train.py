"""`cnncli train`: train a model from a YAML recipe into a run directory."""

from contextlib import contextmanager
from pathlib import Path

import typer

from cnncli.cli import TRAIN, app
from cnncli.errors import UserError

MANY_HOSTS = "Many hosts"  # the help panel of the multi-process flags
EXTENDABLE = "train.epochs"  # the one recipe key `--resume` accepts: a run can be extended
FOUND_BY_JAX = "[default: found by JAX under Slurm, Open MPI or on a TPU pod, else one process]"

# Shortcuts for the recipe keys changed most often (train and fine-tune); they win over --set.
EPOCHS = typer.Option(None, "--epochs", min=1, help="Shortcut for --set train.epochs=N [default: the recipe's].")
DATA = typer.Option(None, "--data", help="Shortcut for --set data.source=SOURCE, e.g. digits or folder:PATH "
                                         "[default: the recipe's].")
LR = typer.Option(None, "--lr", help="Shortcut for --set optim.lr=LR [default: the recipe's].")
BATCH_SIZE = typer.Option(None, "--batch-size", min=1, help="Shortcut for --set train.batch_size=N "
                                                            "[default: the recipe's].")


@app.command(rich_help_panel=TRAIN)
def train(
    recipe: str = typer.Argument(None, help="Recipe file, or the name of a bundled recipe (see `cnncli recipes`)."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a recipe key, e.g. --set optim.lr=0.05 (repeatable)."),
    epochs: int = EPOCHS,
    data: str = DATA,
    lr: float = LR,
    batch_size: int = BATCH_SIZE,
    run_dir: Path = typer.Option(None, "--run-dir", help="Where to write the run [default: runs/<recipe name>]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a run directory that holds a run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and model size; train nothing."),
    coordinator: str = typer.Option(
        None, "--coordinator", metavar="HOST:PORT", rich_help_panel=MANY_HOSTS,
        help="Address where process 0 listens for the others; the same on every process " + FOUND_BY_JAX + "."),
    num_processes: int = typer.Option(
        None, "--num-processes", metavar="N", rich_help_panel=MANY_HOSTS,
        help="How many processes (typically one per host) train together; the same on every process "
             + FOUND_BY_JAX + "."),
    process_id: int = typer.Option(
        None, "--process-id", metavar="I", rich_help_panel=MANY_HOSTS,
        help="This process's number, 0 to N-1; process 0 writes the run directory and prints progress "
             + FOUND_BY_JAX + "."),
) -> None:
    """Train a CNN from a recipe: progress, validation each epoch, checkpoints, test accuracy at the end.

    Ctrl-C saves a checkpoint and stops; `--resume` continues exactly where it stopped.

    Many hosts: start the same command on every host with the same --coordinator and --num-processes
    and each host's own --process-id; the batch (train.batch_size, the global batch) is sharded over
    all their devices. Under Slurm, Open MPI or on a TPU pod, JAX finds these values by itself.
    """
    from cnncli import recipe as recipe_lib
    from cnncli.run import distributed
    from cnncli.run.rundir import DEFAULT_ROOT, RunDir, default_run_dir, latest_run_dir

    overrides = [*overrides, *shortcut_overrides(epochs=epochs, data=data, lr=lr, batch_size=batch_size)]
    distributed.initialize(coordinator, num_processes, process_id)  # before anything touches a device
    extended_from, default_dir = None, run_dir is None and not resume
    if resume:
        # without --run-dir: the newest of runs/NAME, runs/NAME-2, ... (process 0 looks, the others follow)
        run = RunDir(run_dir or distributed.agree(
            lambda: str(latest_run_dir(DEFAULT_ROOT, recipe_lib.load(_require(recipe)).name).path)))
    else:
        resolved = recipe_lib.load(_require(recipe), overrides)
        if run_dir is None and not overwrite:
            # runs/NAME, or runs/NAME-2, ... when it holds a run; an explicit --run-dir is never changed
            run_dir = distributed.agree(lambda: str(default_run_dir(DEFAULT_ROOT, resolved.name).path))
        run = RunDir(run_dir or DEFAULT_ROOT / resolved.name)
    if dry_run and not resume:
        _train(resolved, run, resume=False, overwrite=False, dry_run=True, default_dir=default_dir)
        return
    with writing(run):
        if resume:
            # process 0 reads the run directory (the other hosts need not see it) and hands out the recipe
            raw, extended_from = distributed.agree(lambda: _resumable(run, overrides))
            resolved = recipe_lib.validate(raw, source=str(run.recipe))
        else:
            distributed.agree(lambda: run.check_new(overwrite, "--resume"))
        _train(resolved, run, resume=resume, overwrite=overwrite, dry_run=dry_run, extended_from=extended_from,
               default_dir=default_dir)


@contextmanager
def writing(run):
    """Hold the run directory's lock (process 0 takes it, a refusal stops every process): one writer."""
    from cnncli.run import distributed
    from cnncli.run.rundir import RunLock

    lock = RunLock(run.path)
    distributed.agree(lock.acquire)
    try:
        yield
    finally:
        lock.release()


def shortcut_overrides(*, epochs: int | None, data: str | None, lr: float | None, batch_size: int | None) -> list[str]:
    """The --epochs / --data / --lr / --batch-size shortcuts as `--set` overrides (applied after the --set ones)."""
    pairs = (("train.epochs", epochs), ("data.source", data), ("optim.lr", lr), ("train.batch_size", batch_size))
    return [f"{key}={value}" for key, value in pairs if value is not None]


def _resumable(run, overrides: list[str]) -> tuple[dict, int | None]:
    """The recipe of the run to resume in `run` (as JSON), and its epochs before an extension (None if none);
    its recipe.yaml and data.json are repaired from a checkpoint's copy when missing or damaged.

    `--set train.epochs=N` (or --epochs N) extends a run, finished or not, to N epochs; nothing else may change.
    """
    import json

    from cnncli import recipe as recipe_lib
    from cnncli.run import checkpoint

    if not run.has_run() and checkpoint.read_index(run.checkpoints, quiet=True) is None:
        raise UserError(f"nothing to resume in {run.path}: it holds no run; start the run without --resume")
    keys = {o.partition("=")[0].strip() for o in overrides}
    if keys - {EXTENDABLE}:
        raise UserError(f"--set {', '.join(sorted(keys - {EXTENDABLE}))} cannot change a run being resumed (only "
                        f"{EXTENDABLE} may grow, to extend it); start a new run (--run-dir) instead")
    if run.checkpoints.is_dir():
        checkpoint.read_run_file(run.path, "data.json", json.loads, repair=True)
    stored = checkpoint.read_run_file(run.path, "recipe.yaml", lambda text: recipe_lib.loads(text, str(run.recipe)),
                                      repair=True)
    if not overrides:
        return stored.model_dump(mode="json"), None
    extended = recipe_lib.load(run.recipe, overrides)
    old, new = stored.train.epochs, extended.train.epochs
    if new < old:
        raise UserError(f"{run.path} was set for {old} epochs: {EXTENDABLE} can only grow when resuming "
                        f"(got {new})")
    return extended.model_dump(mode="json"), (old if new > old else None)


def _require(recipe: str | None) -> str:
    if recipe is None:
        raise UserError("give a recipe (a YAML file or a bundled recipe name); see `cnncli recipes`")
    return recipe


def _train(recipe, run, *, resume: bool, overwrite: bool, dry_run: bool, extended_from: int | None = None,
           default_dir: bool = False) -> None:
    from cnncli.console import TrainDisplay, console, err_console
    from cnncli.data.pipeline import load_data, split_sizes
    from cnncli.interrupts import Interrupt
    from cnncli.run import distributed
    from cnncli.run.rundir import DEFAULT_ROOT, FollowerRun
    from cnncli.train.loop import Interrupted, check_recipe, start_run, train
    from cnncli.train.state import build

    def load():
        check_recipe(recipe)
        return load_data(recipe.data, recipe.seed)

    splits = distributed.together(load)  # every host loads the data itself; a failure on one stops all
    if distributed.multiprocess():
        distributed.check_same("recipe or data", _fingerprint(recipe, splits))
    model = build(recipe, splits.image_shape, splits.num_classes, splits.mean, splits.std)
    h, w, c = splits.image_shape
    n_train, n_val, n_test = split_sizes(splits)
    streaming = hasattr(splits, "workers")
    workers = splits.workers if streaming else 0
    how = (f", streamed from disk by {workers} worker process{'es' if workers != 1 else ''}" if workers
           else ", streamed from disk" if streaming else "")
    model_line = (f"{recipe.model.name}: {model.num_params:,} parameters, input {h}x{w}x{c}, "
                  f"{splits.num_classes} classes; data {recipe.data.source}: {n_train:,} train / "
                  f"{n_val:,} val / {n_test:,} test{how}")
    main = distributed.is_main()  # the other processes of a multi-process run stay quiet
    if dry_run:
        if main:  # the recipe alone on stdout: `--dry-run > my.yaml` writes a recipe that trains
            console.print(recipe.to_yaml(), highlight=False, markup=False, soft_wrap=True)
            err_console.print(model_line, highlight=False)
        return
    if main:
        if overwrite and not resume and run.has_run():
            kept = run.clear()  # the run's own files only, after the data loaded: a failure above keeps the old run
            if kept:
                err_console.print(f"--overwrite kept {len(kept)} entries of {run.path} that are not cnncli's: "
                                  f"{', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}", highlight=False)
        if not resume:
            start_run(recipe, splits, run)
        elif extended_from is not None:
            run.write_text(run.recipe, recipe.to_yaml())  # the run now ends at the new epoch count
            schedule = "" if recipe.schedule.name == "constant" else (
                f"; the {recipe.schedule.name} learning-rate schedule now spans {recipe.train.epochs} epochs")
            err_console.print(f"extending {run.path} from {extended_from} to {recipe.train.epochs} epochs{schedule}",
                              highlight=False)
        err_console.print(model_line, highlight=False)
        if distributed.multiprocess():
            import jax

            err_console.print(f"{jax.process_count()} processes, {jax.device_count()} devices: "
                              f"{recipe.train.batch_size // jax.process_count()} images of each batch per process",
                              highlight=False)
        taken = DEFAULT_ROOT / recipe.name
        note = f" ({taken} holds another run)" if default_dir and run.path != taken else ""
        err_console.print(f"run directory: {run.path}{note}", highlight=False)
    else:
        run = FollowerRun(run.path)
    try:
        summary = train(recipe, splits, run, resume=resume, display=TrainDisplay() if main else None)
    except Interrupted as e:
        if main:
            err_console.print(stopped_message(e, f"cnncli train --resume --run-dir {run.path}"), highlight=False)
        raise typer.Exit(e.exit_code) from None
    except Interrupt as e:  # a signal outside the steps (compiling, the test pass): the last checkpoint stands
        if main:
            err_console.print(stopped_outside_steps(e, f"cnncli train --resume --run-dir {run.path}"),
                              highlight=False)
        raise typer.Exit(e.exit_code) from None
    if main:
        print_summary(summary, console)
        write_curves(run)


def write_curves(run) -> None:
    """plots/curves.png of a finished run: what `cnncli plot` draws, without asking."""
    from cnncli.console import console
    from cnncli.inspect.figures import run_curves

    if run.read_metrics():
        path, _ = run_curves(run)
        console.print(f"curves: {path}", highlight=False, soft_wrap=True)


def stopped_outside_steps(e, resume: str) -> str:
    """What a run stopped by a signal while it was not stepping says (it continues from its last checkpoint)."""
    from cnncli.interrupts import describe

    return f"stopped by {describe(e.signum)} outside the training steps; continue with `{resume}`"


def stopped_message(e, resume: str) -> str:
    """What a run stopped by a signal says: by what, where, and how to continue it."""
    if e.saved:
        return f"stopped by {e.by} at {e}: checkpoint saved; continue with `{resume}`"
    return f"stopped by {e.by} at {e}: nothing was trained; `{resume}` starts it from the beginning"


def _fingerprint(recipe, splits) -> dict:
    """What must be equal on every process of a multi-process run: the recipe, and the data's sizes,
    classes and checksum."""
    import zlib

    from cnncli.data.pipeline import split_sizes

    # streamed data is checked by what every process will read: the same records, labels and statistics
    content = (splits.train_ids.tobytes() + repr((splits.mean, splits.std)).encode() if hasattr(splits, "train_ids")
               else splits.train_x.tobytes())
    return {"recipe checksum": zlib.crc32(recipe.to_yaml().encode()), "sizes": list(split_sizes(splits)),
            "classes": splits.num_classes, "train checksum": zlib.crc32(splits.train_y.tobytes(), zlib.crc32(content))}


def print_summary(summary: dict, console) -> None:
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
    if summary.get("best_val_pgd_acc") is not None:  # single-step adversarial training keeps its most PGD-robust epoch
        table.add_row("validation PGD accuracy", f"{summary['best_val_pgd_acc']:.2%}")
    if "test" in summary:
        test = summary["test"]
        table.add_row("test top-1", f"{test['top1']:.2%}")
        table.add_row(f"test top-{test['top_k']}", f"{test['top5']:.2%}")
        table.add_row("test loss", f"{test['loss']:.4f}")
    if "test_ema" in summary:
        table.add_row("test top-1 (EMA weights)", f"{summary['test_ema']['top1']:.2%}")
    if "stream" in summary:
        stream = summary["stream"]
        table.add_row("images read from disk", " + ".join(f"{n:,}" for n in stream["records_read"]) +
                      (" (by process)" if len(stream["records_read"]) > 1 else ""))
        table.add_row("waiting for input", f"{sum(stream['input_wait_s']) / len(stream['input_wait_s']):.1f} s")
        if stream["skipped_corrupt"]:
            table.add_row("corrupt images skipped", f"{stream['skipped_corrupt']:,}")
    table.add_row("training time", f"{summary['train_seconds']:.1f} s")
    if "test_seconds" in summary:
        table.add_row("test pass", f"{summary['test_seconds']:.1f} s")
    if "compile_seconds" in summary:
        table.add_row("compilation (left out of both)", f"{summary['compile_seconds']:.1f} s")
    console.print(table)
