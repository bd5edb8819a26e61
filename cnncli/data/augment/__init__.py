"""Data augmentation as pure JAX batch ops, applied inside the jitted training step.

The catalogue lives in the registry `AUGMENTATIONS`; each op is
`op(images, labels, key, **params) -> (images, labels)` on float32 NHWC pixels in [0, 1] and
(N, K) one-hot or soft labels. `build_augment` turns the recipe's `augment:` list into one function
`(images, labels, key) -> (images, labels)` that applies the ops in the order written, each to a
per-image Bernoulli(p) subset of the batch. `preview_draws` makes a few draws for a PNG preview.
Hand-written so that augmentation runs inside the jitted step with no host pipeline (its cost:
docs/toolbox.md).

    geometric   hflip vflip crop random_crop crop_and_pad translate rotate scale shear affine
                perspective elastic
    colour      brightness contrast saturation hue gamma invert sharpen emboss grayscale
    noise       gaussian_noise gaussian_blur salt_pepper coarse_dropout cutout random_erasing
    regions     superpixels
    weather     fog clouds snow
    mixing      mixup cutmix            (the only ops that change labels)
    policies    randaugment trivialaugment
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Importing the op modules registers their ops.
from cnncli.data.augment import geometric, pixel, policy  # noqa: F401  (they register their ops)
from cnncli.data.augment.core import (
    AUGMENTATIONS,
    BATCH_ARGS,
    affine_matrices,
    sample_bilinear,
    warp_affine,
)
from cnncli.errors import UserError, brief, suggest

__all__ = ["AUGMENTATIONS", "Augment", "affine_matrices", "build_augment", "op_parameters", "preview_draws",
           "sample_bilinear", "warp_affine"]


def op_parameters(name: str) -> dict[str, Any]:
    """The parameters of a registered op and their defaults, e.g. {'degrees': 15.0}."""
    fn = AUGMENTATIONS.get(name)
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if k not in BATCH_ARGS}


def _spec_of(op: Any) -> tuple[str, float, dict[str, Any]]:
    """(name, p, params) from an AugmentOp-like object or a plain mapping."""
    if isinstance(op, Mapping):
        rest = dict(op)
        name = rest.pop("name", None)
        p = rest.pop("p", 1.0)
        return name, p, rest
    params = op.params() if callable(getattr(op, "params", None)) else dict(getattr(op, "params", {}) or {})
    return op.name, getattr(op, "p", 1.0), params


def _validate(i: int, op: Any) -> tuple[Callable, float, dict[str, Any]]:
    """Check one op's name, p and parameters; return (fn, p, checked params)."""
    name, p, params = _spec_of(op)
    where = f"augment[{i}]"
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: every augmentation needs a name; known: {', '.join(AUGMENTATIONS.names())}")
    try:
        fn = AUGMENTATIONS.get(name)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    where = f"{where} ({name})"
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise UserError(f"{where}: p must be a probability in [0, 1]; got {brief(p)}")
    allowed = op_parameters(name)
    specs = getattr(fn, "param_specs", {})
    checked = {}
    for key, value in params.items():
        if key not in allowed:
            listing = ", ".join(allowed) if allowed else "none"
            raise UserError(f"{where}: unknown parameter '{key}'{suggest(key, allowed)}; parameters: {listing}")
        try:
            checked[key] = specs[key].check(value) if key in specs else value
        except ValueError as err:
            raise UserError(f"{where}: {key} {err}; got {brief(value)}") from None
    return fn, float(p), checked


class Augment:
    """The augmentation of a recipe's `augment:` list: a pure, jit-able `(images, labels, key) -> (images, labels)`.

    `fired(key, n)` says which ops a call with the same key applies to each of n images (the preview
    lists them); both draw their per-op keys and Bernoulli(p) choices through `_draws`.
    """

    def __init__(self, steps: list[tuple[Callable, float, dict[str, Any]]], names: list[str]):
        self.steps = steps
        self.names = names  # the op names, in order
        self.probabilities = [p for _, p, _ in steps]

    def _draws(self, key: jax.Array, n: int):
        """(op key, which images keep the op's result: None for all) per op with p > 0."""
        for k, (_, p, _) in zip(jax.random.split(key, len(self.steps)), self.steps, strict=True):
            if p == 0.0:
                yield None
                continue
            k_op, k_sel = jax.random.split(k)
            yield k_op, (jax.random.bernoulli(k_sel, p, (n,)) if p < 1.0 else None)

    def __call__(self, images: jax.Array, labels: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        images = jnp.asarray(images, jnp.float32)
        labels = jnp.asarray(labels, jnp.float32)
        for (fn, _, params), draw in zip(self.steps, self._draws(key, images.shape[0]), strict=True):
            if draw is None:
                continue
            k_op, keep = draw
            new_images, new_labels = fn(images, labels, k_op, **params)
            if keep is not None:
                new_images = jnp.where(keep[:, None, None, None], new_images, images)
                new_labels = jnp.where(keep[:, None], new_labels, labels)
            images, labels = new_images.astype(jnp.float32), new_labels.astype(jnp.float32)
        return images, labels

    def fired(self, key: jax.Array, n: int) -> np.ndarray:
        """(n, ops) booleans: whether a call with `key` on n images applies each op to each image."""
        columns = [np.zeros(n, bool) if draw is None else np.ones(n, bool) if draw[1] is None
                   else np.asarray(draw[1]) for draw in self._draws(key, n)]
        return np.stack(columns, axis=1)


def build_augment(ops: Sequence[Any]) -> Augment | None:
    """Build the augmentation function for a recipe's `augment:` list.

    Args:
        ops: AugmentOp-like objects (`name`, `p`, `.params()`) or mappings {'name': ..., 'p': ..., **params}.

    Returns:
        None for an empty list; otherwise an `Augment`, a pure, jit-able `fn(images, labels, key) -> (images,
        labels)` that applies the ops in order. Each op runs on the whole batch and its result is kept for a
        Bernoulli(p) subset of images (`jnp.where`), so the graph is static; ops with p = 0 are skipped.

    Raises:
        UserError: unknown op or parameter (with the closest names), or a value out of range.
    """
    if not ops:
        return None
    return Augment([_validate(i, op) for i, op in enumerate(ops)], [_spec_of(op)[0] for op in ops])


def preview_draws(images_uint8: np.ndarray, augment_fn: Augment | None, key: jax.Array,
                  draws: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Augmented versions of a few images, and which ops made each, for `cnncli augment-preview`.

    Args:
        images_uint8: (N, H, W, C) uint8 images.
        augment_fn: from `build_augment` (None repeats the originals).
        key: PRNG key; draw d uses `fold_in(key, d)`.
        draws: how many augmented versions of each image.

    Mixing ops pair images within `images_uint8`, so they show only when it holds several images.

    Returns:
        (draws, N, H, W, C) uint8 augmented images, and (draws, N, ops) booleans: the ops applied.
    """
    x = np.asarray(images_uint8)
    if x.ndim == 3:
        x = x[..., None]
    n = len(x)
    pixels = jnp.asarray(x, jnp.float32) / 255.0
    # One class everywhere: mixing ops still get valid labels, and the preview never shows them.
    labels = jnp.ones((n, 1), jnp.float32)
    if augment_fn is None:
        return np.repeat(x[None], draws, axis=0), np.zeros((draws, n, 0), bool)
    out, fired = [], []
    for d in range(draws):
        key_d = jax.random.fold_in(key, d)
        images, _ = augment_fn(pixels, labels, key_d)
        out.append(np.asarray(jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0)).astype(np.uint8))
        fired.append(augment_fn.fired(key_d, n))
    return np.stack(out), np.stack(fired)
