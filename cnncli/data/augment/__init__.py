"""Data augmentation as pure JAX batch ops, applied inside the jitted training step.

The catalogue lives in the registry `AUGMENTATIONS`; each op is
`op(images, labels, key, **params) -> (images, labels)` on float32 NHWC pixels in [0, 1] and
(N, K) one-hot or soft labels. `build_augment` turns the recipe's `augment:` list into one function
`(images, labels, key) -> (images, labels)` that applies the ops in the order written, each to a
per-image Bernoulli(p) subset of the batch. `preview_grid` renders a few draws for a PNG preview.

    geometric   hflip vflip crop random_crop crop_and_pad translate rotate scale shear affine
                perspective elastic
    colour      brightness contrast saturation hue gamma invert sharpen emboss grayscale
    noise       gaussian_noise gaussian_blur salt_pepper coarse_dropout cutout random_erasing
    weather     fog snow
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
    AugmentFn,
    affine_matrices,
    sample_bilinear,
    warp_affine,
)
from cnncli.errors import UserError, suggest

__all__ = ["AUGMENTATIONS", "affine_matrices", "build_augment", "op_parameters", "preview_grid",
           "sample_bilinear", "warp_affine"]

# Width of the separators between cells of a preview grid, and their grey level.
PREVIEW_GAP = 2
PREVIEW_GAP_VALUE = 255


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
        raise UserError(f"{where}: p must be a probability in [0, 1]; got {p!r}")
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
            raise UserError(f"{where}: {key} {err}; got {value!r}") from None
    return fn, float(p), checked


def build_augment(ops: Sequence[Any]) -> AugmentFn | None:
    """Build the augmentation function for a recipe's `augment:` list.

    Args:
        ops: AugmentOp-like objects (`name`, `p`, `.params()`) or mappings {'name': ..., 'p': ..., **params}.

    Returns:
        None for an empty list; otherwise a pure, jit-able `fn(images, labels, key) -> (images, labels)`
        that applies the ops in order. Each op runs on the whole batch and its result is kept for a
        Bernoulli(p) subset of images (`jnp.where`), so the graph is static; ops with p = 0 are skipped.

    Raises:
        UserError: unknown op or parameter (with the closest names), or a value out of range.
    """
    if not ops:
        return None
    steps = [_validate(i, op) for i, op in enumerate(ops)]

    def augment(images: jax.Array, labels: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        images = jnp.asarray(images, jnp.float32)
        labels = jnp.asarray(labels, jnp.float32)
        n = images.shape[0]
        for k, (fn, p, params) in zip(jax.random.split(key, len(steps)), steps, strict=True):
            if p == 0.0:
                continue
            k_op, k_sel = jax.random.split(k)
            new_images, new_labels = fn(images, labels, k_op, **params)
            if p < 1.0:
                keep = jax.random.bernoulli(k_sel, p, (n,))
                new_images = jnp.where(keep[:, None, None, None], new_images, images)
                new_labels = jnp.where(keep[:, None], new_labels, labels)
            images, labels = new_images.astype(jnp.float32), new_labels.astype(jnp.float32)
        return images, labels

    return augment


def preview_grid(images_uint8: np.ndarray, augment_fn: AugmentFn | None, key: jax.Array,
                 draws: int = 4) -> np.ndarray:
    """Render originals and augmented draws side by side.

    Args:
        images_uint8: (N, H, W, C) uint8 images.
        augment_fn: from `build_augment` (None shows the originals repeated).
        key: PRNG key; draw d uses `fold_in(key, d)`.
        draws: augmented columns per image.

    Mixing ops pair images within `images_uint8`, so they show only when it holds several images.

    Returns:
        (N*H + (N-1)*gap, (draws+1)*W + draws*gap, C) uint8: one row per image, the original in the
        first column, separated by white `PREVIEW_GAP`-pixel lines.
    """
    x = np.asarray(images_uint8)
    if x.ndim == 3:
        x = x[..., None]
    n, h, w, c = x.shape
    pixels = jnp.asarray(x, jnp.float32) / 255.0
    # One class everywhere: mixing ops still get valid labels, and the preview never shows them.
    labels = jnp.ones((n, 1), jnp.float32)
    columns = [x]
    for d in range(draws):
        if augment_fn is None:
            columns.append(x)
            continue
        out, _ = augment_fn(pixels, labels, jax.random.fold_in(key, d))
        columns.append(np.asarray(jnp.round(jnp.clip(out, 0.0, 1.0) * 255.0)).astype(np.uint8))
    g = PREVIEW_GAP
    grid = np.full((n * h + (n - 1) * g, (draws + 1) * w + draws * g, c), PREVIEW_GAP_VALUE, np.uint8)
    for col, imgs in enumerate(columns):
        for row in range(n):
            grid[row * (h + g):row * (h + g) + h, col * (w + g):col * (w + g) + w] = imgs[row]
    return grid
