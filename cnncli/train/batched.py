"""One way to run a jitted function over a whole split: pad to whole batches, put the split on the
device(s) once, call one compiled step per batch.

Evaluation, attacks over a split, the passes of `cnncli visualize` and `predict`, and the logits
LwF records all run through `Batched`. The step slices its batch from the device-resident arrays
(no host-to-device copy per batch); the last batch is padded, and a mask (1 for a real example,
0 for padding) travels with every batch, so every example counts exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnncli.train.steps import replicate, stack_batches, take_batch

# fn(consts, carry, batch, index) -> (carry, per-example outputs or None); batch ends with the mask.
BatchFn = Callable[[Any, Any, tuple[jax.Array, ...], jax.Array], tuple[Any, Any]]


def pad_to_batches(arrays: Sequence[np.ndarray], batch: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Arrays zero-padded along the first axis to a whole number of batches, and the mask of real examples."""
    n = len(arrays[0])
    padded = -(-n // batch) * batch
    mask = np.zeros(padded, np.float32)
    mask[:n] = 1.0
    if padded == n:
        return list(arrays), mask
    return [np.concatenate([a, np.zeros((padded - n, *a.shape[1:]), a.dtype)]) for a in arrays], mask


class Batched:
    """`fn` applied to per-example arrays batch by batch, in one compiled step per batch.

    Args:
        fn: fn(consts, carry, batch, index) -> (carry, outputs). `batch` is the index-th batch of each
            array, then the mask; `carry` is what the previous batch returned (a running sum, a
            running top-k); `outputs` are per-example arrays (or None), concatenated over the split.
        batch_size: examples per step (a multiple of the device count with a mesh).
        mesh: shard each batch along the mesh's `data` axis and replicate `consts` (None: one device).
        stacked: several processes: each puts only its own rows of every batch on its devices.
        donate_carry: let the step reuse the carry's buffers (a carry the caller never reads again).
    """

    def __init__(self, fn: BatchFn, *, batch_size: int, mesh: Mesh | None = None, stacked: bool = False,
                 donate_carry: bool = False):
        self.batch_size, self.mesh, self.stacked = batch_size, mesh, stacked
        sharding = None if mesh is None else NamedSharding(mesh, P("data"))

        def step(consts, carry, arrays, index):
            batch = tuple(take_batch(a, index, batch_size, stacked) for a in arrays)
            if sharding is not None:
                batch = tuple(jax.lax.with_sharding_constraint(b, sharding) for b in batch)
            return fn(consts, carry, batch, index)

        # the compiled step on device arrays, for callers that time or test one batch
        self.step = jax.jit(step, donate_argnums=(1,) if donate_carry else ())

    def put(self, arrays: Sequence[np.ndarray]) -> tuple[tuple[jax.Array, ...], int]:
        """The padded arrays and their mask on the device(s), and the number of batches."""
        padded, mask = pad_to_batches(arrays, self.batch_size)
        padded.append(mask)
        if self.stacked:
            order = np.arange(len(mask))
            on_device = tuple(stack_batches(a, order, self.batch_size, self.mesh) for a in padded)
        else:
            on_device = tuple(jnp.asarray(a) for a in padded)
            if self.mesh is not None:
                on_device = replicate(on_device, self.mesh)
        return on_device, len(mask) // self.batch_size

    def __call__(self, consts, arrays: Sequence[np.ndarray], carry=None,
                 progress: Callable[[int, int], None] | None = None) -> tuple[Any, Any]:
        """(the last carry, the per-example outputs as NumPy arrays trimmed to the examples, or None).

        `progress(done, total)` is called after every batch.
        """
        n = len(arrays[0])
        on_device, batches = self.put(arrays)
        if self.mesh is not None:
            consts = replicate(consts, self.mesh)  # a restored model lives on one device until now
        parts = []
        for i in range(batches):
            carry, out = self.step(consts, carry, on_device, jnp.int32(i))
            if out is not None:
                parts.append(jax.device_get(out))
            if progress is not None:
                progress(i + 1, batches)
        outputs = jax.tree.map(lambda *p: np.concatenate(p)[:n], *parts) if parts else None
        return carry, outputs
