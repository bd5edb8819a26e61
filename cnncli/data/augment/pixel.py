"""Photometric, noise, occlusion, weather and mixing augmentations.

Colour ops act on RGB and grey images alike (hue, saturation and grayscale are the identity on
grey); every result is clipped back into [0, 1]. Only the mixing ops (mixup, cutmix) touch labels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cnncli.data.augment.core import (
    Num,
    NumOr,
    Pair,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_sharpness,
    augmentation,
    blend,
    clip01,
    gaussian_matrix,
    per_image,
    randints,
    rect_mask,
    resize_matrix,
    rotate_hue,
    smooth_separable,
    stencil3x3,
    symmetric,
    uniform,
    uniforms,
)

# Fog: coarse grids of random values upsampled to the image, finer octaves weighted less
# (a cheap fractal "plasma", like imgaug's CloudLayer without its per-pixel loops).
FOG_OCTAVES = (2, 4, 8)
FOG_PERSISTENCE = 0.5
# Snow: fraction of pixels seeding a flake at amount=1, flake streak length in pixels.
SNOW_DENSITY = 0.08
SNOW_STREAK = 3
SNOW_WHITEN = 0.3
# Clouds: a fog field with more contrast (a steep sigmoid around a per-image cover level), so it
# forms bright blobs with edges, as imgaug's Clouds does with its sparse, high-alpha cloud layers.
CLOUD_SHARPNESS = 10.0
# Superpixels: SLIC (Achanta et al. 2012) iterations and compactness (weight of position against
# intensity, per grid step), as scikit-image's defaults for grey-level images.
SLIC_ITERATIONS = 5
SLIC_COMPACTNESS = 0.1


# ---- colour --------------------------------------------------------------------------------

@augmentation("brightness", amount=Num(0.0, 1.0), help="multiply pixels by U[1-amount, 1+amount]")
def brightness(images, labels, key, amount=0.2):
    """Scale brightness by a factor in U[1 - amount, 1 + amount] (PIL/torchvision convention)."""
    return adjust_brightness(images, 1.0 + symmetric(key, images.shape[0], amount)), labels


@augmentation("contrast", amount=Num(0.0, 1.0), help="scale contrast about the mean grey by U[1-amount, 1+amount]")
def contrast(images, labels, key, amount=0.2):
    """Scale each image's deviation from its mean grey level by U[1 - amount, 1 + amount]."""
    return adjust_contrast(images, 1.0 + symmetric(key, images.shape[0], amount)), labels


@augmentation("saturation", amount=Num(0.0, 1.0), help="scale colour saturation by U[1-amount, 1+amount]")
def saturation(images, labels, key, amount=0.2):
    """Blend each RGB image with its grey version by a factor in U[1 - amount, 1 + amount]."""
    return adjust_saturation(images, 1.0 + symmetric(key, images.shape[0], amount)), labels


@augmentation("hue", amount=Num(0.0, 0.5), help="rotate hue by U[-amount, amount] of a full turn (RGB only)")
def hue(images, labels, key, amount=0.05):
    """Rotate each RGB image's hue by U[-amount, amount] turns in YIQ space (colour cast); grey: identity."""
    return rotate_hue(images, symmetric(key, images.shape[0], amount) * 2.0 * math.pi), labels


@augmentation("gamma", amount=Num(0.0, 3.0), help="gamma correction x**g with log g in U[-amount, amount]")
def gamma(images, labels, key, amount=0.3):
    """Gamma-correct each image with g = exp(U[-amount, amount]) (symmetric on a log scale)."""
    g = jnp.exp(symmetric(key, images.shape[0], amount))
    return clip01(jnp.power(jnp.maximum(images, 0.0), per_image(g))), labels


@augmentation("invert", help="negative image 1 - x")
def invert(images, labels, key):
    """Replace every pixel by 1 - x; `p` makes it random."""
    return 1.0 - images, labels


@augmentation("sharpen", amount=Num(0.0, 4.0), help="unsharp mask with strength U[0, amount]")
def sharpen(images, labels, key, amount=0.5):
    """Sharpen by pushing away from a 3x3 smoothed copy with strength U[0, amount] (PIL Sharpness 1+s)."""
    return adjust_sharpness(images, 1.0 + uniform(key, images.shape[0], 0.0, amount)), labels


@augmentation("emboss", amount=Num(0.0, 1.0), strength=Num(0.0, 2.0),
              help="blend in an embossed copy with weight U[0, amount]")
def emboss(images, labels, key, amount=0.5, strength=1.0):
    """Blend with an embossed copy (imgaug Emboss kernel of `strength`) by U[0, amount]."""
    s = strength
    kernel = ((-1 - s, -s, 0.0), (-s, 1.0, s), (0.0, s, 1 + s))
    embossed = clip01(stencil3x3(images, kernel))
    return clip01(blend(images, embossed, uniform(key, images.shape[0], 0.0, amount))), labels


@augmentation("grayscale", amount=Num(0.0, 1.0), help="blend RGB toward its grey version by `amount`")
def grayscale(images, labels, key, amount=1.0):
    """Desaturate RGB images by `amount` (1 = fully grey, channels kept); grey images: identity."""
    return adjust_saturation(images, jnp.full((images.shape[0],), 1.0 - amount)), labels


# ---- noise and occlusion -------------------------------------------------------------------

@augmentation("gaussian_noise", std=Num(0.0, 1.0), help="add N(0, std^2) per pixel")
def gaussian_noise(images, labels, key, std=0.05):
    """Add independent Gaussian noise of standard deviation `std` to every pixel and channel."""
    return clip01(images + std * jax.random.normal(key, images.shape, images.dtype)), labels


@augmentation("gaussian_blur", sigma=Num(0.0, 20.0), help="separable Gaussian blur with sigma in U[0, sigma] px")
def gaussian_blur(images, labels, key, sigma=1.0):
    """Blur each image with a separable Gaussian of sigma U[0, sigma] pixels (borders renormalised)."""
    if sigma == 0:
        return images, labels
    n, h, w, _ = images.shape
    s = uniform(key, n, 0.0, sigma)
    return clip01(smooth_separable(images, gaussian_matrix(h, s), gaussian_matrix(w, s))), labels


@augmentation("salt_pepper", amount=Num(0.0, 1.0), help="set a fraction `amount` of pixels to 0 or 1")
def salt_pepper(images, labels, key, amount=0.05):
    """Replace a fraction `amount` of pixels (all channels) by black or white with equal chance."""
    n, h, w, _ = images.shape
    # One uniform draw decides both: u < amount hits, and given a hit, u < amount/2 is an even coin.
    u = jax.random.uniform(key, (n, h, w, 1))
    value = (u < 0.5 * amount).astype(images.dtype)
    return jnp.where(u < amount, value, images), labels


def _fill(key, images, fill):
    """The fill image: a constant, or per-pixel uniform noise for 'random'."""
    if fill == "random":
        return jax.random.uniform(key, images.shape, images.dtype)
    return jnp.full_like(images, fill)


@augmentation("coarse_dropout", holes=Num(1, 64, integer=True), size=Num(0.0, 1.0),
              fill=NumOr(Num(0.0, 1.0), ("random",)),
              help="drop `holes` rectangles, each side up to `size` of the image")
def coarse_dropout(images, labels, key, holes=8, size=0.1, fill=0.0):
    """Drop `holes` rectangles per image, sides U[0, size] of the image's, at uniform positions.

    Args:
        holes: rectangles per image (they may overlap).
        size: maximum side as a fraction of the image side; 0 is the identity.
        fill: value of dropped pixels, or 'random' for uniform noise.
    """
    n, h, w, _ = images.shape
    kr, kf = jax.random.split(key)
    u = jax.random.uniform(kr, (4, n, holes))
    hh = jnp.round(u[0] * size * h).astype(jnp.int32)
    ww = jnp.round(u[1] * size * w).astype(jnp.int32)
    top, left = randints(u[2], 0, h - 1), randints(u[3], 0, w - 1)
    # Rows and columns hit by each hole, combined as an outer product: (N, holes, H) x (N, holes, W).
    rows = jnp.arange(h)[None, None, :]
    cols = jnp.arange(w)[None, None, :]
    in_r = ((rows >= top[..., None]) & (rows < (top + hh)[..., None])).astype(jnp.float32)
    in_c = ((cols >= left[..., None]) & (cols < (left + ww)[..., None])).astype(jnp.float32)
    mask = jnp.einsum("nkh,nkw->nhw", in_r, in_c)[..., None] > 0
    return jnp.where(mask, _fill(kf, images, fill), images), labels


@augmentation("cutout", size=Num(0, 4096, integer=True), fill=NumOr(Num(0.0, 1.0), ("random",)),
              help="fill one size x size square at a random centre (DeVries & Taylor 2017)")
def cutout(images, labels, key, size=8, fill=0.0):
    """Cutout: one `size` x `size` square per image, centred anywhere (so it may be clipped by the border)."""
    n, h, w, _ = images.shape
    kc, kf = jax.random.split(key)
    u = uniforms(kc, 2, n)
    cy, cx = randints(u[0], 0, h - 1), randints(u[1], 0, w - 1)
    half = size // 2
    extent = jnp.full((n,), size)
    mask = rect_mask(h, w, cy - half, cx - half, extent, extent)
    return jnp.where(mask, _fill(kf, images, fill), images), labels


@augmentation("random_erasing", scale=Pair(0.0, 1.0), ratio=Pair(0.01, 100.0),
              fill=NumOr(Num(0.0, 1.0), ("random",)),
              help="erase a random rectangle (area fraction in `scale`, aspect in `ratio`) (Zhong et al. 2020)")
def random_erasing(images, labels, key, scale=(0.02, 0.33), ratio=(0.3, 3.3), fill="random"):
    """Random erasing: a rectangle of area U[scale] of the image and aspect h/w log-U[ratio], inside the image.

    Where the sampled shape does not fit, its sides are clipped to the image (instead of the paper's
    retry loop, which has no static shape). scale (0, 0) is the identity.
    """
    n, h, w, _ = images.shape
    kr, kf = jax.random.split(key)
    u = uniforms(kr, 4, n)
    area = (scale[0] + (scale[1] - scale[0]) * u[0]) * h * w
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    r = jnp.exp(lr0 + (lr1 - lr0) * u[1])
    eh = jnp.clip(jnp.round(jnp.sqrt(area * r)), 0, h).astype(jnp.int32)
    ew = jnp.clip(jnp.round(jnp.sqrt(area / r)), 0, w).astype(jnp.int32)
    top = jnp.minimum(jnp.floor(u[2] * (h - eh + 1)).astype(jnp.int32), h - eh)
    left = jnp.minimum(jnp.floor(u[3] * (w - ew + 1)).astype(jnp.int32), w - ew)
    mask = rect_mask(h, w, top, left, eh, ew)
    return jnp.where(mask, _fill(kf, images, fill), images), labels


# ---- weather -------------------------------------------------------------------------------

def smooth_noise(key, n, h, w):
    """(N, H, W, 1) smooth random field in [0, 1]: a few upsampled octaves of uniform noise."""
    # One draw for all octaves (sliced below): one PRNG call keeps the compiled graph small.
    sizes = [(cells + 1) ** 2 for cells in FOG_OCTAVES]
    u = jax.random.uniform(key, (n, sum(sizes)))
    total, norm, start = 0.0, 0.0, 0
    for i, (cells, size) in enumerate(zip(FOG_OCTAVES, sizes, strict=True)):
        grid = u[:, start:start + size].reshape(n, cells + 1, cells + 1, 1)
        start += size
        weight = FOG_PERSISTENCE ** i
        total = total + weight * smooth_separable(grid, resize_matrix(h, cells + 1), resize_matrix(w, cells + 1))
        norm += weight
    return total / norm


@augmentation("fog", amount=Num(0.0, 1.0), help="blend toward white through smooth procedural fog of density `amount`")
def fog(images, labels, key, amount=0.5):
    """Fog: blend each pixel toward white by amount * (a smooth random field), patchy like real haze."""
    n, h, w, _ = images.shape
    field = smooth_noise(key, n, h, w)
    # The field's mean varies little between images; a per-image density keeps some images clear.
    density = amount * (0.5 + 0.5 * field[:, 0, 0, 0])
    f = per_image(density) * field
    return clip01(images * (1.0 - f) + f), labels


@augmentation("clouds", amount=Num(0.0, 1.0), help="bright cloud blobs with soft edges over the image, covering "
                                                    "up to `amount` of it")
def clouds(images, labels, key, amount=0.5):
    """Clouds: a smooth random field thresholded softly at a per-image cover level, blended toward white."""
    n, h, w, _ = images.shape
    kf, kc = jax.random.split(key)
    field = smooth_noise(kf, n, h, w)
    cover = per_image(amount * uniform(kc, n, 0.5, 1.0))  # fraction of the sky with cloud, roughly
    # field quantile ~ 1 - cover lies near 1 - cover for a field spread over [0, 1]; amount 0 leaves no cloud
    alpha = jax.nn.sigmoid(CLOUD_SHARPNESS * (field - (1.0 - cover))) * jnp.minimum(cover * 4.0, 1.0)
    alpha = jnp.where(cover > 0, alpha, 0.0)
    return clip01(images * (1.0 - alpha) + alpha * (0.85 + 0.15 * field)), labels


@augmentation("snow", amount=Num(0.0, 1.0), help="overlay falling snowflake streaks and whiten by `amount`")
def snow(images, labels, key, amount=0.3):
    """Snow: sparse bright flakes smeared diagonally into short streaks, over a slightly whitened image."""
    n, h, w, _ = images.shape
    ks, kd = jax.random.split(key)
    # One uniform draw places flakes (u < density) and, rescaled, gives their brightness in [0.6, 1).
    density = SNOW_DENSITY * amount
    u = jax.random.uniform(ks, (n, h, w, 1))
    seeds = jnp.where(u < density, 0.6 + 0.4 * u / max(density, 1e-9), 0.0)
    # Streaks: each flake also lights the pixels below and to one side of it (falling, wind-blown).
    pad = SNOW_STREAK
    p = jnp.pad(seeds, ((0, 0), (pad, 0), (pad, 0), (0, 0)))
    flakes = seeds
    for s in range(1, SNOW_STREAK):
        flakes = jnp.maximum(flakes, p[:, pad - s:pad - s + h, pad - s:pad - s + w, :] * (1.0 - s / SNOW_STREAK))
    whiten = per_image(SNOW_WHITEN * amount * uniform(kd, n, 0.5, 1.0))
    base = images + whiten * (1.0 - images)
    return clip01(base * (1.0 - flakes) + flakes), labels


# ---- superpixels ---------------------------------------------------------------------------

def slic(images, segments: int, iterations: int = SLIC_ITERATIONS, compactness: float = SLIC_COMPACTNESS):
    """SLIC superpixels of each image: (N, H*W) segment index of every pixel, and (N, S, C) segment means.

    Centres start on a regular grid of about `segments` cells and move by k-means on (row, column,
    colour), position weighted by compactness / grid step. Every pixel is compared with every centre
    (no 2S window as in the paper: at CIFAR sizes that is cheaper than gathering neighbourhoods).
    """
    n, h, w, c = images.shape
    per_axis = max(1, round(math.sqrt(segments)))
    step = max(h, w) / per_axis
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    scale = compactness / step
    position = jnp.stack([rows.reshape(-1), cols.reshape(-1)], -1) * scale  # (P, 2)
    colour = images.reshape(n, h * w, c)
    features = jnp.concatenate([jnp.broadcast_to(position, (n, h * w, 2)), colour], -1)  # (N, P, 2 + C)
    grid = (jnp.arange(per_axis, dtype=jnp.float32) + 0.5) * jnp.asarray([h, w], jnp.float32)[:, None] / per_axis
    start = jnp.stack(jnp.meshgrid(grid[0], grid[1], indexing="ij"), -1).reshape(-1, 2)  # (S, 2) pixel coords
    idx = (jnp.clip(start[:, 0].astype(jnp.int32), 0, h - 1) * w + jnp.clip(start[:, 1].astype(jnp.int32), 0, w - 1))
    centres = features[:, idx]  # (N, S, 2 + C)

    def assign(centres):
        d = (jnp.sum(features**2, -1)[:, :, None] - 2 * jnp.einsum("npf,nsf->nps", features, centres)
             + jnp.sum(centres**2, -1)[:, None, :])
        return jax.nn.one_hot(jnp.argmin(d, -1), centres.shape[1], dtype=features.dtype)  # (N, P, S)

    def update(_, centres):
        a = assign(centres)
        counts = a.sum(1)[..., None]
        means = jnp.einsum("nps,npf->nsf", a, features) / jnp.maximum(counts, 1.0)
        return jnp.where(counts > 0, means, centres)  # an empty segment keeps its centre

    centres = jax.lax.fori_loop(0, iterations, update, centres)
    a = assign(centres)
    means = jnp.einsum("nps,npc->nsc", a, colour) / jnp.maximum(a.sum(1)[..., None], 1.0)
    return jnp.argmax(a, -1), means


@augmentation("superpixels", segments=Num(1, 1024, integer=True), replace=Num(0.0, 1.0),
              help="SLIC superpixels (about `segments`); each replaced by its mean colour with probability `replace`")
def superpixels(images, labels, key, segments=64, replace=0.5):
    """imgaug's Superpixels: segment with SLIC, then paint a random fraction of the segments with their mean."""
    n, h, w, c = images.shape
    segment, means = slic(images, segments)
    chosen = jax.random.bernoulli(key, replace, means.shape[:2])  # (N, S)
    pick = jnp.take_along_axis(chosen, segment, axis=1)[..., None]  # (N, P, 1)
    painted = jnp.take_along_axis(means, segment[..., None], axis=1)  # (N, P, C)
    out = jnp.where(pick, painted, images.reshape(n, h * w, c))
    return out.reshape(n, h, w, c), labels


# ---- mixing --------------------------------------------------------------------------------

def _partners(key, n):
    """A random pairing of the batch (a permutation); an image may be paired with itself."""
    return jax.random.permutation(key, n)


def _beta(key, n, alpha):
    """n draws from Beta(alpha, alpha) as G1 / (G1 + G2) = sigmoid(log G1 - log G2).

    Exactly jax.random.beta's method (log-space, so small alpha does not underflow), but with
    one loggamma call for both gammas: a smaller graph that compiles about a quarter faster.
    """
    lg = jax.random.loggamma(key, alpha, (2, n), jnp.float32)
    return jax.nn.sigmoid(lg[0] - lg[1])


@augmentation("mixup", alpha=Num(0.0, 100.0), help="mix image pairs and their labels with lambda ~ Beta(alpha, alpha)")
def mixup(images, labels, key, alpha=0.2):
    """Mixup (Zhang et al. 2018): x = l x_i + (1-l) x_j, y = l y_i + (1-l) y_j, one l ~ Beta(alpha, alpha) per image.

    alpha 0 is the identity (lambda = 1).
    """
    if alpha == 0:
        return images, labels
    n = images.shape[0]
    kp, kl = jax.random.split(key)
    j = _partners(kp, n)
    lam = _beta(kl, n, alpha)
    return blend(images[j], images, lam), labels[j] + lam[:, None] * (labels - labels[j])


@augmentation("cutmix", alpha=Num(0.0, 100.0),
              help="paste a box from a partner image; labels mixed by the pasted area (Yun et al. 2019)")
def cutmix(images, labels, key, alpha=1.0):
    """CutMix: paste a box of area ~(1 - l) HW, l ~ Beta(alpha, alpha), from a partner image.

    The box is clipped at the border, and the label weight is the area actually pasted, so labels
    always match pixels. alpha 0 is the identity.
    """
    if alpha == 0:
        return images, labels
    n, h, w, _ = images.shape
    kp, kl, kc = jax.random.split(key, 3)
    j = _partners(kp, n)
    lam = _beta(kl, n, alpha)
    cut = jnp.sqrt(1.0 - lam)
    bh, bw = jnp.round(cut * h).astype(jnp.int32), jnp.round(cut * w).astype(jnp.int32)
    u = uniforms(kc, 2, n)
    cy, cx = randints(u[0], 0, h - 1), randints(u[1], 0, w - 1)
    y0, y1 = jnp.clip(cy - bh // 2, 0, h), jnp.clip(cy - bh // 2 + bh, 0, h)
    x0, x1 = jnp.clip(cx - bw // 2, 0, w), jnp.clip(cx - bw // 2 + bw, 0, w)
    mask = rect_mask(h, w, y0, x0, y1 - y0, x1 - x0)
    pasted = ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
    return jnp.where(mask, images[j], images), labels + pasted[:, None] * (labels[j] - labels)
