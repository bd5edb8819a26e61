"""AutoAttack's sanity flags (fra31/auto-attack checks.py and flags_doc.md), as warnings in a report.

A robustness number is only as good as the attack's access to the model. Each check returns a
one-line warning or None:

- the outputs are probabilities (in [0, 1], rows summing to 1): the attacks need logits, and a
  softmax flattens the cross-entropy's gradient;
- inputs with an all-zero gradient: gradient-based attacks cannot move them (a stop-gradient, a
  quantization, a non-differentiable preprocessing: gradient masking);
- outputs that change between two forward passes on the same inputs: a random model, which needs
  expectation over transformation (`--version rand`);
- clean accuracy that differs between two passes batched differently (randomness, or batch
  statistics at inference);
- Square, which uses no gradient, succeeding where the white-box attacks failed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

PROBABILITY_TOL = 1e-5  # the reference's alpha for "outputs sum to one"
RANDOM_TOL = 1e-4  # the reference's alpha on L2-normalized outputs
SQUARE_TOL = 0.002  # the reference's alpha: Square may lower robust accuracy by 0.2 points before it is a flag
PASSES = 2


def probability_outputs(logits: np.ndarray) -> str | None:
    """A warning when the model's outputs look like a probability distribution."""
    if (logits.max() < 1 + PROBABILITY_TOL and logits.min() > -PROBABILITY_TOL
            and np.all(np.abs(logits.sum(-1) - 1) < PROBABILITY_TOL)):
        return ("the model's outputs look like probabilities (in [0, 1], summing to 1), not logits: the attacks "
                "need logits; remove the final softmax, or the robust accuracy is overestimated")
    return None


def zero_gradients(logits_fn, x, labels) -> tuple[int, str | None]:
    """(count, warning): inputs whose cross-entropy gradient is exactly zero."""
    grad = jax.grad(lambda v: optax.softmax_cross_entropy_with_integer_labels(logits_fn(v), labels).sum())(x)
    zero = int(jnp.sum(jnp.all(grad.reshape(grad.shape[0], -1) == 0, axis=-1)))
    if not zero:
        return 0, None
    return zero, (f"{zero} of {x.shape[0]} inputs ({zero / x.shape[0]:.0%}) have a zero gradient: gradient-based "
                  "attacks cannot move them (gradient masking: a stop-gradient, quantization or a "
                  "non-differentiable step in the model); trust Square's result, or attack the model without it")


def randomized(forward_fn, rest, x, labels) -> str | None:
    """A warning when two forward passes on the same inputs differ; forward_fn(rest, x) -> (logits, new rest),
    the second pass continuing from the first's state (its random number streams advanced)."""
    outputs = []
    for _ in range(PASSES):
        logits, rest = forward_fn(rest, x)
        logits = np.asarray(logits, np.float64)
        outputs.append(logits / (np.linalg.norm(logits, axis=-1, keepdims=True) + 1e-10))
    labels = np.asarray(labels)
    correct = [int(np.sum(o.argmax(-1) == labels)) for o in outputs]
    diff = max(float(np.linalg.norm(a - b, axis=-1).max()) for a in outputs for b in outputs)
    if diff > RANDOM_TOL or len(set(correct)) > 1:
        return ("the model's outputs change between two forward passes on the same inputs (dropout or noise left "
                "on at inference?): a random model needs expectation over transformation, use --version rand")
    return None


def inconsistent_accuracy(first: np.ndarray, second: np.ndarray) -> str | None:
    """A warning when two clean passes batched differently disagree; first/second: per image, classified correctly."""
    differ = int(np.sum(first != second))
    if not differ:
        return None
    return (f"clean accuracy differs between two passes batched differently ({first.mean():.2%} and "
            f"{second.mean():.2%}; {differ} of {len(first)} images changed): the model is random or uses batch "
            "statistics at inference, so its robust accuracy is not reproducible")


def square_beats_white_box(stages: list[dict]) -> str | None:
    """A warning when Square, run after gradient-based attacks, lowered the robust accuracy they left by more
    than 0.2 points; `stages` are cumulative: the clean accuracy first, then one entry per attack."""
    names = [s["attack"] for s in stages]
    if "square" not in names or names.index("square") < 2:
        return None
    i = names.index("square")
    drop = stages[i - 1]["robust_accuracy"] - stages[i]["robust_accuracy"]
    if drop > SQUARE_TOL + 1e-9:  # a drop of exactly the tolerance (2 of 1,000 points) must not tip on float rounding
        return (f"Square, which uses no gradients, lowered the robust accuracy by {drop:.2%} after the white-box "
                "attacks had failed: their gradients are unreliable on this model (gradient masking?); run Square "
                "with more queries and restarts, or an adaptive attack")
    return None
