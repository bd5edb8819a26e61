"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's and Lightning's `lr_find`).

A fresh model trains for up to `STEPS` steps of the recipe's own step (its optimizer, augmentation and
loss) while the learning rate grows exponentially from `START_LR` to `END_LR`; the test stops once the
debiased exponential moving average of the loss exceeds `DIVERGE` times its minimum (fastai, Lightning).

The suggestions are read off a robust smoothing of the per-step losses, one decade of learning rate
wide: a running median (one bad batch or one Adam spike is a single outlier, and a mean would turn it
into a fake cliff) followed by a running mean of the same width (so that the slope is defined), both
centered (the 0.98 moving average lags about 50 steps, four decades at 100 steps). Over the part of
the curve fastai looks at (the first tenth and the last `SKIP_END` points left out), up to its minimum:

- `steepest`: where the smoothed loss falls fastest per decade of lr, the conservative end of the descent;
- `minimum`: where it stops falling, the aggressive end (past it the model is at the edge of diverging);
- `suggested`: their geometric mean, the middle of the descent in log lr, which keeps the peak lr of
  the run half the descent's width (in decades) away from the edge;
- `valley`: fastai's default rule, computed as fastai does on its 0.98 moving average, for comparison.

Nothing is written but the figure: no run directory, no checkpoint.
"""

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnncli.data.pipeline import Splits
from cnncli.errors import UserError
from cnncli.recipe import Recipe
from cnncli.train import optim as optim_lib
from cnncli.train.loop import AUGMENT_STREAM, SHUFFLE_STREAM, recipe_step, steps_per_epoch
from cnncli.train.state import TrainState, build, init_totals
from cnncli.train.steps import check_batch, data_mesh, replicate

START_LR, END_LR, STEPS = 1e-7, 10.0, 100  # fastai's and Lightning's defaults
SMOOTHING = 0.98  # weight of the past in the loss's moving average (fastai, Lightning)
DIVERGE = 4.0  # stop once the moving average exceeds this many times its minimum (fastai, Lightning)
SKIP_END = 5  # points at the end left out of the suggestions: the loss is already blowing up there
MIN_POINTS = 10  # fewer usable points than this give no suggestion


@dataclass
class RangeTest:
    """The learning rates tried, the loss at each, its smoothed curves and the suggestions read off them."""

    lrs: np.ndarray
    losses: np.ndarray
    ema: np.ndarray  # the moving average the stopping rule watches
    stopped: str  # 'diverged' or 'end'

    @property
    def smoothed(self) -> np.ndarray:
        return robust_smooth(self.losses, window(self.lrs))

    def suggestions(self) -> dict[str, float]:
        return suggest(self.lrs, self.losses)

    def to_dict(self) -> dict[str, Any]:
        return {"lrs": self.lrs.tolist(), "losses": self.losses.tolist(), "ema": self.ema.tolist(),
                "smoothed": self.smoothed.tolist(), "window": window(self.lrs), "stopped": self.stopped,
                "suggestions": self.suggestions()}


def schedule(start: float, end: float, steps: int):
    """Step -> learning rate, exponentially from `start` (step 0) to `end` (step steps - 1)."""
    ratio = np.log(end / start) / max(steps - 1, 1)
    return lambda step: start * jnp.exp(ratio * jnp.asarray(step, jnp.float32))


def smooth(losses: np.ndarray, beta: float = SMOOTHING) -> np.ndarray:
    """The debiased exponential moving average of the losses: avg_i / (1 - beta^(i+1))."""
    out, avg = np.empty(len(losses)), 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out[i] = avg / (1 - beta ** (i + 1))
    return out


def window(lrs: np.ndarray) -> int:
    """Steps per decade of learning rate, made odd and at least 3: the width of the smoothing."""
    lrs = np.asarray(lrs)
    decades = np.log10(lrs[-1] / lrs[0]) if len(lrs) > 1 else 0.0
    per_decade = (len(lrs) - 1) / decades if decades > 0 else 3
    return max(3, int(round(per_decade)) | 1)


def robust_smooth(losses: np.ndarray, width: int) -> np.ndarray:
    """A centered running median of `width` losses, then a centered running mean of `width` medians
    (edges: the median repeats the end values, the mean averages the neighbours there are)."""
    losses, k = np.asarray(losses, np.float64), width // 2
    if len(losses) == 0:
        return losses
    medians = np.median(np.lib.stride_tricks.sliding_window_view(np.pad(losses, k, mode="edge"), 2 * k + 1), axis=1)
    return np.array([medians[max(0, i - k):i + k + 1].mean() for i in range(len(medians))])


def suggest(lrs: np.ndarray, losses: np.ndarray) -> dict[str, float]:
    """{'suggested', 'steepest', 'minimum', 'valley'} learning rates from a range test's per-step losses
    (empty if the usable part is too short or the loss never falls).

    The steepest descent is looked for up to the smoothed curve's minimum: past it the loss is
    diverging, and its swings there are no descent.
    """
    lrs, losses = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
    lo, hi = len(lrs) // 10, len(lrs) - SKIP_END
    if hi - lo < MIN_POINTS:
        return {}
    curve = robust_smooth(losses, window(lrs))[lo:hi]
    use = lrs[lo:hi]
    bottom = int(np.argmin(curve))
    if bottom < 2:
        return {}
    slopes = np.gradient(curve[:bottom + 1], np.log(use[:bottom + 1]))
    steepest, minimum = float(use[int(np.argmin(slopes))]), float(use[bottom])
    return {"suggested": float(np.sqrt(steepest * minimum)), "steepest": steepest, "minimum": minimum,
            "valley": float(use[valley_index(smooth(losses)[lo:hi])])}


def valley_index(losses: np.ndarray) -> int:
    """fastai's valley: along the longest strictly descending subsequence of the losses, the point two thirds
    (1/3 + 1/6 of the stretch) from its start."""
    n = len(losses)
    longest = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end = i
                start = end - longest[end]
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


def range_test(recipe: Recipe, splits: Splits, *, start: float = START_LR, end: float = END_LR, steps: int = STEPS,
               progress=None) -> RangeTest:
    """Run the range test of `recipe` on `splits`; `progress(done, total)` is called after every step."""
    if not 0 < start < end:
        raise UserError(f"the range test needs 0 < --start-lr < --end-lr, got {start:g} and {end:g}")
    mesh = data_mesh()
    check_batch(recipe.train.batch_size, mesh)
    spe = steps_per_epoch(recipe, len(splits.train_x))
    model = build(recipe, splits.image_shape, splits.num_classes, splits.mean, splits.std)
    lr = schedule(start, end, steps)
    tx = optim_lib.build_optimizer(recipe.optim, lr, model.params)
    train_step, epoch_batches = recipe_step(recipe, splits, model, tx, mesh)
    state = replicate(TrainState(model.params, model.rest, tx.init(model.params), jnp.zeros((), jnp.int32)), mesh)
    key = jax.random.key(recipe.seed)
    shuffle_key, augment_key = jax.random.fold_in(key, SHUFFLE_STREAM), jax.random.fold_in(key, AUGMENT_STREAM)
    losses, best, stopped = [], np.inf, "end"
    for i in range(steps):
        epoch = i // spe
        if i % spe == 0:
            xs, ys, aux = epoch_batches(jax.random.fold_in(shuffle_key, epoch), spe)
        state, totals = train_step(state, replicate(init_totals(), mesh), xs, ys, jnp.int32(epoch * spe), augment_key,
                                   aux)
        t = jax.device_get(totals)
        losses.append(float(t["loss"]) / float(t["count"]))
        if progress is not None:
            progress(i + 1, steps)
        current = smooth(np.asarray(losses))[-1]
        best = min(best, current)
        if not np.isfinite(current) or current > DIVERGE * best:
            stopped = "diverged"
            break
    losses = np.asarray(losses)
    lrs = np.asarray([float(lr(i)) for i in range(len(losses))])
    keep = np.isfinite(losses)
    return RangeTest(lrs[keep], losses[keep], smooth(losses[keep]), stopped)
