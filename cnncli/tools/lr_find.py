"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's and Lightning's `lr_find`).

A fresh model trains for up to `STEPS` steps of the recipe's own step (its optimizer, augmentation and
loss) while the learning rate grows exponentially from `START_LR` to `END_LR`; the loss is smoothed
with a debiased exponential moving average and the test stops once the smoothed loss exceeds
`DIVERGE` times its minimum. The suggestions are read off a centered moving average of the losses
instead (first tenth and last `SKIP_END` points left out, as fastai does): over 100 steps spanning
eight decades, the 0.98 moving average lags about 50 steps, four decades of learning rate, and put
LeNet-5's steepest descent at 3e-2 where the loss itself fell fastest near 2e-3. They are the
steepest descent before the curve's minimum (the default), fastai's valley (two thirds down the
longest descending stretch) and the minimum divided by 10. Nothing is written but the figure: no run
directory, no checkpoint.
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
DIVERGE = 4.0  # stop once the smoothed loss exceeds this many times its minimum (fastai, Lightning)
SKIP_END = 5  # points at the end left out of the suggestions: the loss is already blowing up there
MIN_POINTS = 10  # fewer usable points than this give no suggestion
CENTERED = 9  # steps in the centered moving average the suggestions are read from


@dataclass
class RangeTest:
    """The learning rates tried, the loss at each, its smoothed curve and the suggestions read off it."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray  # the moving average the stopping rule watches
    stopped: str  # 'diverged' or 'end'

    @property
    def centered(self) -> np.ndarray:
        return centered(self.losses)

    def suggestions(self) -> dict[str, float]:
        return suggest(self.lrs, self.centered)

    def to_dict(self) -> dict[str, Any]:
        return {"lrs": self.lrs.tolist(), "losses": self.losses.tolist(), "smoothed": self.smoothed.tolist(),
                "centered": self.centered.tolist(), "stopped": self.stopped, "suggestions": self.suggestions()}


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


def centered(losses: np.ndarray, window: int = CENTERED) -> np.ndarray:
    """The mean of each loss and its neighbours, `window` steps centered on it (fewer at the ends): no lag."""
    k, losses = window // 2, np.asarray(losses, np.float64)
    return np.array([losses[max(0, i - k):i + k + 1].mean() for i in range(len(losses))])


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> dict[str, float]:
    """{'steepest', 'valley', 'minimum'} learning rates from a smoothed range test (empty if too short).

    The steepest descent and the valley are looked for up to the curve's minimum: past it the loss is
    diverging, and its swings there are no descent.
    """
    lo, hi = len(lrs) // 10, len(lrs) - SKIP_END
    lrs, losses = np.asarray(lrs)[lo:hi], np.asarray(smoothed)[lo:hi]
    if len(lrs) < MIN_POINTS:
        return {}
    bottom = int(np.argmin(losses))
    down_lrs, down = lrs[: max(bottom + 1, 2)], losses[: max(bottom + 1, 2)]
    slopes = np.diff(down) / np.diff(np.log(down_lrs))
    return {"steepest": float(down_lrs[int(np.argmin(slopes))]), "valley": float(down_lrs[valley_index(down)]),
            "minimum": float(lrs[bottom] / 10)}


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
