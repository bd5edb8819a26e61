"""`cnncli recipes`, `cnncli models`, `cnncli datasets`: what is available here."""

import typer

from cnncli.cli import app


def _recipe_description(path) -> str:
    """The recipe's `description`, else the first line of its header comment."""
    import yaml

    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        raw = {}
    if isinstance(raw, dict) and raw.get("description"):
        return str(raw["description"])
    comments = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")]
    return next((c for c in comments if c), "")


@app.command()
def recipes() -> None:
    """List the bundled recipes with a one-line description each."""
    from rich.markup import escape
    from rich.table import Table

    from cnncli.console import console
    from cnncli.recipe import bundled_recipes

    table = Table(title="bundled recipes (cnncli train NAME)")
    table.add_column("name", style="bold")
    table.add_column("description")
    for path in bundled_recipes():
        table.add_row(path.stem, escape(_recipe_description(path)))
    console.print(table)


@app.command()
def models() -> None:
    """List the registered model architectures."""
    from rich.markup import escape
    from rich.table import Table

    from cnncli.console import console
    from cnncli.models import MODELS, registered_models

    table = Table(title="models (recipe: model.name)")
    table.add_column("name", style="bold")
    table.add_column("description")
    for name in registered_models():
        table.add_row(name, escape(MODELS.help(name)))
    console.print(table)


@app.command()
def datasets() -> None:
    """List the dataset sources and whether each is available on this machine."""
    from rich.markup import escape
    from rich.table import Table

    from cnncli.console import console
    from cnncli.data.sources import SOURCES, dataset_status

    table = Table(title="dataset sources (recipe: data.source)")
    for column in ("source", "available", "description", "here"):
        table.add_column(column)
    for name, available, detail in dataset_status():
        table.add_row(name, "[green]yes[/]" if available else "[red]no[/]", escape(SOURCES.help(name)), escape(detail))
    console.print(table)


data_app = typer.Typer(help="Prepare datasets (TensorFlow Datasets).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def prepare(
    spec: str = typer.Argument(..., help="tfds:NAME, e.g. tfds:cifar10"),
    data_dir: str = typer.Option(None, "--data-dir", help="TFDS data directory [default: $TFDS_DATA_DIR or "
                                                            "~/tensorflow_datasets]."),
) -> None:
    """Download and prepare a TFDS dataset (needs `pip install 'cnncli[prepare]'` and internet)."""
    from cnncli.console import console
    from cnncli.data.sources import parse_spec
    from cnncli.data.tfds_source import prepare_tfds
    from cnncli.errors import UserError

    scheme, name = parse_spec(spec)
    if scheme != "tfds" or not name:
        raise UserError(f"`cnncli data prepare` prepares TFDS datasets: give tfds:NAME, not '{spec}'")
    path = prepare_tfds(name, data_dir)
    console.print(f"prepared tfds:{name} in {path}")
