#!/usr/bin/env python3
"""The locally connected layer's windows: `lax.conv_general_dilated_patches` against kh*kw strided slices
(`cnncli.models.layers.conv.window_patches`), timed in turn in one process (only the ratio is meaningful
on a shared machine).

The step is the layer's forward and backward (gradients of the kernel and the input) on the second
layer of `localnet_fashion_mnist`: a batch of 14x14x16 maps, 5x5 windows, 32 output maps.

Usage: python benchmarks/local_patches.py [--batch-size 128] [--rounds 5]
"""
import argparse
import time

import jax
import jax.numpy as jnp
from jax import lax

from cnncli.models.layers.conv import window_patches

K, HW, C_IN, C_OUT = 5, 14, 16, 32
PADS = ((2, 2), (2, 2))


def by_convolution(x):
    return lax.conv_general_dilated_patches(x, (K, K), (1, 1), PADS, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def by_slices(x):
    return window_patches(x, (K, K), (1, 1), PADS, (HW, HW))


def grad_step(patches):
    def loss(kernel, x):
        return jnp.sum(jax.nn.relu(jnp.einsum("nhwk,hwkc->nhwc", patches(x), kernel)) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    x = jax.random.normal(jax.random.key(0), (args.batch_size, HW, HW, C_IN))
    kernel = 0.05 * jax.random.normal(jax.random.key(1), (HW, HW, K * K * C_IN, C_OUT))
    a, b = grad_step(by_convolution), grad_step(by_slices)
    ga, gb = a(kernel, x), b(kernel, x)  # compiles both
    diff = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(ga, gb, strict=True))
    ta = tb = 0.0
    for _ in range(args.rounds):
        t = time.perf_counter()
        jax.block_until_ready(a(kernel, x))
        ta += time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(b(kernel, x))
        tb += time.perf_counter() - t
    print(f"conv_general_dilated_patches {ta / args.rounds:.3f} s/step, slices {tb / args.rounds:.3f} s/step: "
          f"slices {ta / tb:.2f}x faster; largest gradient difference {diff:.2g}")


if __name__ == "__main__":
    main()
