"""Geometric augmentations: flips, crops, affine warps, perspective and elastic distortion.

All resampling goes through `augment_core.warp_affine` / `sample_bilinear` (bilinear, 0 outside),
except flips and the pad-and-crop, which move whole pixels and are written as exact index maps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cnncli.data.augment.core import (
    Choice,
    Num,
    Pair,
    affine_matrices,
    augmentation,
    box_matrices,
    gaussian_matrix,
    pixel_grid,
    randints,
    sample_bilinear,
    smooth_separable,
    symmetric,
    uniform,
    uniforms,
    warp_affine,
)

MAX_DEGREES = 180.0
# Simard et al. (2003) used alpha=34, sigma=4 on 28x28 MNIST digits.
ELASTIC_ALPHA = 34.0
ELASTIC_SIGMA = 4.0


@augmentation("hflip", help="mirror left-right (use p: 0.5 for a random flip)")
def hflip(images, labels, key):
    """Mirror every selected image left-right; `p` makes it random."""
    return images[:, :, ::-1, :], labels


@augmentation("vflip", help="mirror top-bottom (use p: 0.5 for a random flip)")
def vflip(images, labels, key):
    """Mirror every selected image top-bottom; `p` makes it random."""
    return images[:, ::-1, :, :], labels


def _reflect(i, n):
    """Reflect indices into [0, n) without repeating the edge (numpy 'reflect')."""
    if n == 1:
        return jnp.zeros_like(i)
    period = 2 * (n - 1)
    i = jnp.abs(i) % period
    return jnp.where(i >= n, period - i, i)


@augmentation("crop", pad=Num(0, 1024, integer=True), mode=Choice(("zeros", "reflect", "edge")),
              help="pad by `pad` px and crop back at a random offset (random translation by whole pixels)")
def crop(images, labels, key, pad=4, mode="zeros"):
    """Pad-and-random-crop: shift each image by up to `pad` whole pixels in x and y.

    Args:
        pad: maximum shift in pixels; 0 is the identity.
        mode: what the vacated border shows: zeros, the reflected image, or the repeated edge.
    """
    if pad == 0:
        return images, labels
    n, h, w, c = images.shape
    u = uniforms(key, 2, n)
    dx = randints(u[0], -pad, pad)[:, None, None]
    dy = randints(u[1], -pad, pad)[:, None, None]
    cols = jnp.arange(w)[None, None, :] - dx
    rows = jnp.arange(h)[None, :, None] - dy
    valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    if mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:
        rows, cols = jnp.clip(rows, 0, h - 1), jnp.clip(cols, 0, w - 1)
    idx = (rows * w + cols).reshape(n, -1, 1)
    out = jnp.take_along_axis(images.reshape(n, h * w, c), idx, axis=1, mode="clip").reshape(n, h, w, c)
    if mode == "zeros":
        out = out * valid[..., None]
    return out, labels


@augmentation("random_crop", scale=Pair(0.0, 1.0), ratio=Pair(0.0, 100.0),
              help="crop a random box (area fraction in `scale`, aspect in `ratio`) and resize it back")
def random_crop(images, labels, key, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random-resized crop (Szegedy et al. 2015; torchvision RandomResizedCrop), bilinear.

    Args:
        scale: range of the box area as a fraction of the image; (1, 1) with ratio (1, 1) is the identity.
        ratio: range of the box aspect ratio width/height, sampled log-uniformly; the box is
            shrunk to fit inside the image when the aspect pushes it out.
    """
    n, h, w, _ = images.shape
    u = uniforms(key, 4, n)
    area = (scale[0] + (scale[1] - scale[0]) * u[0]) * h * w
    lr0, lr1 = math.log(max(ratio[0], 1e-6)), math.log(max(ratio[1], 1e-6))
    r = jnp.exp(lr0 + (lr1 - lr0) * u[1])
    bw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
    bh = jnp.clip(jnp.sqrt(area / r), 1.0, h)
    left = u[2] * (w - bw)
    top = u[3] * (h - bh)
    # The box's pixel centres run from top to top + bh - 1.
    m = box_matrices(h, w, top, left, top + bh - 1.0, left + bw - 1.0)
    return warp_affine(images, m), labels


@augmentation("crop_and_pad", percent=Num(0.0, 0.5),
              help="crop or pad each side by a random fraction in [-percent, percent], resize back")
def crop_and_pad(images, labels, key, percent=0.1):
    """Crop or pad each side independently by U[-percent, percent] of the side, then resize back (imgaug).

    A positive draw crops that side, a negative one pads it with zeros; percent 0 is the identity.
    """
    n, h, w, _ = images.shape
    u = (2.0 * uniforms(key, 4, n) - 1.0) * percent
    top, left = u[0] * h, u[1] * w
    bottom, right = (h - 1) - u[2] * h, (w - 1) - u[3] * w
    return warp_affine(images, box_matrices(h, w, top, left, bottom, right)), labels


@augmentation("translate", x=Num(0.0, 1.0), y=Num(0.0, 1.0),
              help="shift by up to x of the width and y of the height (bilinear, zeros enter)")
def translate(images, labels, key, x=0.1, y=0.1):
    """Translate each image by U[-x, x] of its width and U[-y, y] of its height."""
    n, h, w, _ = images.shape
    u = 2.0 * uniforms(key, 2, n) - 1.0
    m = affine_matrices(h, w, n, tx=u[0] * x * w, ty=u[1] * y * h)
    return warp_affine(images, m), labels


@augmentation("rotate", degrees=Num(0.0, MAX_DEGREES), help="rotate by U[-degrees, degrees] about the centre")
def rotate(images, labels, key, degrees=15.0):
    """Rotate each image about its centre by U[-degrees, degrees] (positive = counter-clockwise)."""
    n, h, w, _ = images.shape
    return warp_affine(images, affine_matrices(h, w, n, angle=symmetric(key, n, degrees))), labels


@augmentation("scale", amount=Num(0.0, 0.95), help="zoom by a factor in U[1-amount, 1+amount] about the centre")
def scale(images, labels, key, amount=0.1):
    """Zoom each image about its centre by a factor in U[1 - amount, 1 + amount]."""
    n, h, w, _ = images.shape
    s = uniform(key, n, 1.0 - amount, 1.0 + amount)
    return warp_affine(images, affine_matrices(h, w, n, scale=s)), labels


@augmentation("shear", degrees=Num(0.0, 80.0), axis=Choice(("x", "y", "both")),
              help="shear by U[-degrees, degrees] along x, y or both")
def shear(images, labels, key, degrees=10.0, axis="x"):
    """Shear each image about its centre by an angle in U[-degrees, degrees] along `axis`."""
    n, h, w, _ = images.shape
    u = (2.0 * uniforms(key, 2, n) - 1.0) * degrees
    sx = u[0] if axis in ("x", "both") else 0.0
    sy = u[1] if axis in ("y", "both") else 0.0
    return warp_affine(images, affine_matrices(h, w, n, shear_x=sx, shear_y=sy)), labels


@augmentation("affine", degrees=Num(0.0, MAX_DEGREES), scale=Num(0.0, 0.95), shear=Num(0.0, 80.0),
              translate=Num(0.0, 1.0), help="rotate + scale + shear + translate in one resampling")
def affine(images, labels, key, degrees=10.0, scale=0.1, shear=5.0, translate=0.1):
    """Random affine warp with one bilinear resampling (Keras/torchvision RandomAffine).

    Args:
        degrees: rotation in U[-degrees, degrees].
        scale: zoom factor in U[1 - scale, 1 + scale].
        shear: x-shear angle in U[-shear, shear] degrees.
        translate: shift in U[-translate, translate] of the width/height.
    """
    n, h, w, _ = images.shape
    u = 2.0 * uniforms(key, 5, n) - 1.0
    m = affine_matrices(h, w, n, angle=u[0] * degrees, scale=1.0 + u[1] * scale, shear_x=u[2] * shear,
                        tx=u[3] * translate * w, ty=u[4] * translate * h)
    return warp_affine(images, m), labels


def _homographies(src, dst):
    """(N, 3, 3) homographies mapping the 4 `src` points to `dst` (N, 4, 2), by a batched 8x8 solve."""
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    zero, one = jnp.zeros_like(x), jnp.ones_like(x)
    rows_u = jnp.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = jnp.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    a = jnp.concatenate([rows_u, rows_v], axis=1)
    b = jnp.concatenate([u, v], axis=1)
    hcoef = jnp.linalg.solve(a, b[..., None])[..., 0]
    return jnp.concatenate([hcoef, jnp.ones_like(hcoef[:, :1])], -1).reshape(-1, 3, 3)


@augmentation("perspective", distortion=Num(0.0, 0.5),
              help="move each corner by up to `distortion` of the size and warp (projective)")
def perspective(images, labels, key, distortion=0.2):
    """Random perspective warp: each corner moves inward/outward by U[0, distortion] of the side.

    The homography maps output corners to the displaced source corners, so 0 is the identity.
    """
    if distortion == 0:
        return images, labels
    n, h, w, _ = images.shape
    corners = jnp.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], jnp.float32)
    inward = jnp.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], jnp.float32)
    amount = jax.random.uniform(key, (n, 4, 2), jnp.float32, -distortion, distortion)
    src = corners + inward * amount * jnp.array([w, h], jnp.float32)
    hm = _homographies(jnp.broadcast_to(corners, (n, 4, 2)), src)
    gx, gy = pixel_grid(h, w)
    pts = jnp.stack([gx, gy, jnp.ones_like(gx)], -1)
    q = jnp.einsum("nij,hwj->nhwi", hm, pts)
    return sample_bilinear(images, q[..., 0] / q[..., 2], q[..., 1] / q[..., 2]), labels


@augmentation("elastic", alpha=Num(0.0, 1000.0), sigma=Num(0.1, 100.0),
              help="elastic distortion (Simard 2003): Gaussian-smoothed random displacements times alpha px")
def elastic(images, labels, key, alpha=ELASTIC_ALPHA, sigma=ELASTIC_SIGMA):
    """Elastic distortion: U[-1, 1] displacement fields smoothed by a Gaussian of `sigma` px, scaled by `alpha`.

    alpha 0 is the identity.
    """
    n, h, w, _ = images.shape
    field = jax.random.uniform(key, (n, h, w, 2), jnp.float32, -1.0, 1.0)
    field = smooth_separable(field, gaussian_matrix(h, sigma), gaussian_matrix(w, sigma)) * alpha
    gx, gy = pixel_grid(h, w)
    return sample_bilinear(images, gx + field[..., 0], gy + field[..., 1]), labels
