"""Adversarial examples: attacks (pure JAX), robustness over a split, AutoAttack, sanity checks, figures.

Importing the package registers every attack: the classic ones live in `attacks`, which also holds
the registry, and each other module adds its own.
"""

from cnncli.adversarial import apgd, attacks, fab, minimum_norm, square  # noqa: F401  (they register attacks)
