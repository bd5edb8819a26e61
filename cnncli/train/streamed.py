"""Training on the streaming path (data.pipeline=stream): device batches from the Grain pipeline,
evaluation over a stream, and the stream's position in checkpoints.

The jitted steps are the in-memory path's: each gets one batch of exactly batch_size rows, sharded
along the mesh's `data` axis, and slices batch 0 of it. Every process puts only its own rows of
each global batch on its devices (`jax.make_array_from_process_local_data`), as it read only those.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cnncli.data.stream import TRAIN, Stream, StreamSplits
from cnncli.errors import UserError
from cnncli.run import distributed
from cnncli.train.evaluate import init_eval_sums, make_eval_step, metrics_from_sums
from cnncli.train.steps import local_rows, replicate

DEVICE_KEYS = ("image", "label", "mask")


def rows(mesh, batch: int) -> tuple[int, int]:
    """(start, stop) of this process's rows of a global batch."""
    block = local_rows(mesh, batch)
    return block.start, block.stop


def device_putter(mesh, batch: int, eval_batch: int):
    """element -> {image, label, mask} as global arrays of the element's batch, this process's rows only."""
    sharding = NamedSharding(mesh, P("data"))

    def put(element: dict) -> dict:
        size = batch if int(element["kind"]) == TRAIN else eval_batch
        return {k: jax.make_array_from_process_local_data(sharding, element[k], (size, *element[k].shape[1:]))
                for k in DEVICE_KEYS}

    return put


def train_stream(splits: StreamSplits, mesh, *, epochs: int, batch: int, eval_batch: int, seed: int,
                 state: dict | None = None) -> Stream:
    """The run's stream of training and validation batches (see data.stream), from `state` when resuming."""
    return splits.train_stream(epochs=epochs, batch=batch, eval_batch=eval_batch, rows=rows(mesh, batch),
                               eval_rows=rows(mesh, eval_batch), seed=seed,
                               to_device=device_putter(mesh, batch, eval_batch), state=state)


def evaluate_stream(eval_def, weights: list[tuple[Any, Any]], stream: Stream, batches: int, class_names: list[str],
                    *, batch_size: int, mesh, step_fn=None, progress=None, tta: bool = False) -> list[dict[str, Any]]:
    """evaluate()'s metrics over the next `batches` (padded, masked) evaluation batches of `stream`, for each
    (params, rest) in `weights`: every batch is read once and evaluated with each. `step_fn` is a
    compiled `make_eval_step` of this batch size."""
    num_classes = len(class_names)
    step = step_fn or make_eval_step(eval_def, num_classes=num_classes, batch_size=batch_size, mesh=mesh, tta=tta)
    weights = [replicate(w, mesh) for w in weights]
    sums = [init_eval_sums(num_classes) for _ in weights]
    for i in range(batches):
        _, batch = stream.next()
        arrays = (batch["image"], batch["label"], batch["mask"])  # one batch: the step's batch 0
        for k, consts in enumerate(weights):
            sums[k], _ = step.step(consts, sums[k], arrays, jnp.int32(0))
        if progress is not None:
            progress(i + 1, batches)
    return [metrics_from_sums(jax.device_get(s), class_names) for s in sums]


def evaluate_split(eval_def, weights: list[tuple[Any, Any]], splits: StreamSplits, split: str, *, batch_size: int,
                   mesh, seed: int, progress=None, tta: bool = False) -> list[dict[str, Any]]:
    """Metrics of one pass over the `split` (train, val or test) of a streamed dataset, for each (params, rest)."""
    stream = splits.eval_stream(split, batch=batch_size, rows=rows(mesh, batch_size), seed=seed,
                                to_device=device_putter(mesh, batch_size, batch_size))
    try:
        n = len(splits.split_ids(split)[0])
        return evaluate_stream(eval_def, weights, stream, -(-n // batch_size), splits.class_names,
                               batch_size=batch_size, mesh=mesh, progress=progress, tta=tta)
    finally:
        stream.close()


def checkpoint_extra(stream: Stream) -> dict:
    """What a checkpoint keeps of the stream: every process's Grain iterator state (JSON-ready)."""
    return {"stream": distributed.gather(stream.state())}


def resume_state(extra: dict | None) -> dict | None:
    """This process's Grain state from a checkpoint's extra item (None: start the stream at the beginning).

    Raises:
        UserError: The checkpoint was written by a run of another number of processes.
    """
    states = (extra or {}).get("stream")
    if states is None:
        return None
    if len(states) != jax.process_count():
        raise UserError(f"the checkpoint's input stream was saved by {len(states)} processes; resume it with "
                        f"{len(states)} processes (this run has {jax.process_count()})")
    return states[jax.process_index()]


def stream_stats(stream: Stream) -> dict[str, Any]:
    """Per process: records read, corrupt images skipped, seconds spent waiting for a batch."""
    mine = [stream.records_read, stream.skipped, round(stream.wait_seconds, 3)]
    every = np.asarray(distributed.gather(mine))
    return {"records_read": every[:, 0].astype(int).tolist(), "skipped_corrupt": int(every[:, 1].sum()),
            "input_wait_s": every[:, 2].tolist()}
