"""Normalization layers: batch norm, AlexNet's local response norm, local contrast norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from cnncli.models.layers.core import Layer
from cnncli.registry import Registry

BN_MOMENTUM = 0.9  # flax's momentum is PyTorch's 1 - 0.1


BN_EPS = 1e-5


LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0  # AlexNet paper, section 3.3


LCN_SIZE, LCN_SIGMA = 9, 2.0  # Jarrett et al. 2009: 9x9 Gaussian window




class LRN(nnx.Module):
    """Local response normalization across channels, as in the AlexNet paper (section 3.3).

    b = a / (k + alpha * sum_{n neighbouring channels} a^2) ** beta. PyTorch's LocalResponseNorm
    divides alpha by n; the paper (and Caffe's AlexNet reproduction with alpha/n) differ only in
    that constant.
    """

    def __init__(self, size: int = LRN_SIZE, alpha: float = LRN_ALPHA, beta: float = LRN_BETA, k: float = LRN_K):
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def __call__(self, x: jax.Array) -> jax.Array:
        pad = (self.size // 2, (self.size - 1) // 2)
        sq = lax.reduce_window(x * x, 0.0, lax.add, (1, 1, 1, self.size), (1, 1, 1, 1),
                               ((0, 0), (0, 0), (0, 0), pad))
        return x / (self.k + self.alpha * sq) ** self.beta


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


class LCN(nnx.Module):
    """Local contrast normalization (Jarrett et al. 2009), used by ZFNet after its first layers.

    Subtractive step: remove the Gaussian-weighted local mean taken over all channels; divisive
    step: divide by the local standard deviation, floored at its mean over the image so that flat
    regions are not amplified. No parameters.
    """

    def __init__(self, size: int = LCN_SIZE, sigma: float = LCN_SIGMA):
        self.size, self.sigma = size, sigma

    def _smooth(self, x: jax.Array) -> jax.Array:
        window = jnp.asarray(_gaussian_window(self.size, self.sigma))[:, :, None, None]
        return lax.conv_general_dilated(x.mean(axis=-1, keepdims=True), window, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def __call__(self, x: jax.Array) -> jax.Array:
        v = x - self._smooth(x)
        sigma = jnp.sqrt(self._smooth(v * v) + 1e-12)
        floor = jnp.maximum(sigma.mean(axis=(1, 2, 3), keepdims=True), 1e-4)
        return v / jnp.maximum(sigma, floor)


NORMS = Registry("norm")
NORMS.register("batch", lambda channels, rngs: nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                                                             rngs=rngs),
               help="batch normalization (Ioffe & Szegedy 2015)")
NORMS.register("lrn", lambda channels, rngs: LRN(), help="local response normalization (AlexNet)")
NORMS.register("lcn", lambda channels, rngs: LCN(), help="local contrast normalization (Jarrett et al. 2009)")
NORMS.register("none", lambda channels, rngs: None, help="no normalization")


def make_norm(kind: str | None, channels: int, rngs: nnx.Rngs):
    """A normalization module by name (a `NORMS` entry); `None`/'none' gives None."""
    return None if kind is None else NORMS.get(kind)(channels, rngs)


class Norm(Layer):
    """A standalone normalization layer (batch, lrn, lcn)."""

    kind = "norm"

    def __init__(self, kind: str, channels: int, *, rngs: nnx.Rngs):
        self.name = kind
        self.norm = make_norm(kind, channels, rngs)

    def forward(self, x):
        return x if self.norm is None else self.norm(x)

    def describe(self):
        return {"batch": "batch norm", "lrn": "local response norm", "lcn": "local contrast norm"}.get(self.name,
                                                                                                         self.name)

