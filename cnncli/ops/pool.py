"""Max-pooling over whole, non-overlapping windows, with a gradient that is cheap on the CPU.

`window_max` takes the input already cut into windows, (N, OH, KH, OW, KW, C), and returns the
maximum of each, (N, OH, OW, C). JAX's own gradient of that reduction splits the output gradient
evenly among tied maxima, so its forward pass also counts the ties: a compare and a sum as large
as the input, in every training step. Ours sends each window's gradient to its first maximal
element in row-major order, as PyTorch's max-pooling and XLA's select-and-scatter do, so the
forward pass is the maximum alone and the backward pass one elementwise loop over the input.

The backward pass reads the input as the forward pass stored it (`cnncli.ops.conv.stored`): XLA
would otherwise recompute it there, once per window position, from whatever produced it (LeNet-5's
first convolution, 25 multiply-adds a pixel). The conditional's predicate reads the pool's first
output, so a data-parallel step sends that one number from its device to the others. The speed-ups
(with the ReLU moved after the pool, `cnncli.models.layers.activates_after_pool`) are in
docs/performance.md ("The rules", `window_max`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cnncli.ops.conv import stored


@jax.custom_vjp
def window_max(x: jax.Array) -> jax.Array:
    """The maximum over axes 2 and 4 of x (N, OH, KH, OW, KW, C): (N, OH, OW, C)."""
    return x.max(axis=(2, 4))


def _window_max_fwd(x):
    y = window_max(x)
    return y, (x, y)


def _window_max_bwd(residuals, g):
    x, y = residuals
    x = stored(x, y)
    _, _, kh, _, kw, _ = x.shape
    taken = jnp.zeros(y.shape, bool)  # whether an earlier position of the window was the maximum
    rows = []
    for i in range(kh):
        row = []
        for j in range(kw):
            seen = x[:, :, i, :, j]
            # A NaN maximum goes to the window's first NaN (NaN == NaN is false).
            first = ((seen == y) | jnp.isnan(seen)) & ~taken
            taken = taken | first
            row.append(jnp.where(first, g, jnp.zeros((), g.dtype)))
        rows.append(jnp.stack(row, axis=3))  # (N, OH, OW, KW, C)
    return (jnp.stack(rows, axis=2),)


window_max.defvjp(_window_max_fwd, _window_max_bwd)
