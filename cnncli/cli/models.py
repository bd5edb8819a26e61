"""`cnncli models`: the registered architectures."""


from cnncli.cli import INSPECT, app


@app.command(rich_help_panel=INSPECT)
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
