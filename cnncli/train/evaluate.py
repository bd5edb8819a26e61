"""Evaluation: top-1, top-k, mean loss, per-class accuracy, precision, recall and F1, the confusion matrix
and its most-confused pairs of a split.

Every example is counted exactly once: the last partial batch is padded and masked, never dropped.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cnncli.run.distributed import multiprocess
from cnncli.train.batched import Batched
from cnncli.train.metrics import classification_report, confused_pairs
from cnncli.train.steps import check_batch, forward, to_pixels
from cnncli.train.toolbox import flip_tta_logits

TOP_K = 5


def evaluate(eval_def, params, rest, x: np.ndarray, y: np.ndarray, class_names: list[str], *, batch_size: int,
             mesh, step_fn: Batched | None = None, progress=None, tta: bool = False) -> dict[str, Any]:
    """Metrics of the model (graphdef in eval mode + state) on uint8 images x and labels y.

    `step_fn` reuses an already compiled eval step (training evaluates every epoch); `progress`
    is an optional callable(done, total) for a progress bar; `tta` averages each image's softmax with
    that of its horizontal flip.
    """
    num_classes = len(class_names)
    batch_size = eval_batch(len(x), batch_size, mesh)
    step = step_fn or make_eval_step(eval_def, num_classes=num_classes, batch_size=batch_size, mesh=mesh, tta=tta,
                                     stacked=multiprocess())
    sums, _ = step((params, rest), (x, y.astype(np.int32)), init_eval_sums(num_classes), progress)
    return metrics_from_sums(jax.device_get(sums), class_names)


def make_eval_step(eval_def, *, num_classes: int, batch_size: int, mesh: Mesh, tta: bool = False,
                   stacked: bool = False) -> Batched:
    """Evaluation of a split as a `Batched`: consts (params, rest), arrays (uint8 images, int labels),
    carry the sums (`init_eval_sums`).

    The sums hold the summed loss, top-1 and top-k hits and the confusion matrix (rows: true class).
    With `tta`, predictions average the softmax of each image and its horizontal flip. `stacked`:
    several processes, each holding only its rows of every batch.
    """
    k = min(TOP_K, num_classes)

    def fn(consts, sums, batch, index):
        params, rest = consts
        images, y, m = batch

        def logits_fn(x):
            return forward(eval_def, params, rest, x)[0]

        x = to_pixels(images)
        logits = flip_tta_logits(logits_fn, x) if tta else logits_fn(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        pred = jnp.argmax(logits, -1)
        in_top_k = jnp.any(jax.lax.top_k(logits, k)[1] == y[:, None], axis=-1)
        # one-hot matmul instead of a scatter: much faster on CPU, same counts
        confusion = (jax.nn.one_hot(y, num_classes) * m[:, None]).T @ jax.nn.one_hot(pred, num_classes)
        return {"loss": sums["loss"] + jnp.sum(loss * m), "top1": sums["top1"] + jnp.sum((pred == y) * m),
                "topk": sums["topk"] + jnp.sum(in_top_k * m), "confusion": sums["confusion"] + confusion}, None

    return Batched(fn, batch_size=batch_size, mesh=mesh, stacked=stacked, donate_carry=True)


def init_eval_sums(num_classes: int) -> dict[str, jax.Array]:
    return {"loss": jnp.zeros((), jnp.float32), "top1": jnp.zeros((), jnp.float32),
            "topk": jnp.zeros((), jnp.float32), "confusion": jnp.zeros((num_classes, num_classes), jnp.float32)}


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
