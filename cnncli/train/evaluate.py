"""Evaluation: top-1, top-k, mean loss, per-class accuracy, precision, recall and F1, the confusion matrix
and its most-confused pairs of a split.

Every example is counted exactly once: the last partial batch is padded and masked, never dropped.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnncli.data.pipeline import pad_for_eval
from cnncli.run.distributed import multiprocess
from cnncli.train.metrics import classification_report, confused_pairs
from cnncli.train.steps import TOP_K, check_batch, init_eval_sums, make_eval_step, replicate, stack_batches


def evaluate(eval_def, params, rest, x: np.ndarray, y: np.ndarray, class_names: list[str], *, batch_size: int,
             mesh, step_fn=None, progress=None, tta: bool = False) -> dict[str, Any]:
    """Metrics of the model (graphdef in eval mode + state) on uint8 images x and labels y.

    `step_fn` reuses an already compiled eval step (training evaluates every epoch); `progress`
    is an optional callable(done, total) for a progress bar; `tta` averages each image's softmax with
    that of its horizontal flip.
    """
    num_classes = len(class_names)
    batch_size = eval_batch(len(x), batch_size, mesh)
    stacked = multiprocess()
    step = step_fn or make_eval_step(eval_def, num_classes=num_classes, batch_size=batch_size, mesh=mesh, tta=tta,
                                     stacked=stacked)
    xp, yp, mask = pad_for_eval(x, y.astype(np.int32), batch_size)
    if stacked:  # several processes: each puts only its rows of every batch on its devices
        order = np.arange(len(xp))
        xs, ys, ms = (stack_batches(a, order, batch_size, mesh) for a in (xp, yp, mask))
    else:
        xs, ys, ms = replicate((jnp.asarray(xp), jnp.asarray(yp), jnp.asarray(mask)), mesh)
    params, rest = replicate((params, rest), mesh)  # a restored model lives on one device until now
    sums = init_eval_sums(num_classes)
    n_batches = len(xp) // batch_size
    for i in range(n_batches):
        sums = step(params, rest, sums, xs, ys, ms, jnp.int32(i))
        if progress is not None:
            progress(i + 1, n_batches)
    return metrics_from_sums(jax.device_get(sums), class_names)


def eval_batch(n: int, requested: int, mesh) -> int:
    """The evaluation batch: no larger than the split needs, and a multiple of the device count."""
    devices = mesh.devices.size
    batch = _round_up(min(requested, _round_up(n, devices)), devices)
    check_batch(batch, mesh, "eval batch size")
    return batch


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def metrics_from_sums(sums: dict[str, np.ndarray], class_names: list[str]) -> dict[str, Any]:
    """The JSON-ready result from summed counts: fractions and means, not percentages."""
    confusion = np.rint(np.asarray(sums["confusion"])).astype(np.int64)
    n = int(confusion.sum())
    per_class_n = confusion.sum(axis=1)
    per_class = [{"class": name, "index": i, "n": int(per_class_n[i]),
                  "accuracy": float(confusion[i, i] / per_class_n[i]) if per_class_n[i] else None}
                 for i, name in enumerate(class_names)]
    return {"n": n, "top1": float(sums["top1"]) / max(n, 1), "top5": float(sums["topk"]) / max(n, 1),
            "top_k": min(TOP_K, len(class_names)), "loss": float(sums["loss"]) / max(n, 1),
            "per_class": per_class, "class_names": list(class_names), "confusion": confusion.tolist(),
            "report": classification_report(confusion, class_names),
            "most_confused": confused_pairs(confusion, class_names)}
