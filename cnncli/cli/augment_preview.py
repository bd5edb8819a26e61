"""`cnncli augment-preview`: a PNG grid of what a recipe's augmentation does to a few training images."""

from pathlib import Path

import typer

from cnncli.cli import DATA, app
from cnncli.errors import UserError


@app.command("augment-preview", rich_help_panel=DATA)
def augment_preview(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a bundled recipe."),
    n: int = typer.Option(16, "--n", min=1, help="Number of training images (rows)."),
    draws: int = typer.Option(4, "--draws", min=1, help="Augmented draws of each image (columns after the original)."),
    out: Path = typer.Option(Path("preview.png"), "--out", help="PNG to write."),
    zoom: int = typer.Option(3, "--zoom", min=1, help="Each image pixel becomes zoom x zoom PNG pixels."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE",
                                        help="Override a recipe key, e.g. --set augment.0.p=1 (repeatable)."),
) -> None:
    """Write a grid: each row one training image (labelled with its class), first the original, then
    `--draws` augmented versions, each captioned with the ops that fired on it; the same list is printed.

    Images are a random pick (the recipe's seed) of the recipe's training split, augmented exactly as
    the training step does it, so the grid shows what the model will see. Ops with p = 1 fire on every
    draw and are named once in the title instead of under every image.
    """
    import jax
    import numpy as np
    from rich.markup import escape
    from rich.table import Table

    from cnncli import recipe as recipe_lib
    from cnncli.console import console
    from cnncli.data.augment import build_augment, preview_draws
    from cnncli.data.pipeline import load_splits
    from cnncli.inspect import figures

    resolved = recipe_lib.load(recipe, overrides)
    if not resolved.augment:
        raise UserError(f"recipe '{resolved.name}' has no augment section: nothing to preview; add an `augment:` list")
    augment = build_augment(resolved.augment)
    splits = load_splits(resolved.data, resolved.seed)
    rng = np.random.default_rng(resolved.seed)
    pick = np.sort(rng.choice(len(splits.train_x), size=min(n, len(splits.train_x)), replace=False))
    images, fired = preview_draws(splits.train_x[pick], augment, jax.random.key(resolved.seed), draws=draws)
    classes = [splits.class_names[c] for c in splits.train_y[pick]]
    sometimes = [i for i, p in enumerate(augment.probabilities) if 0 < p < 1]
    always = [augment.names[i] for i, p in enumerate(augment.probabilities) if p == 1]
    captions = [[", ".join(augment.names[i] for i in sometimes if fired[d, r, i]) or "(none)" for d in range(draws)]
                for r in range(len(pick))]
    title = (f"{resolved.name}: {len(pick)} training images, {draws} draws; under each draw, the ops that fired"
             + (f"; on every draw: {', '.join(always)}" if always else ""))
    fig = figures.augment_preview(splits.train_x[pick], images, [f"{c} (#{i})" for c, i in zip(classes, pick)],
                                  captions, title, zoom)
    figures.save(fig, out)
    table = Table(title="ops that fired" + (f" (besides {', '.join(always)}, always)" if always else ""))
    table.add_column("image", overflow="fold")
    for d in range(draws):
        table.add_column(f"draw {d + 1}", overflow="fold")
    for r, (c, i) in enumerate(zip(classes, pick)):
        table.add_row(escape(f"{c} (#{i})"), *map(escape, captions[r]))
    console.print(table)
    console.print(f"wrote {out} ({len(pick)} images x (original + {draws} draws))", highlight=False)
