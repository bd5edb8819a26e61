"""Shared machinery of the augmentation catalogue: the registry, parameter specs and pixel helpers.

Every augmentation is a pure batch function `op(images, labels, key, **params) -> (images, labels)`
on float32 NHWC pixels in [0, 1]. Parameters are static Python values (validated once by
`build_augment`); per-image randomness comes from `key`. The helpers here are the pieces several ops
share: one bilinear resampler (affine matrices or per-pixel coordinate fields, fill 0 outside),
Gaussian/linear filtering written as small matrix products (fast on CPU, no scatter), 3x3 stencils
and colour conversions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from cnncli.registry import Registry

AUGMENTATIONS = Registry("augmentation")

# ITU-R BT.601 luma weights, as PIL's convert("L") and torchvision's rgb_to_grayscale use.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Source coordinates this close to an integer are snapped to it, so integer translations and
# 90-degree rotations reproduce pixels exactly instead of blending 1e-7 of a neighbour.
SNAP_TOLERANCE = 1e-4
# Gaussian kernels are truncated at this many sigmas (scipy.ndimage's default).
GAUSS_TRUNCATE = 4.0
# Below this sigma a Gaussian filter is the identity (its off-centre weights underflow).
MIN_SIGMA = 1e-3

# The argument names every op takes before its own parameters.
BATCH_ARGS = ("images", "labels", "key")

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Parameter specs: what build_augment checks before any tracing happens.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Num:
    """A number in [lo, hi] (an integer when `integer`)."""

    lo: float = -math.inf
    hi: float = math.inf
    integer: bool = False

    def check(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number in [{_fmt(self.lo)}, {_fmt(self.hi)}]")
        if self.integer and float(value) != int(value):
            raise ValueError("must be a whole number")
        if not (self.lo <= value <= self.hi) or math.isnan(value):
            raise ValueError(f"must be in [{_fmt(self.lo)}, {_fmt(self.hi)}]")
        return int(value) if self.integer else float(value)


@dataclass(frozen=True)
class Pair:
    """A range [a, b] written as a two-item list, lo <= a <= b <= hi."""

    lo: float = -math.inf
    hi: float = math.inf

    def check(self, value: Any) -> tuple[float, float]:
        msg = f"must be a range [a, b] with {_fmt(self.lo)} <= a <= b <= {_fmt(self.hi)}"
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError(msg)
        a, b = value
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (a, b)):
            raise ValueError(msg)
        if not (self.lo <= a <= b <= self.hi):
            raise ValueError(msg)
        return float(a), float(b)


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values (strings or booleans)."""

    values: tuple[Any, ...]

    def check(self, value: Any) -> Any:
        if value not in self.values or type(value) is not type(self._match(value)):
            raise ValueError(f"must be one of: {', '.join(str(v) for v in self.values)}")
        return value

    def _match(self, value: Any) -> Any:
        return next(v for v in self.values if v == value)


@dataclass(frozen=True)
class NumOr:
    """A number in [lo, hi] or one of a few keywords (e.g. fill: 0.5 or 'random')."""

    num: Num
    words: tuple[str, ...]

    def check(self, value: Any) -> Any:
        if isinstance(value, str):
            if value in self.words:
                return value
        else:
            try:
                return self.num.check(value)
            except ValueError:
                pass
        raise ValueError(f"must be a number in [{_fmt(self.num.lo)}, {_fmt(self.num.hi)}] "
                         f"or one of: {', '.join(self.words)}")


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"


def augmentation(name: str, help: str = "", **specs: Any) -> Callable[[Callable], Callable]:
    """Register an op under `name`, with a spec (Num, Pair, Choice, NumOr) for each parameter.

    The specs let `build_augment` reject a bad value with one clear line before tracing.
    """

    def deco(fn: Callable) -> Callable:
        fn.param_specs = specs
        AUGMENTATIONS.register(name, fn, help=help)
        return fn

    return deco


# --------------------------------------------------------------------------------------------
# Per-image randomness and selection.
# --------------------------------------------------------------------------------------------

def uniform(key: Array, n: int, lo: float, hi: float) -> Array:
    """n independent draws from U[lo, hi), float32."""
    return jax.random.uniform(key, (n,), jnp.float32, lo, hi)


def uniforms(key: Array, k: int, n: int) -> Array:
    """(k, n) draws from U[0, 1): several per-image parameters from one PRNG call.

    One call instead of k split keys keeps both the traced graph (compile time) and the
    threefry work small.
    """
    return jax.random.uniform(key, (k, n), jnp.float32)


def randints(u: Array, lo: int, hi: int) -> Array:
    """Map U[0, 1) draws to integers uniform in [lo, hi] (inclusive)."""
    return jnp.minimum(jnp.floor(u * (hi - lo + 1)).astype(jnp.int32) + lo, hi)


def symmetric(key: Array, n: int, amount: float) -> Array:
    """n draws from U[-amount, amount)."""
    return uniform(key, n, -amount, amount)


def per_image(x: Array) -> Array:
    """Reshape an (N,) per-image value to broadcast against NHWC images."""
    return x.reshape(-1, 1, 1, 1)


def clip01(x: Array) -> Array:
    return jnp.clip(x, 0.0, 1.0)


def blend(a: Array, b: Array, t: Array) -> Array:
    """a + t * (b - a) with a per-image weight t of shape (N,)."""
    return a + per_image(t) * (b - a)


# --------------------------------------------------------------------------------------------
# Resampling: one bilinear gather shared by every geometric op.
# --------------------------------------------------------------------------------------------

def _snap(c: Array) -> Array:
    r = jnp.round(c)
    return jnp.where(jnp.abs(c - r) < SNAP_TOLERANCE, r, c)


def sample_bilinear(images: Array, xs: Array, ys: Array) -> Array:
    """Sample images at per-pixel source coordinates with bilinear interpolation, 0 outside.

    Args:
        images: (N, H, W, C) float32.
        xs, ys: (N, Ho, Wo) source column / row of each output pixel, in pixel units
            (pixel centres at integers).

    Returns:
        (N, Ho, Wo, C) float32. A neighbour outside the image contributes 0, so content fades to
        the fill value over one pixel at the border instead of smearing edge pixels.
    """
    n, h, w, c = images.shape
    ho, wo = xs.shape[1:]
    xs, ys = _snap(xs), _snap(ys)
    x0, y0 = jnp.floor(xs), jnp.floor(ys)
    fx, fy = xs - x0, ys - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    flat = images.reshape(n, h * w, c)
    out = jnp.zeros((n, ho * wo, c), images.dtype)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            yi, xi = y0 + dy, x0 + dx
            valid = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
            idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
            vals = jnp.take_along_axis(flat, idx.reshape(n, -1, 1), axis=1, mode="clip")
            weight = (wy * wx * valid).reshape(n, -1, 1)
            out = out + weight * vals
    return out.reshape(n, ho, wo, c)


def pixel_grid(h: int, w: int) -> tuple[Array, Array]:
    """(H, W) column and row coordinates of every pixel centre."""
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    return xs, ys


def warp_affine(images: Array, matrices: Array) -> Array:
    """Resample each image through its (2, 3) matrix mapping output (x, y, 1) to source (x, y).

    Args:
        images: (N, H, W, C) float32.
        matrices: (N, 2, 3) float32 sampling (inverse) matrices, in pixel units.

    Returns:
        (N, H, W, C) float32 with bilinear interpolation and 0 outside the source.
    """
    h, w = images.shape[1:3]
    gx, gy = pixel_grid(h, w)
    m = matrices.astype(jnp.float32)
    xs = m[:, 0, 0, None, None] * gx + m[:, 0, 1, None, None] * gy + m[:, 0, 2, None, None]
    ys = m[:, 1, 0, None, None] * gx + m[:, 1, 1, None, None] * gy + m[:, 1, 2, None, None]
    return sample_bilinear(images, xs, ys)


def affine_matrices(h: int, w: int, n: int, *, angle: Array | float = 0.0, scale: Array | float = 1.0,
                    shear_x: Array | float = 0.0, shear_y: Array | float = 0.0,
                    tx: Array | float = 0.0, ty: Array | float = 0.0) -> Array:
    """Sampling matrices for `warp_affine` from per-image transform parameters.

    The forward transform, about the image centre ((W-1)/2, (H-1)/2) so that a 90-degree rotation
    of a square image maps pixel centres onto pixel centres, is: scale, then shear, then rotate
    counter-clockwise by `angle` degrees (as seen on screen, like np.rot90 and PIL), then translate
    by (tx, ty) pixels (right, down). Each argument is a scalar or an (N,) array.

    Returns:
        (N, 2, 3) float32 matrices mapping output pixels to source pixels (the inverse transform).
    """
    def vec(v: Array | float) -> Array:
        return jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,))

    a = jnp.deg2rad(vec(angle))
    s = vec(scale)
    shx, shy = jnp.tan(jnp.deg2rad(vec(shear_x))), jnp.tan(jnp.deg2rad(vec(shear_y)))
    cos, sin = jnp.cos(a), jnp.sin(a)
    # Forward F = R_screen(angle) @ Shear @ Scale; with y pointing down, a counter-clockwise
    # rotation on screen is [[cos, sin], [-sin, cos]] in (x, y).
    s00, s01, s10, s11 = s, s * shx, s * shy, s
    f00 = cos * s00 + sin * s10
    f01 = cos * s01 + sin * s11
    f10 = -sin * s00 + cos * s10
    f11 = -sin * s01 + cos * s11
    det = f00 * f11 - f01 * f10
    i00, i01, i10, i11 = f11 / det, -f01 / det, -f10 / det, f00 / det
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    # source = F^-1 (dst - c - t) + c
    ox, oy = cx + vec(tx), cy + vec(ty)
    b0 = cx - (i00 * ox + i01 * oy)
    b1 = cy - (i10 * ox + i11 * oy)
    return jnp.stack([jnp.stack([i00, i01, b0], -1), jnp.stack([i10, i11, b1], -1)], -2)


def box_matrices(h: int, w: int, top: Array, left: Array, bottom: Array, right: Array) -> Array:
    """Sampling matrices that stretch the box [top, bottom] x [left, right] (pixel centres) to the image.

    A box of (0, 0, H-1, W-1) is the identity; boxes reaching outside the image pad with 0.
    """
    sy = (bottom - top) / max(h - 1, 1)
    sx = (right - left) / max(w - 1, 1)
    zero = jnp.zeros_like(sx)
    return jnp.stack([jnp.stack([sx, zero, left], -1), jnp.stack([zero, sy, top], -1)], -2)


# --------------------------------------------------------------------------------------------
# Filtering as small matrix products (separable, per image where the filter is per image).
# --------------------------------------------------------------------------------------------

def gaussian_matrix(size: int, sigma: Array) -> Array:
    """(..., size, size) row-normalised Gaussian smoothing matrices, one per sigma.

    Normalising each row (instead of padding) keeps a constant image constant at the borders.
    """
    sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), MIN_SIGMA)[..., None, None]
    i = jnp.arange(size, dtype=jnp.float32)
    d = i[:, None] - i[None, :]
    k = jnp.exp(-0.5 * (d / sigma) ** 2) * (jnp.abs(d) <= jnp.maximum(GAUSS_TRUNCATE * sigma, 0.5))
    return k / k.sum(-1, keepdims=True)


def smooth_separable(x: Array, mh: Array, mw: Array) -> Array:
    """Apply row and column matrices: (H,H)/(W,W) shared or (N,H,H)/(N,W,W) per image."""
    if mh.ndim == 2:
        x = jnp.einsum("hk,nkwc->nhwc", mh, x)
        return jnp.einsum("wk,nhkc->nhwc", mw, x)
    x = jnp.einsum("nhk,nkwc->nhwc", mh, x)
    return jnp.einsum("nwk,nhkc->nhwc", mw, x)


def resize_matrix(out_size: int, in_size: int) -> Array:
    """(out, in) linear-interpolation matrix with aligned corners (upsampling smooth noise)."""
    if in_size == 1:
        return jnp.ones((out_size, 1), jnp.float32)
    pos = jnp.linspace(0.0, in_size - 1.0, out_size)
    i = jnp.arange(in_size, dtype=jnp.float32)
    return jnp.maximum(0.0, 1.0 - jnp.abs(pos[:, None] - i[None, :]))


def stencil3x3(x: Array, kernel: Sequence[Sequence[float]]) -> Array:
    """Correlate each channel with a static 3x3 kernel, edge-padded (nine shifted slices, fused by XLA)."""
    h, w = x.shape[1:3]
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = jnp.zeros_like(x)
    for i in range(3):
        for j in range(3):
            if kernel[i][j] != 0:
                out = out + kernel[i][j] * p[:, i:i + h, j:j + w, :]
    return out


# --------------------------------------------------------------------------------------------
# Colour helpers.
# --------------------------------------------------------------------------------------------

def luma(x: Array) -> Array:
    """(N, H, W, 1) grey level of RGB or grey images."""
    if x.shape[-1] == 1:
        return x
    return jnp.einsum("nhwc,c->nhw", x, jnp.asarray(LUMA_WEIGHTS, x.dtype))[..., None]


def adjust_brightness(x: Array, factor: Array) -> Array:
    return clip01(x * per_image(factor))


def adjust_contrast(x: Array, factor: Array) -> Array:
    mean = luma(x).mean(axis=(1, 2, 3), keepdims=True)
    return clip01(mean + per_image(factor) * (x - mean))


def adjust_saturation(x: Array, factor: Array) -> Array:
    return clip01(blend(luma(x), x, factor))


def smooth3x3(x: Array) -> Array:
    """PIL's SMOOTH filter, the 'degenerate' image of ImageEnhance.Sharpness."""
    return stencil3x3(x, ((1 / 13, 1 / 13, 1 / 13), (1 / 13, 5 / 13, 1 / 13), (1 / 13, 1 / 13, 1 / 13)))


def adjust_sharpness(x: Array, factor: Array) -> Array:
    """factor 1 = identity, 0 = smoothed, 2 = sharpened (PIL ImageEnhance.Sharpness)."""
    return clip01(blend(smooth3x3(x), x, factor))


def rotate_hue(x: Array, angle: Array) -> Array:
    """Rotate the hue of RGB images by `angle` radians in YIQ space; grey images are unchanged."""
    if x.shape[-1] != 3:
        return x
    rgb2yiq = jnp.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], jnp.float32)
    yiq2rgb = jnp.linalg.inv(rgb2yiq)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    one, zero = jnp.ones_like(cos), jnp.zeros_like(cos)
    rot = jnp.stack([jnp.stack([one, zero, zero], -1), jnp.stack([zero, cos, -sin], -1),
                     jnp.stack([zero, sin, cos], -1)], -2)
    m = jnp.einsum("ij,njk,kl->nil", yiq2rgb, rot, rgb2yiq)
    return clip01(jnp.einsum("nij,nhwj->nhwi", m, x))


def autocontrast(x: Array) -> Array:
    """Stretch each image's channels to span [0, 1] (flat channels are left alone)."""
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), x)


def solarize(x: Array, threshold: Array) -> Array:
    """Invert pixels strictly above a per-image threshold (threshold 1 = identity)."""
    return jnp.where(x > per_image(threshold), 1.0 - x, x)


def posterize(x: Array, bits: Array) -> Array:
    """Keep the top `bits` of each 8-bit value, per image (8 bits = identity)."""
    step = per_image(2.0 ** (8.0 - bits))
    q = jnp.floor(jnp.round(x * 255.0) / step) * step / 255.0
    return jnp.where(per_image(bits) >= 8, x, q)


def rect_mask(h: int, w: int, top: Array, left: Array, height: Array, width: Array) -> Array:
    """(N, H, W, 1) boolean mask of per-image rectangles [top, top+height) x [left, left+width)."""
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    top, left = top[:, None, None], left[:, None, None]
    m = (rows >= top) & (rows < top + height[:, None, None]) & (cols >= left) & (cols < left + width[:, None, None])
    return m[..., None]
