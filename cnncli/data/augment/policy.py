"""Automatic augmentation policies: RandAugment and TrivialAugment, chosen per image.

Each round draws one op per image from a fixed list of 13 (the RandAugment list of Cubuk et al.
2020 without equalize, whose per-image histogram would dominate the step). Rather than branching
per image (`lax.switch` under `vmap` becomes a select over every branch anyway), a round computes:
  * one affine matrix per image (identity unless the image drew rotate/shear/translate), so all
    geometric candidates cost a single bilinear gather, and
  * the cheap pixel-wise candidates on the warped batch, picked with a chain of `jnp.where`
    that XLA fuses into one pass.
Under `vmap(lax.switch)` each geometric branch would gather on its own; this form is several times
faster (docs/performance.md, "The rules", `policy_round`).
Magnitude 0 makes every candidate the identity, so a policy at magnitude 0 changes nothing.
(Autocontrast is blended in by the magnitude for that reason.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cnncli.data.augment.core import (
    Choice,
    Num,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_sharpness,
    affine_matrices,
    augmentation,
    autocontrast,
    blend,
    posterize,
    randints,
    solarize,
    uniform,
    uniforms,
    warp_affine,
)

# RandAugment's magnitude scale: M in 0..30 (Cubuk et al.); values <= 1 are read as fractions.
MAGNITUDE_SCALE = 30.0
POLICY_OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "sharpness", "solarize",
              "posterize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
# Ranges at full magnitude (torchvision's RandAugment and TrivialAugmentWide tables): rotation in
# degrees, shear as tan(angle), translation as a fraction of the side (torchvision: 150/331 of the
# side; wide: 32 px, i.e. the whole side of a 32 px image), enhancement factor 1 +- range,
# posterize bits removed.
RANGES = {
    "standard": {"rotate": 30.0, "shear": 0.3, "translate": 150.0 / 331.0, "enhance": 0.9, "posterize": 4.0},
    "wide": {"rotate": 135.0, "shear": 0.99, "translate": 1.0, "enhance": 0.99, "posterize": 6.0},
}


def _fraction(magnitude: float) -> float:
    """Magnitude as a fraction of the maximum: values above 1 are on RandAugment's 0..30 scale."""
    return magnitude / MAGNITUDE_SCALE if magnitude > 1.0 else magnitude


def policy_round(images, key, mag, ranges, ops=POLICY_OPS):
    """Apply one op per image, chosen uniformly from `ops`, at per-image magnitudes `mag` in [0, 1].

    Args:
        images: (N, H, W, C) float32 in [0, 1].
        key: PRNG key.
        mag: (N,) magnitudes as fractions of the ranges' maxima.
        ranges: a RANGES entry.
        ops: candidate op names (a subset of POLICY_OPS), mostly for tests.

    Returns:
        (N, H, W, C) float32 in [0, 1].
    """
    n, h, w, _ = images.shape
    u = uniforms(key, 2, n)
    choice = randints(u[0], 0, len(ops) - 1)
    sign = jnp.where(u[1] < 0.5, 1.0, -1.0)
    signed = sign * mag

    def when(name, value):
        return jnp.where(choice == ops.index(name), value, 0.0) if name in ops else 0.0

    x = images
    if any(g in ops for g in GEOMETRIC):
        shear = jnp.rad2deg(jnp.arctan(signed * ranges["shear"]))
        m = affine_matrices(h, w, n, angle=when("rotate", signed * ranges["rotate"]),
                            shear_x=when("shear_x", shear), shear_y=when("shear_y", shear),
                            tx=when("translate_x", signed * ranges["translate"] * w),
                            ty=when("translate_y", signed * ranges["translate"] * h))
        x = warp_affine(x, m)
    enhance = 1.0 + signed * ranges["enhance"]
    candidates = {
        "autocontrast": lambda: blend(x, autocontrast(x), mag),
        "brightness": lambda: adjust_brightness(x, enhance),
        "color": lambda: adjust_saturation(x, enhance),
        "contrast": lambda: adjust_contrast(x, enhance),
        "sharpness": lambda: adjust_sharpness(x, enhance),
        "solarize": lambda: solarize(x, 1.0 - mag),
        "posterize": lambda: posterize(x, 8.0 - jnp.round(mag * ranges["posterize"])),
    }
    out = x
    for name, fn in candidates.items():
        if name in ops:
            out = jnp.where((choice == ops.index(name)).reshape(-1, 1, 1, 1), fn(), out)
    return out


@augmentation("randaugment", num_ops=Num(1, 10, integer=True), magnitude=Num(0.0, MAGNITUDE_SCALE),
              help="RandAugment: num_ops random ops per image at magnitude M (0..30, or a fraction 0..1)")
def randaugment(images, labels, key, num_ops=2, magnitude=9.0):
    """RandAugment (Cubuk et al. 2020): `num_ops` rounds, each one uniformly chosen op per image.

    Args:
        num_ops: ops applied in sequence to each image (N in the paper).
        magnitude: M on the paper's 0..30 scale, or a fraction in [0, 1] (values <= 1). 0 is the identity.
    """
    n = images.shape[0]
    mag = jnp.full((n,), _fraction(magnitude), jnp.float32)
    for k in jax.random.split(key, num_ops):
        images = policy_round(images, k, mag, RANGES["standard"])
    return images, labels


@augmentation("trivialaugment", magnitude=Num(0.0, MAGNITUDE_SCALE), wide=Choice((True, False)),
              help="TrivialAugment: one random op per image at a random magnitude up to `magnitude`")
def trivialaugment(images, labels, key, magnitude=1.0, wide=True):
    """TrivialAugment (Muller & Hutter 2021): one uniformly chosen op per image at U[0, magnitude].

    Args:
        magnitude: the largest magnitude, as a fraction (<= 1) or on the 0..30 scale; 0 is the identity.
        wide: use the paper's wide ranges (rotate 135 degrees, shear 0.99, ...) instead of RandAugment's.
    """
    km, kr = jax.random.split(key)
    mag = uniform(km, images.shape[0], 0.0, _fraction(magnitude))
    return policy_round(images, kr, mag, RANGES["wide" if wide else "standard"]), labels
