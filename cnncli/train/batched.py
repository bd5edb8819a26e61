"""One way to run a jitted function over a whole split: pad to whole batches, put the split on the
device(s) once, call one compiled step per batch.

Evaluation, attacks over a split, the passes of `cnncli visualize` and `predict`, and the logits
LwF records all run through `Batched`. Each batch is put on the devices once, before the first step
(no host-to-device copy between steps); the step takes one batch, so its compiled program depends
on the batch shape only, not on the split's size: validation and test passes of one batch size share
it. The last batch is padded, and a mask (1 for a real example, 0 for padding) travels with every
batch, so every example counts exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnncli.train.steps import local_rows, replicate

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
        self.sharding = None if mesh is None else NamedSharding(mesh, P("data"))
        sharding = self.sharding

        def step(consts, carry, batch, index):
            if sharding is not None:
                batch = tuple(jax.lax.with_sharding_constraint(b, sharding) for b in batch)
            return fn(consts, carry, batch, index)

        # the compiled step on one batch of device arrays, for callers that time, compile or test one batch
        self.step = jax.jit(step, donate_argnums=(1,) if donate_carry else ())

    def put(self, arrays: Sequence[np.ndarray]) -> list[tuple[jax.Array, ...]]:
        """The padded arrays and their mask on the device(s), batch by batch."""
        padded, mask = pad_to_batches(arrays, self.batch_size)
        padded.append(mask)
        b = self.batch_size
        if self.stacked:
            rows = local_rows(self.mesh, b)

            def put(a: np.ndarray, start: int) -> jax.Array:
                local = a[start + rows.start:start + rows.stop]
                return jax.make_array_from_process_local_data(self.sharding, local, (b, *a.shape[1:]))
        else:
            def put(a: np.ndarray, start: int) -> jax.Array:
                return jax.device_put(a[start:start + b], self.sharding)
        return [tuple(put(a, start) for a in padded) for start in range(0, len(mask), b)]

    def __call__(self, consts, arrays: Sequence[np.ndarray], carry=None,
                 progress: Callable[[int, int], None] | None = None) -> tuple[Any, Any]:
        """(the last carry, the per-example outputs as NumPy arrays trimmed to the examples, or None).

        `progress(done, total)` is called after every batch.
        """
        n = len(arrays[0])
        batches = self.put(arrays)
        if self.mesh is not None:
            # a restored model lives on one device until now; the carry is placed as the step returns
            # it, so that its first call does not compile a program of its own
            consts, carry = replicate((consts, carry), self.mesh)
        parts = []
        for i, batch in enumerate(batches):
            carry, out = self.step(consts, carry, batch, jnp.int32(i))
            if out is not None:
                parts.append(jax.device_get(out))
            if progress is not None:
                progress(i + 1, len(batches))
        outputs = jax.tree.map(lambda *p: np.concatenate(p)[:n], *parts) if parts else None
        return carry, outputs
