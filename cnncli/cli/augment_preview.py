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
    """Write a grid: each row one training image, first the original, then `--draws` augmented versions.

    Images are a random pick (the recipe's seed) of the recipe's training split, augmented exactly as
    the training step does it, so the grid shows what the model will see.
    """
    import jax
    import numpy as np

    from cnncli import recipe as recipe_lib
    from cnncli.console import console
    from cnncli.data.augment import build_augment, preview_grid
    from cnncli.data.pipeline import load_splits
    from cnncli.inspect.figures import save_image

    resolved = recipe_lib.load(recipe, overrides)
    if not resolved.augment:
        raise UserError(f"recipe '{resolved.name}' has no augment section: nothing to preview; add an `augment:` list")
    augment = build_augment(resolved.augment)
    splits = load_splits(resolved.data, resolved.seed)
    rng = np.random.default_rng(resolved.seed)
    pick = rng.choice(len(splits.train_x), size=min(n, len(splits.train_x)), replace=False)
    grid = preview_grid(splits.train_x[np.sort(pick)], augment, jax.random.key(resolved.seed), draws=draws)
    width, height = save_image(grid, out, zoom)
    console.print(f"wrote {out} ({width}x{height} px: {len(pick)} images x (original + {draws} draws))",
                  highlight=False)
