"""`cnncli gan train RECIPE` and `cnncli gan sample RUN`: a class-conditional GAN for data augmentation."""

from pathlib import Path

import typer

from cnncli.cli import TRAIN, app, command_group

gan_app = command_group(help="Train a class-conditional GAN (ACGAN) and sample labelled images from it (for "
                             "data.generated: GAN samples mixed into a classifier's batches).")
app.add_typer(gan_app, name="gan", rich_help_panel=TRAIN)


@gan_app.command("train")
def train(
    recipe: str = typer.Argument(..., help="GAN recipe file or bundled name (a recipe with a `gan` section)."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="Override a recipe key."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Where to write the run [default: runs/<recipe name>]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in a run directory that holds a GAN."),
) -> None:
    """Train an ACGAN on the recipe's training split; writes the generator and samples.png (one row per class).

    Ctrl-C stops after the current step and keeps the generator trained so far.
    """
    from cnncli.cli.train import writing
    from cnncli.generative.recipe import load
    from cnncli.run.rundir import DEFAULT_ROOT, RunDir

    resolved = load(recipe, overrides)
    run = RunDir(run_dir or DEFAULT_ROOT / resolved.name)
    with writing(run):
        run.check_new(overwrite, "(a GAN run is not resumed)")
        _train(resolved, run, overwrite)


def _train(resolved, run, overwrite: bool) -> None:
    from cnncli.console import console, err_console
    from cnncli.data.pipeline import load_splits
    from cnncli.generative import acgan
    from cnncli.generative.run import train as train_gan
    from cnncli.inspect import figures

    splits = load_splits(resolved.data, resolved.seed)
    if overwrite and run.has_run():
        run.clear()  # the run's own files only, once the data loaded
    acgan.check_shape(splits.image_shape)
    err_console.print(f"ACGAN on {len(splits.train_x):,} training images of {resolved.data.source} "
                      f"({splits.num_classes} classes); run directory: {run.path}", highlight=False)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("{task.fields[row]}"), console=err_console,
                  disable=not err_console.is_terminal) as bar:
        task = bar.add_task("gan", total=resolved.train.steps, row="")

        def progress(step, steps, row):
            bar.update(task, completed=step, row=f"D {row['d_loss']:.3f} G {row['g_loss']:.3f} "
                                                  f"class acc real {row['real_class_acc']:.2f} "
                                                  f"fake {row['fake_class_acc']:.2f}")
            if not err_console.is_terminal:
                err_console.print(f"step {step}/{steps}: {bar.tasks[0].fields['row']}", highlight=False)

        last = train_gan(resolved, splits, run, progress=progress)
    fig = _grid(run.path, seed=0, n=figures_columns())
    path = figures.save(fig, run.path / "samples.png")
    console.print(f"{'stopped by Ctrl-C at' if last['stopped'] else 'trained'} step {last.get('step', 0)}: "
                  f"generated images classified as their label by the discriminator {last.get('fake_class_acc', 0):.0%}"
                  f"; samples in {path}", highlight=False)
    if last["stopped"]:
        raise typer.Exit(130)


def figures_columns() -> int:
    from cnncli.generative.run import SAMPLES_PER_CLASS

    return SAMPLES_PER_CLASS


def _grid(path: Path, *, seed: int, n: int):
    import numpy as np

    from cnncli.generative.run import load_gan
    from cnncli.inspect import figures

    gan = load_gan(path)
    k = len(gan.class_names)
    labels = np.repeat(np.arange(k, dtype=np.int32), n)
    images = gan.sample(labels, seed).reshape(k, n, *gan.image_shape)
    return figures.class_rows(images, gan.class_names, f"{gan.recipe.name}: {n} samples per class (seed {seed})")


@gan_app.command("sample")
def sample(
    run: Path = typer.Argument(..., help="A GAN run directory written by `cnncli gan train`."),
    n: int = typer.Option(10, "--n", min=1, help="Samples per class (columns of the grid)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed: the same seed gives the same images."),
    out: Path = typer.Option(None, "--out", help="PNG of the labelled grid [default: RUN/samples_seed<S>.png]."),
    npz: Path = typer.Option(None, "--npz", help="Also write the images as an npz dataset (x, y, class_names), "
                                                 "readable as data.source npz:PATH [default: no npz]."),
) -> None:
    """A labelled grid of generated images, one row per class."""
    import numpy as np

    from cnncli.console import console
    from cnncli.generative.run import load_gan
    from cnncli.inspect import figures

    path = figures.save(_grid(run, seed=seed, n=n), out or run / f"samples_seed{seed}.png")
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)
    if npz is not None:
        gan = load_gan(run)
        labels = np.repeat(np.arange(len(gan.class_names), dtype=np.int32), n)
        np.savez_compressed(npz, x=gan.sample(labels, seed), y=labels, class_names=np.asarray(gan.class_names))
        console.print(f"wrote {npz}", highlight=False, soft_wrap=True)
