"""Optax optimizers, learning-rate schedules and regularization from the recipe.

Every optimizer is built as  clip -> direction -> decoupled weight decay -> scale by -lr(step),
so the learning rate and its schedule are applied in one place for all of them. The `plateau`
schedule adds one more factor to that chain, a scalar in the optimizer state that the training loop
lowers between epochs (it depends on validation losses, which the jitted step never sees); being
optimizer state, it is checkpointed and restored with the run.
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cnncli.errors import UserError
from cnncli.recipe import OptimConfig, ScheduleConfig
from cnncli.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")

ADAMW_DEFAULT_DECAY = 1e-2  # when optim.name is adamw and weight_decay is 0, as in torch.optim.AdamW
ADAGRAD_INITIAL_ACCUMULATOR = 0.1  # TensorFlow/Keras default; keeps the first steps finite
# Learning rates `cnncli sweep` gives each optimizer when a grid varies the optimizer but not optim.lr:
# one lr for all would favour some of them (adadelta needs ~1.0, adaptive methods ~1e-3). These are
# the usual defaults of the papers and Keras, with SGD raised for a few-epoch comparison.
SUGGESTED_LR = {"sgd": 0.05, "momentum": 0.01, "nesterov": 0.01, "adagrad": 0.01, "adadelta": 1.0,
                "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3}
PLATEAU_THRESHOLD = 1e-4  # a validation loss counts as better only below best * (1 - this), as in PyTorch


@OPTIMIZERS.register("sgd", help="plain stochastic gradient descent")
def _sgd(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.identity()


@OPTIMIZERS.register("momentum", help="SGD with heavy-ball momentum (optim.momentum)")
def _momentum(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.trace(decay=cfg.momentum, nesterov=False)


@OPTIMIZERS.register("nesterov", help="SGD with Nesterov momentum (optim.momentum)")
def _nesterov(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.trace(decay=cfg.momentum, nesterov=True)


@OPTIMIZERS.register("adagrad", help="per-parameter rates from the sum of squared gradients")
def _adagrad(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.scale_by_rss(initial_accumulator_value=ADAGRAD_INITIAL_ACCUMULATOR, eps=cfg.eps)


@OPTIMIZERS.register("adadelta", help="Adadelta (rho = optim.b1); use lr around 1.0")
def _adadelta(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.scale_by_adadelta(rho=cfg.b1, eps=max(cfg.eps, 1e-6))


@OPTIMIZERS.register("adam", help="Adam (optim.b1, optim.b2, optim.eps)")
def _adam(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


@OPTIMIZERS.register("adamw", help="Adam with decoupled weight decay (default 0.01)")
def _adamw(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


@OPTIMIZERS.register("rmsprop", help="RMSProp (decay optim.b1, default 0.9)")
def _rmsprop(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.scale_by_rms(decay=cfg.b1, eps=cfg.eps)


# ----------------------------------------------------------------------------- schedules
# Each returns a function of the optimizer step -> multiplier of optim.lr (warmup is added on top).


@SCHEDULES.register("constant", help="the same learning rate throughout")
def _constant(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    return optax.constant_schedule(1.0)


@SCHEDULES.register("step", help="multiply by schedule.gamma every schedule.step_epochs epochs")
def _step(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    return optax.exponential_decay(1.0, transition_steps=cfg.step_epochs * steps_per_epoch,
                                   decay_rate=cfg.gamma, staircase=True)


@SCHEDULES.register("cosine", help="cosine decay to schedule.final_fraction of the lr")
def _cosine(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(1.0, decay_steps=max(total_steps, 1), alpha=cfg.final_fraction)


@SCHEDULES.register("onecycle", help="linear rise to lr over schedule.peak_at of training, then linear fall")
def _onecycle(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    peak = max(int(cfg.peak_at * total_steps), 1)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, 1.0, peak),
         optax.linear_schedule(1.0, cfg.final_fraction, max(total_steps - peak, 1))], [peak])


@SCHEDULES.register("multistep", help="multiply by schedule.gamma at each epoch in schedule.milestones")
def _multistep(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    boundaries = {int(round(m * steps_per_epoch)): cfg.gamma for m in sorted(cfg.milestones)}
    return optax.piecewise_constant_schedule(1.0, boundaries)


@SCHEDULES.register("exponential", help="multiply by schedule.gamma per epoch, smoothly step by step")
def _exponential(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    return optax.exponential_decay(1.0, transition_steps=steps_per_epoch, decay_rate=cfg.gamma)


@SCHEDULES.register("cosine_restarts", help="SGDR: cosine cycles of schedule.cycle_epochs, each "
                                            "schedule.cycle_mult times longer, restarting at lr")
def _cosine_restarts(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    # optax joins one cosine per cycle, so only the cycles that training reaches are built
    cycles, length, covered = [], max(cfg.cycle_epochs * steps_per_epoch, 1.0), 0.0
    while covered <= total_steps:
        cycles.append({"init_value": 1.0, "peak_value": 1.0, "warmup_steps": 0, "decay_steps": length,
                       "end_value": cfg.final_fraction})
        covered, length = covered + length, length * cfg.cycle_mult
    return optax.sgdr_schedule(cycles)


@SCHEDULES.register("plateau", help="divide the lr by 1/schedule.factor when the validation loss has not "
                                    "improved for schedule.patience epochs")
def _plateau(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    return optax.constant_schedule(1.0)  # the drops come from scale_by_plateau, set by the training loop


class PlateauState(NamedTuple):
    """The learning-rate factor of the plateau schedule (the field name is unique in the optimizer state)."""

    plateau_scale: jax.Array


def scale_by_plateau() -> optax.GradientTransformation:
    """Multiply updates by the plateau factor held in the state (1 until the loop lowers it)."""

    def init(params):
        return PlateauState(jnp.ones((), jnp.float32))

    def update(updates, state, params=None):
        return jax.tree.map(lambda u: u * state.plateau_scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def plateau_scale(val_losses: Sequence[float], factor: float, patience: int) -> float:
    """The plateau factor after these epochs' validation losses (PyTorch's ReduceLROnPlateau, mode min).

    A pure function of the loss history, so a resumed run (whose metrics are truncated to its checkpoint)
    reaches the same factor as the uninterrupted one.
    """
    scale, best, bad = 1.0, math.inf, 0
    for loss in val_losses:
        if loss < best * (1.0 - PLATEAU_THRESHOLD):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > patience:
            scale, bad = scale * factor, 0
    return scale


def get_plateau_scale(opt_state) -> float | None:
    """The plateau factor in an optimizer state, or None when the schedule is not `plateau`."""
    scale = optax.tree_utils.tree_get(opt_state, "plateau_scale")
    return None if scale is None else float(scale)


def set_plateau_scale(opt_state, scale: float):
    """A copy of the optimizer state with the plateau factor set to `scale`."""
    return optax.tree_utils.tree_set(opt_state, plateau_scale=jnp.asarray(scale, jnp.float32))


def learning_rate(optim: OptimConfig, schedule: ScheduleConfig, *, epochs: int,
                  steps_per_epoch: int) -> optax.Schedule:
    """The learning rate at each optimizer step: optim.lr x schedule, after an optional linear warmup."""
    total = epochs * steps_per_epoch
    warmup = int(round(schedule.warmup_epochs * steps_per_epoch))
    if warmup >= total > 0:
        raise UserError(f"schedule.warmup_epochs={schedule.warmup_epochs} is not shorter than training "
                        f"(train.epochs={epochs})")
    shape = SCHEDULES.get(schedule.name)(schedule, total - warmup, steps_per_epoch)
    if warmup:
        shape = optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), shape], [warmup])
    return lambda step: optim.lr * shape(step)


def decay_mask(params) -> object:
    """True for the parameters weight decay applies to: kernels, not biases or normalization scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def build_optimizer(optim: OptimConfig, lr: Callable, params, *, plateau: bool = False) -> optax.GradientTransformation:
    """The recipe's optimizer as one Optax transformation (see the module docstring for the order).

    Args:
        optim: the recipe's optim section.
        lr: learning rate per step (from `learning_rate`).
        params: the parameters (for the weight-decay mask).
        plateau: add the `scale_by_plateau` factor (schedule.name == 'plateau').
    """
    direction = OPTIMIZERS.get(optim.name)(optim)
    wd = optim.weight_decay or (ADAMW_DEFAULT_DECAY if optim.name == "adamw" else 0.0)
    parts = []
    if optim.clip_norm:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    parts.append(direction)
    if wd:
        parts.append(optax.add_decayed_weights(wd, mask=None if optim.decay_all else decay_mask(params)))
    if plateau:
        parts.append(scale_by_plateau())
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


def penalty(params, optim: OptimConfig) -> jax.Array:
    """The L1/L2 penalty added to the loss (over the same parameters weight decay applies to)."""
    if not (optim.l1 or optim.l2):
        return jnp.zeros((), jnp.float32)
    mask = jax.tree.map(lambda _: True, params) if optim.decay_all else decay_mask(params)
    leaves = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
    l2 = sum(jnp.sum(jnp.square(p)) for p in leaves)
    l1 = sum(jnp.sum(jnp.abs(p)) for p in leaves)
    return 0.5 * optim.l2 * l2 + optim.l1 * l1
