"""`cnncli data ...`: dataset commands (prepare a TFDS dataset)."""

import typer

from cnncli.cli import DATA, app, command_group

data_app = command_group(help="Prepare datasets (TensorFlow Datasets).")
app.add_typer(data_app, name="data", rich_help_panel=DATA)


@data_app.command("prepare")
def prepare(
    spec: str = typer.Argument(..., help="tfds:NAME, e.g. tfds:cifar10"),
    data_dir: str = typer.Option(None, "--data-dir", help="TFDS data directory [default: $TFDS_DATA_DIR or "
                                                            "~/tensorflow_datasets]."),
) -> None:
    """Download and prepare a TFDS dataset (needs `pip install 'cnncli[prepare]'` and internet)."""
    from cnncli.console import console
    from cnncli.data.sources import parse_spec
    from cnncli.data.sources.tfds import prepare_tfds
    from cnncli.errors import UserError

    scheme, name = parse_spec(spec)
    if scheme != "tfds" or not name:
        raise UserError(f"`cnncli data prepare` prepares TFDS datasets: give tfds:NAME, not '{spec}'")
    path = prepare_tfds(name, data_dir)
    console.print(f"prepared tfds:{name} in {path}")
