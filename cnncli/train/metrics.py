"""What an evaluation reports beyond accuracy: per-class precision/recall/F1, the most-confused pairs,
and calibration (expected calibration error, reliability bins, temperature scaling).

Pure NumPy (and SciPy for the one-dimensional temperature fit), so the numbers can be checked against
scikit-learn and torchmetrics on the same inputs. The classification report follows
`sklearn.metrics.classification_report` with `zero_division=0`; the ECE is the top-label ECE with
equal-width bins of Guo et al. 2017 (torchmetrics' `MulticlassCalibrationError`, norm l1).
"""

from typing import Any

import numpy as np

ECE_BINS = 15  # Guo et al. 2017 and torchmetrics' default
CONFUSED_PAIRS = 5  # how many (true, predicted) pairs the report lists
TEMPERATURE_BOUNDS = (0.05, 20.0)  # the search interval of temperature scaling


def classification_report(confusion: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support, with macro and weighted averages, from a confusion matrix.

    Rows of `confusion` are true classes, columns predictions. A precision or recall whose denominator is
    zero counts as 0, as in scikit-learn with `zero_division=0`. The averages run over the classes that
    occur in the labels or the predictions (scikit-learn's default `labels`), so evaluating on a subset of
    the classes is not dragged down by classes that are absent from it.

    Returns:
        {"classes": [{class, index, precision, recall, f1, support}], "macro": {precision, recall, f1, support},
         "weighted": {...}, "accuracy": float}; a class absent from labels and predictions has None scores.
    """
    c = np.asarray(confusion, np.float64)
    tp = np.diag(c)
    support, predicted = c.sum(axis=1), c.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    present = (support > 0) | (predicted > 0)
    rows = []
    for i, name in enumerate(class_names):
        scores = ((float(precision[i]), float(recall[i]), float(f1[i])) if present[i] else (None, None, None))
        rows.append({"class": name, "index": i, "precision": scores[0], "recall": scores[1], "f1": scores[2],
                     "support": int(support[i])})
    total = float(support.sum())

    def average(weights: np.ndarray) -> dict[str, float]:
        w = weights[present] / max(weights[present].sum(), 1e-300)
        return {"precision": float(precision[present] @ w), "recall": float(recall[present] @ w),
                "f1": float(f1[present] @ w), "support": int(total)}

    return {"classes": rows, "macro": average(np.ones_like(tp)), "weighted": average(support),
            "accuracy": float(tp.sum() / total) if total else 0.0}


def confused_pairs(confusion: np.ndarray, class_names: list[str], k: int = CONFUSED_PAIRS) -> list[dict[str, Any]]:
    """The k largest off-diagonal cells: (true class, predicted class, count, share of the true class).

    Most frequent first (ties in row-major order), only pairs that occur; like fastai's `most_confused`.
    """
    c = np.asarray(confusion, np.int64)
    off = c.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    support = c.sum(axis=1)
    pairs = []
    for index in flat:
        t, p = divmod(int(index), c.shape[1])
        if off[t, p] == 0:
            break
        pairs.append({"true": class_names[t], "predicted": class_names[p], "true_index": t, "predicted_index": p,
                      "count": int(off[t, p]), "share": float(off[t, p] / support[t])})
    return pairs


# ----------------------------------------------------------------------------- calibration


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of logits / temperature along the last axis, in float64."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (cross-entropy) of the labels under softmax(logits / temperature)."""
    z = np.asarray(logits, np.float64) / temperature
    top = z.max(axis=-1)
    log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=-1))
    return float(np.mean(log_norm - z[np.arange(len(z)), labels]))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Top-label confidence against accuracy in `bins` equal-width bins of (0, 1].

    Bin b holds the examples whose confidence lies in (b/bins, (b+1)/bins] (torchmetrics' edges, first
    bin closed at 0). Returns {count, confidence, accuracy} per bin (empty bins: confidence and accuracy 0).
    """
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == np.asarray(labels)).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    safe = np.maximum(count, 1)
    return {"count": count.astype(np.int64), "confidence": conf_sum / safe, "accuracy": acc_sum / safe}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over bins of (bin size / n) * |accuracy - mean confidence| (Guo et al. 2017)."""
    r = reliability_bins(probs, labels, bins)
    n = max(int(r["count"].sum()), 1)
    return float(np.sum(r["count"] / n * np.abs(r["accuracy"] - r["confidence"])))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimizes the NLL of softmax(logits / T) (Guo et al.'s temperature scaling).

    The NLL is convex in 1/T, so a bounded one-dimensional search over log T finds its minimum.
    """
    from scipy.optimize import minimize_scalar

    lo, hi = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=(lo, hi),
                             method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def calibration(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE, NLL, accuracy and the reliability bins of logits / temperature (JSON-ready)."""
    probs = softmax(logits, temperature)
    r = reliability_bins(probs, labels, bins)
    return {"temperature": float(temperature), "ece": expected_calibration_error(probs, labels, bins),
            "nll": nll(logits, labels, temperature), "accuracy": float(np.mean(probs.argmax(-1) == labels)),
            "mean_confidence": float(probs.max(-1).mean()), "bins": bins,
            "bin_count": r["count"].tolist(), "bin_confidence": r["confidence"].tolist(),
            "bin_accuracy": r["accuracy"].tolist()}
