"""`cnncli recipes`: the bundled recipes, one line each."""


from cnncli.cli import TRAIN, app


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


@app.command(rich_help_panel=TRAIN)
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
