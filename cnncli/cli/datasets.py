"""`cnncli datasets`: the dataset sources and whether each is available here."""


from cnncli.cli import DATA, app


@app.command(rich_help_panel=DATA)
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
