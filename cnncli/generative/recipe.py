"""The GAN recipe: which data, how large a GAN, how long to train it.

    name: acgan_fashion_mnist_100
    seed: 0
    data: {source: fashion_mnist, train_per_class: 100, val_fraction: 0.1}   # as the classifier's recipe
    gan: {noise: 64, width: 32}
    optim: {lr: 0.0002, b1: 0.5}
    train: {steps: 2000, batch_size: 64}

`data` is a classifier recipe's data section: with the same section and seed the GAN trains on
exactly the classifier's training split (validation images held out the same way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from cnncli.errors import UserError
from cnncli.recipe import DataConfig, Section, apply_override, read_yaml, resolve_path, validate_section


class GanConfig(Section):
    noise: int = Field(64, ge=1, description="length of the noise vector z")
    width: int = Field(32, ge=4, description="channels of the discriminator's first layer; the generator's last "
                                             "hidden layer has 2x, its first 4x")
    class_weight: float = Field(1.0, ge=0.0, description="weight of the auxiliary classification loss (ACGAN)")


class GanOptim(Section):
    lr: float = Field(2e-4, gt=0.0, description="Adam learning rate of both networks (DCGAN: 2e-4)")
    b1: float = Field(0.5, ge=0.0, lt=1.0, description="Adam beta1 (DCGAN: 0.5)")
    b2: float = Field(0.999, ge=0.0, lt=1.0)


class GanTrain(Section):
    steps: int = Field(2000, ge=1, description="generator and discriminator updates")
    batch_size: int = Field(64, ge=2)
    log_every: int = Field(100, ge=1, description="steps between progress updates and metrics rows")


class GanRecipe(Section):
    name: str
    description: str = ""
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    gan: GanConfig = Field(default_factory=GanConfig)
    optim: GanOptim = Field(default_factory=GanOptim)
    train: GanTrain = Field(default_factory=GanTrain)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load(path_or_name: str | Path, overrides: list[str] = ()) -> GanRecipe:
    """Load, override and validate a GAN recipe (a file or a bundled name); problems are UserErrors."""
    path = resolve_path(path_or_name)
    raw: dict[str, Any] = read_yaml(path)
    if "gan" not in raw:
        raise UserError(f"{path} is not a GAN recipe (it has no 'gan' section): train classifiers with "
                        f"`cnncli train {path_or_name}`")
    raw.setdefault("name", path.stem)
    for assignment in overrides:
        apply_override(raw, assignment)
    recipe = validate_section(GanRecipe, raw, source=str(path))
    if recipe.data.generated is not None:
        raise UserError(f"{path}: data.generated mixes a GAN's images into a classifier's batches; a GAN trains on "
                        f"real images only (remove it)")
    return recipe
