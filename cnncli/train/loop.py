"""The training loop: epochs of jitted steps, progress, validation, checkpoints, resume, stopping.

Reproducibility: the epoch's shuffle comes from fold_in(seed, epoch), augmentation randomness from
fold_in(seed, global step), and dropout RNG is part of the checkpointed model state, so a run
resumed from any checkpoint (even mid-epoch after Ctrl-C) reproduces the uninterrupted run. The
host-side decisions (early stopping, plateau lr drops) are functions of the metrics history, which a
resume truncates to its checkpoint, so they replay exactly too.

Data too large for memory streams from disk (data.pipeline=stream, `StreamSplits`): each step then gets
its batch from the Grain pipeline (cnncli.train.streamed), validation reads the batches that follow
each epoch's training batches in the same stream, and checkpoints keep the stream's position.

Several processes (cnncli.run.distributed) run this same loop over one mesh of all their devices. The
single-process way of holding the whole uint8 training set on the devices gives way to a per-epoch
array of which each process holds only its own rows of every batch (steps.stack_batches): all of them
compute the epoch's shuffled order, each gathers its slice on the host. Process 0 alone writes the
run directory; the others keep the metrics rows (which every process computes alike) in memory
(runs.FollowerRun), so early stopping and plateau decisions agree.
"""

import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cnncli import interrupts
from cnncli.adversarial.attacks import AttackConfig
from cnncli.adversarial.robustness import make_perturb, make_robust_accuracy
from cnncli.data.augment import build_augment
from cnncli.data.pipeline import STATS_SAMPLE, Splits, split_sizes
from cnncli.data.stream import StreamSplits
from cnncli.errors import ENVIRONMENT_ERRNOS, UserError, is_disk_full
from cnncli.recipe import Recipe
from cnncli.run import checkpoint, distributed
from cnncli.run.logs import RunLogs
from cnncli.run.rundir import RunDir
from cnncli.runtime import CompileClock
from cnncli.train import optim as optim_lib
from cnncli.train import streamed, toolbox
from cnncli.train.batched import Batched
from cnncli.train.evaluate import eval_batch, evaluate, init_eval_sums, make_eval_step
from cnncli.train.losses import DEFAULT_LOSS, loss_fn
from cnncli.train.state import Model, TrainState, build, init_totals
from cnncli.train.steps import (
    StepOptions,
    check_batch,
    data_mesh,
    make_ema_update,
    make_train_step,
    replicate,
    shuffle,
    shuffle_like,
    shuffle_order,
    stack_batches,
)

SHUFFLE_STREAM, AUGMENT_STREAM, ROBUST_STREAM = 1, 2, 3  # independent random streams from the recipe's seed
# Single-step adversarial training also validates against PGD on a slice of the validation set, to catch
# catastrophic overfitting (Wong et al. 2020): PGD accuracy collapsing while single-step accuracy rises.
# CO_GAP: collapsed runs ended 56-76 points apart, robust ones 6-28 (docs/adversarial.md).
CO_IMAGES, CO_STEPS, CO_DROP, CO_GAP = 1000, 10, 0.2, 0.5


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last finite checkpoint is kept."""


class Interrupted(Exception):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) ended the run; a checkpoint of the current step was saved
    (`saved`; False when the signal came before the first step of a run that had no checkpoint)."""

    def __init__(self, where: str, signum: int = signal.SIGINT, saved: bool = True):
        super().__init__(where)
        self.signum, self.saved = signum, saved
        self.exit_code = 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP

    @property
    def by(self) -> str:
        return interrupts.describe(self.signum)


def check_recipe(recipe: Recipe, *, fine_tuning: bool = False) -> None:
    """Fail early (before loading data) on unknown names, on options that need a validation split,
    and on a fine-tune recipe given to `cnncli train`."""
    optim_lib.OPTIMIZERS.get(recipe.optim.name)
    optim_lib.SCHEDULES.get(recipe.schedule.name)
    loss_fn(recipe.train.loss)
    _augment(recipe)
    _check_generated(recipe)
    if recipe.finetune is not None and not fine_tuning:
        raise UserError(f"recipe '{recipe.name}' has a finetune section: run it with `cnncli fine-tune SOURCE RECIPE` "
                        "(a fine-tuned run resumes with `cnncli fine-tune --resume --run-dir DIR`)")
    needs_val = {"train.early_stopping": recipe.train.early_stopping is not None,
                 "train.keep_checkpoints": recipe.train.keep_checkpoints is not None,
                 "schedule.name=plateau": recipe.schedule.name == "plateau"}
    for option, used in needs_val.items():
        if used and recipe.data.val_fraction == 0:
            raise UserError(f"{option} decides on validation results, but data.val_fraction is 0; "
                            "hold out a validation split (e.g. data.val_fraction=0.1)")


def steps_per_epoch(recipe: Recipe, n_train: int) -> int:
    """Steps that pass over the training images once: each step takes the real part of a batch; a whole number
    of updates (train.accumulate steps each)."""
    real = recipe.train.batch_size - generated_per_batch(recipe)
    k = recipe.train.accumulate
    steps = n_train // real // k * k
    if steps == 0:
        of = f" ({real} of them real)" if real < recipe.train.batch_size else ""
        times = f" x train.accumulate={k}" if k > 1 else ""
        raise UserError(f"train.batch_size={recipe.train.batch_size}{of}{times} is larger than the {n_train} "
                        f"training images; use a batch of at most {n_train}")
    return steps


def accumulated(tx, recipe: Recipe):
    """The optimizer of a run with gradient accumulation: `optax.MultiSteps` averages train.accumulate
    batches' gradients and applies the inner update once (its schedules count updates, not batches)."""
    k = recipe.train.accumulate
    return tx if k == 1 else optax.MultiSteps(tx, every_k_schedule=k)


def generated_per_batch(recipe: Recipe) -> int:
    """How many images of each training batch come from the GAN of `data.generated` (0 without one)."""
    generated = recipe.data.generated
    return 0 if generated is None else int(round(generated.fraction * recipe.train.batch_size))


def _check_generated(recipe: Recipe) -> None:
    """`data.generated`: a trained GAN's directory, a share of the batch that is at least one image and leaves
    at least one real one, and no fine-tuning mode that needs per-image targets of real images."""
    generated = recipe.data.generated
    if generated is None:
        return
    from cnncli.generative.run import check_gan_dir

    check_gan_dir(generated.gan)
    n, batch = generated_per_batch(recipe), recipe.train.batch_size
    if generated.fraction > 0 and not 0 < n < batch:
        raise UserError(f"data.generated.fraction={generated.fraction:g} of train.batch_size={batch} is {n} "
                        f"generated images: choose a fraction between {1 / batch:.3g} and {1 - 1 / batch:.3g}")
    if n and recipe.finetune is not None and recipe.finetune.mode == "lwf":
        raise UserError("data.generated cannot be used with finetune.mode=lwf: its distillation targets are "
                        "recorded for the real training images only")


class _StopFlag:
    """The first stop signal (Ctrl-C, SIGTERM, SIGHUP: cnncli.interrupts) asks the loop to checkpoint and stop
    after the current step; a second one stops at once."""

    def __init__(self):
        self._multiprocess = distributed.multiprocess()
        self._stepping = interrupts.stepping()
        self._signum = 0

    def __enter__(self):
        self._stepping.__enter__()
        return self

    def requested(self, in_sync: bool) -> bool:
        """Whether to stop here. With several processes, all must stop at the same step, so the flag
        is only consulted where they compare it (`in_sync`: a progress update or the end of an epoch)."""
        mine = interrupts.requested() or 0
        if not self._multiprocess:
            self._signum = mine
        elif in_sync:
            self._signum = distributed.first_signal(mine)  # the same on every process, so is the exit code
        return bool(self._signum)

    @property
    def signum(self) -> int:
        """The signal that stopped the run (received by this process or another one)."""
        return self._signum or signal.SIGINT

    def __exit__(self, *exc):
        self._stepping.__exit__(*exc)


def start_run(recipe: Recipe, splits: Splits | StreamSplits, run: RunDir) -> None:
    """Write what a new run directory holds before training: the resolved recipe and the data description."""
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_text(run.recipe, recipe.to_yaml())
    n_train, n_val, _ = split_sizes(splits)
    run.write_json(run.data, {"source": recipe.data.source, "class_names": splits.class_names,
                              "image_shape": list(splits.image_shape), "mean": splits.mean, "std": splits.std,
                              "n_train": n_train, "n_val": n_val,
                              "pipeline": "stream" if isinstance(splits, StreamSplits) else "memory"})


@dataclass(frozen=True)
class Best:
    """The epoch a run reports (its `best` checkpoint): that epoch's validation top-1 and the score that chose it.

    The score is val_acc, or val_robust_acc for an adversarially trained run (the cleanest epoch is
    often less robust); it is None before the first epoch ends. Checkpoints keep this as a dict in
    meta["best"]; older ones have no score, and then val_top1 stands in for it.
    """

    val_top1: float = -1.0
    epoch: int = 0
    score: float | None = None

    def beaten_by(self, score: float) -> bool:
        return score > (self.val_top1 if self.score is None else self.score)

    def to_meta(self) -> dict[str, Any]:
        meta = {"val_top1": self.val_top1, "epoch": self.epoch}
        return meta if self.score is None else {**meta, "score": self.score}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "Best":
        return cls(meta["val_top1"], meta["epoch"], meta.get("score"))


@dataclass(frozen=True)
class _Setup:
    """What stays fixed while a run trains; the loop's sections read it."""

    recipe: Recipe
    splits: Splits | StreamSplits
    run: RunDir
    display: Any
    tune: Any  # a cnncli.transfer.finetune.FineTuning, or None
    model: Model
    mesh: Mesh
    steps_per_epoch: int
    lr: Callable  # the schedule: global step -> learning rate (before a plateau's scale)
    stream: streamed.Stream | None = None  # the streaming path's batches (training, then validation, per epoch)
    eval_step: Batched | None = None  # in memory, validation and test share it (one program): see `_eval_step`
    eval_batch: int = 0
    clock: CompileClock | None = None  # compilation time, which training and test times leave out
    compile_start: float = 0.0  # the clock's readings when the run started
    cache_start: tuple[int, int] = (0, 0)


def train(recipe: Recipe, splits: Splits | StreamSplits, run: RunDir, *, resume: bool = False, display=None,
          tune=None) -> dict[str, Any]:
    """Train `recipe` on `splits` (in memory, or streamed), writing metrics and checkpoints into `run`;
    returns the summary.

    `tune` (a `cnncli.transfer.finetune.FineTuning`) starts from its prepared model instead of a fresh one and
    brings its optimizer (freezing masks, lr multipliers), distillation targets and old-task metrics.
    """
    display = display or _NullDisplay()
    if run.writes:
        run.path.mkdir(parents=True, exist_ok=True)
        display = RunLogs(display, run)  # TensorBoard events and CSV files beside metrics.jsonl

    # ---- Setup: the mesh, the model, its optimizer and the state that training carries ----
    mesh = data_mesh()
    check_batch(recipe.train.batch_size, mesh)
    streaming = isinstance(splits, StreamSplits)
    stacked = distributed.multiprocess() and not streaming  # batches as (steps, batch, ...): see stack_batches
    if stacked and generated_per_batch(recipe):  # each process holds its own rows of the real part
        check_batch(recipe.train.batch_size - generated_per_batch(recipe), mesh,
                    "the real part of train.batch_size (data.generated.fraction)")
    spe = steps_per_epoch(recipe, split_sizes(splits)[0])
    epochs = recipe.train.epochs
    # data-fitted layers (a bag-of-words codebook) fit on the training images; streamed, on a sample of them
    fit_images = (partial(splits.sample_images, STATS_SAMPLE, recipe.seed) if isinstance(splits, StreamSplits)
                  else splits.train_x)
    model = tune.model if tune else build(recipe, splits.image_shape, splits.num_classes, splits.mean, splits.std,
                                          fit_images=fit_images, report=display.message)
    k = recipe.train.accumulate
    update_lr = optim_lib.learning_rate(recipe.optim, recipe.schedule, epochs=epochs, steps_per_epoch=spe // k)
    plateau = recipe.schedule.name == "plateau"
    tx = accumulated(tune.optimizer(recipe.optim, update_lr, plateau=plateau) if tune
                     else optim_lib.build_optimizer(recipe.optim, update_lr, model.params, plateau=plateau), recipe)

    def lr(batch):  # the learning rate of the update a batch's gradient goes into
        return update_lr(batch // k)

    ema = toolbox.init_ema(model.params, model.rest) if recipe.train.ema is not None else None
    state = TrainState(model.params, model.rest, tx.init(model.params), jnp.zeros((), jnp.int32), ema)
    clock = CompileClock.of_process()
    s = _Setup(recipe, splits, run, display, tune, model, mesh, spe, lr, None, *_eval_step(recipe, splits, model, mesh),
               clock, clock.seconds, (clock.cache_hits, clock.cache_misses))

    # ---- Resume: the latest checkpoint's state, the position it was saved at, the best epoch so far ----
    state, totals, start_epoch, start_step, best, extra = (_resume(s, state) if resume
                                                           else (state, init_totals(), 0, 0, Best(), None))
    state, totals = replicate((state, totals), mesh)

    # ---- The jitted steps, and the source of each epoch's batches ----
    train_step = _Calls.of(s, tx, _step_options(s, stacked), streaming=streaming)
    key = jax.random.key(recipe.seed)
    if streaming:
        s = replace(s, stream=_open_stream(s, extra, resume))
        epoch_batches = _streamed_epochs(s)
    else:
        epoch_batches = _in_memory(s, (_sharded_epochs if stacked else _device_epochs)(recipe, splits, mesh, tune))
    validate = _validation(s, robust_key=jax.random.fold_in(key, ROBUST_STREAM))
    shuffle_key, augment_key = jax.random.fold_in(key, SHUFFLE_STREAM), jax.random.fold_in(key, AUGMENT_STREAM)
    select = _score_name(recipe)  # the score of Best

    # ---- Compile the steps before the clock of epoch 1 starts (in memory: a stream's batches are read once) ----
    first_batches = None
    if not streaming and start_epoch < epochs:
        first_batches = epoch_batches(jax.random.fold_in(shuffle_key, start_epoch), start_epoch)
        _compile(s, train_step, state, totals, first_batches(start_step), augment_key, epoch=start_epoch,
                 first=start_step)

    # ---- The epochs ----
    lr_scale = optim_lib.get_plateau_scale(state.opt_state) or 1.0
    stopped = None
    display.start(epochs=epochs, steps_per_epoch=spe, first_epoch=start_epoch, first_step=start_step)
    with _StopFlag() as stop, _closing(s.stream):
        if stop.requested(in_sync=True):  # a signal during start-up that JAX's code swallowed
            raise Interrupted("start-up, before the first step", stop.signum, saved=resume)
        for epoch in range(start_epoch, epochs):
            if _stalled(recipe, run):  # checked here, not after an epoch, so a resumed stopped run stays stopped
                stopped = "early"
                display.message(f"early stopping after epoch {epoch}: no validation accuracy gain for "
                                f"{recipe.train.early_stopping.patience} epochs (best: epoch {best.epoch})")
                break

            # ---- Steps of one epoch ----
            first = start_step if epoch == start_epoch else 0
            batch_at = (first_batches if epoch == start_epoch and first_batches is not None
                        else epoch_batches(jax.random.fold_in(shuffle_key, epoch), epoch))
            waited = s.stream.wait_seconds if streaming else 0.0
            state, totals, seconds = _epoch_steps(s, train_step, state, totals, batch_at, augment_key,
                                                  epoch=epoch, first=first, lr_scale=lr_scale, best=best, stop=stop)

            # ---- End of epoch: validation, the best epoch, metrics, the plateau's lr, a checkpoint ----
            row = {"epoch": epoch + 1, "step": (epoch + 1) * spe, **_train_row(totals),
                   "lr": float(lr((epoch + 1) * spe - 1)) * lr_scale, "seconds": round(seconds, 3),
                   "img_per_s": round((spe - first) * recipe.train.batch_size / seconds, 1)}
            if streaming:  # time the steps waited for the input pipeline (0 when it keeps ahead)
                row["input_wait_s"] = round(s.stream.wait_seconds - waited, 3)
            if validate is not None:
                row.update(validate(state))
            if tune is not None:
                row.update(tune.epoch_metrics(state.params, state.rest))
            improved = validate is None or best.beaten_by(row[select])  # without validation, the latest is best
            if improved:
                best = Best(row.get("val_acc", -1.0), epoch + 1, row.get(select, -1.0))
            with _disk_faults(run, run.metrics):
                run.append_metrics(row)
            warning = catastrophic_overfitting(run.read_metrics()) if "val_pgd_acc" in row else None
            if warning:
                display.message(f"warning: {warning}")
            if plateau:
                state, lr_scale = _plateau(s, state)
            _save(s, state, totals, best, epoch + 1, 0, is_best=improved, score=row.get("val_acc"))
            display.epoch_done(row)
            totals = replicate(init_totals(), mesh)
            if epoch + 1 < epochs and stop.requested(in_sync=True):
                raise _interrupted(s, state, best, f"end of epoch {epoch + 1}", stop.signum)

    # ---- Finish: the reported checkpoint on the test split, summary.json ----
    display.finish()
    return finish(s, state, best, stopped=stopped)


def _eval_step(recipe: Recipe, splits: Splits | StreamSplits, model: Model, mesh) -> tuple[Batched | None, int]:
    """In memory, the eval step and batch size that validation and the test pass share: one program, one batch
    shape (the larger split's batch; the last batch padded). A streamed run evaluates as its stream batches."""
    if isinstance(splits, StreamSplits):
        return None, 0
    _, n_val, n_test = split_sizes(splits)
    batch = eval_batch(max(n_val, n_test, 1), recipe.train.eval_batch_size, mesh)
    step = make_eval_step(model.eval_def, num_classes=splits.num_classes, batch_size=batch, mesh=mesh,
                          tta=recipe.train.tta, stacked=distributed.multiprocess())
    return step, batch


def _compile(s: _Setup, train_step: "_Calls", state, totals, batch, augment_key, *, epoch: int, first: int) -> None:
    """Compile (or load from the persistent cache) the train and eval steps, saying how long it took."""
    start, hits = s.clock.seconds, s.clock.cache_hits
    train_step.compile(state, totals, batch, augment_key, epoch=epoch, first=first)
    what = "train step"
    if s.eval_step is not None:
        sharding = s.eval_step.sharding
        images = jax.ShapeDtypeStruct((s.eval_batch, *s.splits.image_shape), jnp.uint8, sharding=sharding)
        labels, mask = (jax.ShapeDtypeStruct((s.eval_batch,), dtype, sharding=sharding)
                        for dtype in (jnp.int32, jnp.float32))
        consts, sums = replicate(((state.params, state.rest), init_eval_sums(s.splits.num_classes)), s.mesh)
        s.eval_step.step.lower(consts, sums, (images, labels, mask), jnp.int32(0)).compile()
        what = "train and eval steps"
    cached = " (from the compilation cache)" if s.clock.cache_hits > hits else ""
    s.display.message(f"compiled the {what} in {s.clock.seconds - start:.1f} s{cached}")


def recipe_step(recipe: Recipe, splits: Splits, model: Model, tx, mesh) -> tuple[Callable, Callable]:
    """The jitted train step `train` builds for `recipe` (with optimizer `tx`), and the source of each epoch's
    batches (epoch key, steps) -> (xs, ys, aux), for tools that take training steps outside a run (`cnncli
    lr-find`). One process; no EMA (a tool's steps are not a run to average)."""
    spe = steps_per_epoch(recipe, len(splits.train_x))
    s = _Setup(recipe, splits, RunDir("."), _NullDisplay(), None, model, mesh, spe, lambda step: 0.0)
    options = replace(_step_options(s, stacked=False), ema_decay=None, ema_every=1)
    step = make_train_step(model.train_def, tx, num_classes=splits.num_classes, batch_size=recipe.train.batch_size,
                           mesh=mesh, options=options)
    return step, _device_epochs(recipe, splits, mesh, None)


def _open_stream(s: _Setup, extra: dict | None, resume: bool) -> streamed.Stream:
    """The streaming path's Grain pipeline, at the position the resumed checkpoint saved (or the start)."""
    recipe = s.recipe
    if recipe.train.adversarial is not None:
        raise UserError("train.adversarial is not available with data.pipeline=stream (its validation attacks the "
                        "whole validation split in memory); use data.pipeline=memory")
    if generated_per_batch(recipe):
        raise UserError("data.generated is not available with data.pipeline=stream; use data.pipeline=memory")
    position = streamed.resume_state(extra)
    if resume and position is None and distributed.agree(lambda: checkpoint.read_index(s.run.checkpoints) is not None):
        raise UserError(f"the latest checkpoint of {s.run.path} holds no input-stream position (was the run trained "
                        "with data.pipeline=memory?); resume it with the pipeline it was trained with")
    return streamed.train_stream(s.splits, s.mesh, epochs=recipe.train.epochs, batch=recipe.train.batch_size,
                                 eval_batch=_val_batch(s), seed=recipe.seed, state=position)


class _closing:
    """Close a stream (its worker processes) however the epochs end; nothing without one."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        if self.stream is not None:
            self.stream.close()


def _val_batch(s: _Setup) -> int:
    n_val = split_sizes(s.splits)[1]
    return eval_batch(n_val, s.recipe.train.eval_batch_size, s.mesh) if n_val else s.recipe.train.eval_batch_size


def _resume(s: _Setup, state: TrainState) -> tuple[TrainState, dict, int, int, Best, Any]:
    """The latest checkpoint's state and totals, the epoch and step to continue at, the best epoch so
    far and the checkpoint's extra item; a run stopped before its first checkpoint starts from the beginning."""
    run, totals = s.run, init_totals()
    point = distributed.agree(lambda: _resume_point(run))
    if not run.writes:
        run.set_metrics(point["metrics"] if point else [])
    if point is None:  # killed before its first checkpoint
        run.truncate_metrics(0)
        s.display.message(f"{run.path} has no checkpoint yet: starting it from the beginning")
        return state, totals, 0, 0, Best(), None
    # meta says where to continue: epoch index (= epochs completed) and steps done within it
    meta = point["meta"]
    state, totals = checkpoint.restore(Path(point["checkpoint"]), state)
    epoch, step = meta["epoch"], meta["step_in_epoch"]
    best = Best.from_meta(meta["best"]) if "best" in meta else Best()
    if step == 0:
        totals = init_totals()
    run.truncate_metrics(epoch)
    s.display.message(f"resuming {run.path} at epoch {epoch + 1}, step {step}")
    return state, totals, epoch, step, best, point.get("extra")


def _step_options(s: _Setup, stacked: bool) -> StepOptions:
    """What the train step adds to cross-entropy, from the recipe (and a fine-tuning's distillation)."""
    recipe, adversarial = s.recipe, s.recipe.train.adversarial
    penalty = (lambda p: optim_lib.penalty(p, recipe.optim)) if (recipe.optim.l1 or recipe.optim.l2) else None
    perturb = None
    if adversarial is not None:
        cfg = training_attack(adversarial)
        perturb = make_perturb(s.model.train_def, cfg, adversarial.eps)
        if adversarial.attack == "pgd" and cfg.step_size > adversarial.eps:
            s.display.message(f"warning: train.adversarial.step_size={cfg.step_size:g} is larger than "
                              f"eps={adversarial.eps:g}: every step overshoots the ball and is projected back")
    weights = toolbox.class_weight_vector(recipe.train.class_weights, s.splits.train_y, s.splits.num_classes)
    return StepOptions(augment=_augment(recipe), label_smoothing=recipe.train.label_smoothing, penalty=penalty,
                       perturb=perturb, mix=adversarial.mix if adversarial else 1.0,
                       trades=adversarial.trades if adversarial else None,
                       class_weights=None if weights is None else replicate(jnp.asarray(weights), s.mesh),
                       ema_decay=recipe.train.ema, ema_every=recipe.train.ema_every,
                       distill=s.tune.distill if s.tune else None, stacked=stacked,
                       loss=None if recipe.train.loss == DEFAULT_LOSS else loss_fn(recipe.train.loss),
                       generated=_generated_pool(s), generated_per_batch=generated_per_batch(recipe))


def _generated_pool(s: _Setup) -> tuple[jax.Array, jax.Array] | None:
    """`data.generated`'s pool of labelled GAN samples on the devices, sampled once (the same on a resume)."""
    generated, n = s.recipe.data.generated, generated_per_batch(s.recipe)
    if not n:
        return None
    from cnncli.generative.run import sample_pool, trained_on

    splits = s.splits
    data, seed = trained_on(generated.gan)
    if data.model_copy(update={"generated": None}) != s.recipe.data.model_copy(update={"generated": None}) \
            or seed != s.recipe.seed:
        s.display.message(f"warning: the GAN in {generated.gan} was trained with another data section or seed than "
                          f"this recipe's, so its images may copy this run's validation images")
    x, y = sample_pool(generated.gan, generated.pool, generated.seed, splits.class_names, splits.image_shape)
    s.display.message(f"each batch of {s.recipe.train.batch_size}: {s.recipe.train.batch_size - n} real images and "
                      f"{n} drawn from {len(x):,} generated by {generated.gan}")
    return replicate((jnp.asarray(x), jnp.asarray(y)), s.mesh)


def _validation(s: _Setup, robust_key: jax.Array) -> Callable[[TrainState], dict] | None:
    """The end-of-epoch validation: state -> the metrics row's val_* entries; None without a validation split."""
    splits, model, mesh, adversarial = s.splits, s.model, s.mesh, s.recipe.train.adversarial
    n_val = split_sizes(splits)[1]
    if n_val == 0:
        return None
    batch = _val_batch(s)
    if s.stream is not None:
        return _streamed_validation(s, batch)
    batch, step = s.eval_batch, s.eval_step
    robust = pgd = None
    if adversarial is not None:
        robust = make_robust_accuracy(model.eval_def, training_attack(adversarial), num_classes=splits.num_classes,
                                      batch_size=batch, mesh=mesh)
        if single_step(adversarial):
            pgd = make_robust_accuracy(model.eval_def, AttackConfig("pgd", steps=CO_STEPS),
                                       num_classes=splits.num_classes, batch_size=batch, mesh=mesh)
    val = partial(evaluate, model.eval_def, x=splits.val_x, y=splits.val_y, class_names=splits.class_names,
                  batch_size=batch, mesh=mesh, step_fn=step)

    def validate(state: TrainState) -> dict[str, float]:
        clean = val(params=state.params, rest=state.rest)
        row = {"val_loss": clean["loss"], "val_acc": clean["top1"], "val_top5": clean["top5"]}
        if robust is not None:
            # the same starts every epoch, so epochs are compared on the same attack
            row["val_robust_acc"] = robust(state.params, state.rest, splits.val_x, splits.val_y, adversarial.eps,
                                           robust_key)
        if pgd is not None:
            row["val_pgd_acc"] = pgd(state.params, state.rest, splits.val_x[:CO_IMAGES], splits.val_y[:CO_IMAGES],
                                     adversarial.eps, robust_key)
        if state.ema is not None:
            averaged = val(params=state.ema["params"], rest=state.ema["rest"])
            row.update(val_ema_loss=averaged["loss"], val_ema_acc=averaged["top1"])
        return row

    return validate


def _streamed_validation(s: _Setup, batch: int) -> Callable[[TrainState], dict]:
    """Validation on the streaming path: the next validation batches of the run's stream, each evaluated
    with the weights and, with train.ema, the averaged weights (one pass for both)."""
    splits, model, mesh = s.splits, s.model, s.mesh
    step = make_eval_step(model.eval_def, num_classes=splits.num_classes, batch_size=batch, mesh=mesh,
                          tta=s.recipe.train.tta)
    batches = -(-split_sizes(splits)[1] // batch)

    def validate(state: TrainState) -> dict[str, float]:
        weights = [(state.params, state.rest)]
        if state.ema is not None:
            weights.append((state.ema["params"], state.ema["rest"]))
        results = streamed.evaluate_stream(model.eval_def, weights, s.stream, batches, splits.class_names,
                                           batch_size=batch, mesh=mesh, step_fn=step)
        row = {"val_loss": results[0]["loss"], "val_acc": results[0]["top1"], "val_top5": results[0]["top5"]}
        if state.ema is not None:
            row.update(val_ema_loss=results[1]["loss"], val_ema_acc=results[1]["top1"])
        return row

    return validate


class _Calls:
    """The training steps of a run, dispatched several at a time (train.steps_per_call): a call takes
    `per_call` steps when it starts an EMA stretch and that many steps are left in the epoch, else one
    (a resume mid-stretch, an epoch's remainder); one-step calls are followed by the EMA update at the
    end of each stretch. Every step computes what a one-step call computes, so where the calls fall
    changes nothing a resume could notice."""

    def __init__(self, make: Callable[[int], Callable], steps_per_epoch: int, per_call: int, ema_every: int,
                 ema_update: Callable | None):
        self.make, self.spe, self.per_call = make, steps_per_epoch, per_call
        self.ema_every, self.ema_update = ema_every, ema_update
        self.programs: dict[int, Callable] = {}

    @classmethod
    def of(cls, s: _Setup, tx, options: StepOptions, *, streaming: bool = False) -> "_Calls":
        train = s.recipe.train
        every = train.ema_every if train.ema is not None else 1
        per_call = steps_per_call(train.steps_per_call, jax.default_backend(), steps_per_epoch=s.steps_per_epoch,
                                  log_every=train.log_every, ema_every=every, streaming=streaming)
        make = partial(make_train_step, s.model.train_def, tx, num_classes=s.splits.num_classes,
                       batch_size=train.batch_size, mesh=s.mesh, options=options)
        ema_update = make_ema_update(train.ema, every) if every > 1 else None
        return cls(lambda steps: make(steps=steps), s.steps_per_epoch, per_call, every, ema_update)

    def plan(self, global_step: int, left: int) -> int:
        """The steps of the call that starts at `global_step` with `left` steps left in the epoch."""
        if self.per_call > 1 and global_step % self.ema_every == 0 and left >= self.per_call:
            return self.per_call
        return 1

    def program(self, steps: int) -> Callable:
        if steps not in self.programs:
            self.programs[steps] = self.make(steps)
        return self.programs[steps]

    def __call__(self, state, totals, xs, ys, epoch_start, key, aux, *, global_step: int, left: int):
        """The next call's (state, totals, steps taken)."""
        steps = self.plan(global_step, left)
        state, totals = self.program(steps)(state, totals, xs, ys, epoch_start, key, aux)
        if steps == 1 and self.ema_update is not None and (global_step + 1) % self.ema_every == 0:
            state = self.ema_update(state)
        return state, totals, steps

    def compile(self, state, totals, batch, key, *, epoch: int, first: int) -> None:
        """Compile the programs that the calls of epoch `epoch` from step `first`, and of the next epoch, use."""
        spe, sizes = self.spe, set()
        xs, ys, epoch_start, aux = batch
        for e, i in ((epoch, first), (epoch + 1, 0)):
            while i < spe:
                sizes.add(self.plan(e * spe + i, spe - i))
                i += self.plan(e * spe + i, spe - i)
        for steps in sorted(sizes):
            fn = self.program(steps)
            fn, kw = (fn.func, fn.keywords) if isinstance(fn, partial) else (fn, {})
            fn.lower(state, totals, xs, ys, epoch_start, key, aux, **kw).compile()
        if self.ema_update is not None and 1 in sizes:
            self.ema_update.lower(state).compile()


def steps_per_call(setting: int | str, backend: str, *, steps_per_epoch: int, log_every: int, ema_every: int,
                   streaming: bool = False) -> int:
    """Training steps per dispatch for train.steps_per_call on `backend` (docs/performance.md, "Steps per call").

    auto: one on the CPU, where XLA ran a loop of steps inside one program slower than the same steps
    dispatched one by one, and on the streaming path (each step waits for its own batch); elsewhere the
    steps between two progress updates (train.log_every, at most an epoch), rounded to whole EMA
    stretches, preferring a count that divides the epoch. An explicit count must be whole EMA stretches.
    """
    if setting != "auto":
        if setting % ema_every:
            raise UserError(f"train.steps_per_call={setting} is not a multiple of train.ema_every={ema_every}")
        if streaming and setting > 1:
            raise UserError(f"train.steps_per_call={setting} needs the batches in memory; with data.pipeline=stream "
                            "each step reads its own batch (use 1 or auto)")
        return setting
    if backend == "cpu" or streaming:
        return 1
    limit = max(ema_every, min(log_every, steps_per_epoch) // ema_every * ema_every)
    dividing = [k for k in range(limit, 0, -ema_every) if steps_per_epoch % k == 0 and k > limit // 2]
    return dividing[0] if dividing else limit


def _epoch_steps(s: _Setup, train_step: _Calls, state, totals, batch_at, augment_key, *, epoch: int, first: int,
                 lr_scale: float, best: Best, stop: _StopFlag):
    """Steps `first`.. of one epoch, step i on `batch_at(i)` = (xs, ys, epoch_start, aux), with progress after
    the call that reaches each multiple of train.log_every steps; returns the state, the totals and the
    seconds it took, compilation left out. Ctrl-C checkpoints the step the current call reached and raises
    Interrupted."""
    spe, batch_size, log_every = s.steps_per_epoch, s.recipe.train.batch_size, s.recipe.train.log_every
    t0, compiling = time.perf_counter(), s.clock.seconds
    i = first
    while i < spe:
        xs, ys, epoch_start, aux = batch_at(i)
        state, totals, taken = train_step(state, totals, xs, ys, epoch_start, augment_key, aux,
                                          global_step=epoch * spe + i, left=spe - i)
        log = (i + taken) // log_every > i // log_every or i + taken == spe
        i += taken
        if i < spe and stop.requested(in_sync=log):
            _check_finite(_train_row(totals), epoch, i, s.run)  # a NaN step is never saved, so never `latest`
            _save(s, state, totals, best, epoch, i, is_best=False)
            raise _interrupted(s, state, best, f"epoch {epoch + 1}, step {i}/{spe}", stop.signum)
        if log:
            row = _train_row(totals)
            _check_finite(row, epoch, i, s.run)
            elapsed = time.perf_counter() - t0 - (s.clock.seconds - compiling)
            s.display.update(epoch=epoch, step=i, loss=row["train_loss"], acc=row["train_acc"],
                             lr=float(s.lr(epoch * spe + i - 1)) * lr_scale,
                             img_per_s=(i - first) * batch_size / max(elapsed, 1e-9), grad_norm=row["grad_norm"])
    return state, totals, time.perf_counter() - t0 - (s.clock.seconds - compiling)


def _plateau(s: _Setup, state: TrainState) -> tuple[TrainState, float]:
    """The plateau schedule's lr scale after this epoch's validation loss, set in the optimizer state."""
    schedule = s.recipe.schedule
    scale = optim_lib.plateau_scale([r["val_loss"] for r in s.run.read_metrics()], schedule.factor, schedule.patience)
    state = replace(state, opt_state=optim_lib.set_plateau_scale(state.opt_state, scale))
    return replicate(state, s.mesh), scale


def _save(s: _Setup, state, totals, best: Best, epoch: int, step_in_epoch: int, is_best: bool,
          score: float | None = None) -> None:
    """Checkpoint the state at `step_in_epoch` of epoch index `epoch` (0 with the epochs completed)."""
    meta = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": epoch * s.steps_per_epoch + step_in_epoch,
            "best": best.to_meta()}
    extra = streamed.checkpoint_extra(s.stream) if s.stream is not None else None  # on every process: a gather
    checkpoint.save(s.run.checkpoints, state=state, totals=totals, meta=meta, best=is_best,
                    keep_top=s.recipe.train.keep_checkpoints, score=score, extra=extra)


def _interrupted(s: _Setup, state, best: Best, where: str, signum: int) -> Interrupted:
    """A stop signal; with early_stopping.restore_best the summary reports the best epoch, as an early stop
    would."""
    if _restores_best(s.recipe) and best.epoch > 0:
        s.display.finish()
        finish(s, state, best, stopped="user")
        where += f"; summary.json reports the best epoch ({best.epoch})"
    return Interrupted(where, signum)


@contextmanager
def _disk_faults(run: RunDir, path: Path):
    """A full disk (or a read-only one) while writing a run file: one line saying which checkpoint is intact."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            reason = "disk full"
        elif isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            reason = f"cannot write ({ENVIRONMENT_ERRNOS[e.errno]})"
        else:
            raise
        index = checkpoint.read_index(run.checkpoints, quiet=True)
        intact = (f"the checkpoint {checkpoint.describe(index['latest'])} is intact" if index
                  else "no checkpoint was written yet")
        raise UserError(f"{reason} writing {path}; {intact}; free space, then continue with --resume") from None


def _device_epochs(recipe: Recipe, splits: Splits, mesh, tune):
    """One process: the training set lives on the devices; each epoch is a shuffled copy made there."""
    draw = (partial(toolbox.balanced_shuffle, num_classes=splits.num_classes) if recipe.data.balanced_sampling
            else shuffle)
    xs_all, ys_all = replicate((jnp.asarray(splits.train_x), jnp.asarray(splits.train_y)), mesh)
    aux_all = replicate(jnp.asarray(tune.aux), mesh) if tune and tune.aux is not None else None

    def epoch_data(epoch_key, steps: int):
        xs, ys = draw(xs_all, ys_all, epoch_key)
        return xs, ys, None if aux_all is None else shuffle_like(aux_all, epoch_key)

    return epoch_data


def _sharded_epochs(recipe: Recipe, splits: Splits, mesh, tune):
    """Several processes: every process draws the epoch's order (the same one `_device_epochs` would),
    and puts only its own rows of every batch on its devices, as (steps, batch, ...) arrays."""
    batch = recipe.train.batch_size - generated_per_batch(recipe)  # the real rows of each batch
    aux = None if tune is None or tune.aux is None else np.asarray(tune.aux)
    if recipe.data.balanced_sampling:  # drawn from the labels, on this process's first device
        order = partial(toolbox.balanced_order, jnp.asarray(splits.train_y), num_classes=splits.num_classes)
    else:
        order = partial(shuffle_order, n=len(splits.train_y))

    def epoch_data(epoch_key, steps: int):
        idx = np.asarray(order(epoch_key))[: steps * batch]
        return (stack_batches(splits.train_x, idx, batch, mesh), stack_batches(splits.train_y, idx, batch, mesh),
                None if aux is None else stack_batches(aux, idx, batch, mesh))

    return epoch_data


def _in_memory(s: _Setup, epoch_arrays):
    """(epoch key, epoch) -> batch_at: every step of an in-memory epoch slices the same epoch arrays."""

    def epoch_data(epoch_key, epoch: int):
        xs, ys, aux = epoch_arrays(epoch_key, s.steps_per_epoch)
        batches = (xs, ys, jnp.int32(epoch * s.steps_per_epoch), aux)
        return lambda i: batches

    return epoch_data


def _streamed_epochs(s: _Setup):
    """The streaming path: step i of an epoch takes the stream's next batch (the steps' batch 0 of it)."""
    spe = s.steps_per_epoch

    def epoch_data(epoch_key, epoch: int):
        def batch_at(i: int):
            _, batch = s.stream.next()
            return batch["image"], batch["label"], jnp.int32(epoch * spe + i), None

        return batch_at

    return epoch_data


def _resume_point(run: RunDir) -> dict | None:
    """Where a resumed run continues (as process 0 reads it): the latest checkpoint, its position and
    the metrics written so far; None when the run was stopped before its first checkpoint."""
    if checkpoint.read_index(run.checkpoints) is None:
        return None
    ckpt, meta = checkpoint.find(run.path, "latest")
    return {"checkpoint": str(ckpt), "meta": meta, "metrics": run.read_metrics(), "extra": checkpoint.read_extra(ckpt)}


def _find_checkpoint(run: RunDir, which: str) -> tuple[Path, dict]:
    """checkpoint.find as process 0 sees it, on every process."""
    def read():
        ckpt, meta = checkpoint.find(run.path, which)
        return [str(ckpt), meta]

    ckpt, meta = distributed.agree(read)
    return Path(ckpt), meta


def _stalled(recipe: Recipe, run: RunDir) -> bool:
    """Early stopping: validation accuracy has not improved for `patience` epochs (per the metrics so far)."""
    rule = recipe.train.early_stopping
    if rule is None:
        return False
    accs = [r["val_acc"] for r in run.read_metrics()]
    return toolbox.epochs_without_improvement(accs, rule.min_delta) >= rule.patience


def _restores_best(recipe: Recipe) -> bool:
    rule = recipe.train.early_stopping
    return rule is not None and rule.restore_best


def finish(s: _Setup, state, best: Best, stopped: str | None = None) -> dict[str, Any]:
    """Evaluate the reported checkpoint on the test split and write summary.json.

    The reported checkpoint is the best one, except with early_stopping.restore_best false: then it is
    the latest. `stopped` ('early' or 'user') records why a run ended before train.epochs. A fine-tuning
    adds its old-task metrics; a streamed run what each process read. Times: train_seconds (the epochs'
    steps), test_seconds (the test pass) and compile_seconds (this run's compilation, left out of both).
    """
    recipe, splits, run, model, mesh, tune, stream = s.recipe, s.splits, s.run, s.model, s.mesh, s.tune, s.stream
    rule = recipe.train.early_stopping
    which = "latest" if rule is not None and not rule.restore_best else "best"
    rows = run.read_metrics()
    summary: dict[str, Any] = {"name": recipe.name, "best_epoch": best.epoch,
                               "best_val_acc": best.val_top1 if best.val_top1 >= 0 else None,
                               "params": model.num_params, "precision": model.precision, "epochs_run": len(rows)}
    if recipe.train.adversarial is not None and best.score is not None and best.score >= 0:
        summary[f"best_{_score_name(recipe)}"] = best.score
    summary["train_seconds"] = round(sum(r.get("seconds", 0.0) for r in rows), 3)
    if stopped:
        summary["stopped"] = stopped
    if stream is not None:
        summary["stream"] = streamed.stream_stats(stream)
    if split_sizes(splits)[2]:
        ckpt, meta = _find_checkpoint(run, which)
        summary["reported"] = {"checkpoint": which, "epoch": meta.get("epoch")}
        reported, _ = checkpoint.restore(ckpt, state, with_optimizer=False)
        weights = [(reported.params, reported.rest)]
        if reported.ema is not None:
            weights.append((reported.ema["params"], reported.ema["rest"]))
        t0, compiling = time.perf_counter(), s.clock.seconds
        if isinstance(splits, StreamSplits):
            batch = eval_batch(split_sizes(splits)[2], recipe.train.eval_batch_size, mesh)
            results = streamed.evaluate_split(model.eval_def, weights, splits, "test", batch_size=batch, mesh=mesh,
                                              seed=recipe.seed, tta=recipe.train.tta)
        else:
            results = [evaluate(model.eval_def, params, rest, splits.test_x, splits.test_y, splits.class_names,
                                batch_size=s.eval_batch, mesh=mesh, step_fn=s.eval_step) for params, rest in weights]
        summary["test_seconds"] = round(time.perf_counter() - t0 - (s.clock.seconds - compiling), 3)
        summary["test"] = results[0]
        if reported.ema is not None:
            summary["test_ema"] = results[1]
    if tune is not None:
        ckpt, _ = _find_checkpoint(run, which)
        reported, _ = checkpoint.restore(ckpt, state, with_optimizer=False)
        summary.update(tune.final_metrics(reported.params, reported.rest))
    summary["compile_seconds"] = round(s.clock.seconds - s.compile_start, 3)
    summary["compile_cache"] = {"hits": s.clock.cache_hits - s.cache_start[0],
                                "misses": s.clock.cache_misses - s.cache_start[1]}
    with _disk_faults(run, run.summary):
        run.write_json(run.summary, summary)
    return summary


def training_attack(adversarial):
    """The AttackConfig of a recipe's train.adversarial section (Linf, untargeted)."""
    if adversarial.attack == "fast-fgsm":  # Wong et al. 2020: one step of 1.25 eps from a uniform random start
        step = 1.25 * adversarial.eps if adversarial.step_size is None else adversarial.step_size
        return AttackConfig(name="pgd", norm="linf", steps=1, step_size=step)
    step = 0.02 if adversarial.step_size is None else adversarial.step_size
    return AttackConfig(name=adversarial.attack, norm="linf", steps=adversarial.steps, step_size=step)


def single_step(adversarial) -> bool:
    """Whether a train.adversarial attack takes one gradient step (the kind that can overfit catastrophically)."""
    return adversarial.attack in ("fgsm", "fast-fgsm") or (adversarial.attack == "pgd" and adversarial.steps == 1)


def _score_name(recipe: Recipe) -> str:
    """The validation metric that picks the best epoch: PGD accuracy for single-step adversarial training (its own
    attack's accuracy rises when it overfits catastrophically), the training attack's, or clean accuracy."""
    adversarial = recipe.train.adversarial
    if adversarial is None:
        return "val_acc"
    return "val_pgd_acc" if single_step(adversarial) else "val_robust_acc"


def catastrophic_overfitting(rows: list[dict]) -> str | None:
    """A warning when the last epoch's PGD accuracy fell more than CO_DROP below its best epoch's while the
    single-step attack's accuracy rose above that epoch's (Wong et al. 2020, section 5.2), or when it lies more
    than CO_GAP below the single-step attack's (a run that collapsed before it ever was robust); rows: metrics."""
    rows = [r for r in rows if "val_pgd_acc" in r]
    if not rows:
        return None
    last, advice = rows[-1], ("the best checkpoint keeps the most PGD-robust epoch (smaller step_size, eps or "
                              "learning rate avoid it)")
    if len(rows) > 1:
        best = max(rows[:-1], key=lambda r: r["val_pgd_acc"])
        if best["val_pgd_acc"] - last["val_pgd_acc"] > CO_DROP and last["val_robust_acc"] > best["val_robust_acc"]:
            return (f"catastrophic overfitting at epoch {last['epoch']}: PGD-{CO_STEPS} accuracy on validation fell "
                    f"from {best['val_pgd_acc']:.1%} (epoch {best['epoch']}) to {last['val_pgd_acc']:.1%} while the "
                    f"training attack's rose from {best['val_robust_acc']:.1%} to {last['val_robust_acc']:.1%}; "
                    f"{advice}")
    if last["val_robust_acc"] - last["val_pgd_acc"] > CO_GAP:
        return (f"catastrophic overfitting at epoch {last['epoch']}: PGD-{CO_STEPS} accuracy on validation is "
                f"{last['val_pgd_acc']:.1%} against {last['val_robust_acc']:.1%} under the training attack; {advice}")
    return None


def _augment(recipe: Recipe):
    if not recipe.augment:
        return None

    return build_augment(recipe.augment)


def _train_row(totals) -> dict[str, float]:
    t = jax.device_get(totals)
    count = max(float(t["count"]), 1.0)
    return {"train_loss": float(t["loss"]) / count, "train_acc": float(t["correct"]) / count,
            "grad_norm": float(t["grad_norm"]) / count}


def _check_finite(row: dict[str, float], epoch: int, step: int, run: RunDir) -> None:
    if not math.isfinite(row["train_loss"]):
        index = checkpoint.read_index(run.checkpoints, quiet=True) if run.writes else None
        kept = (f"the last finite checkpoint, {checkpoint.describe(index['latest'])}, is kept in {run.checkpoints}"
                if index else "no checkpoint was written yet")
        raise TrainingDiverged(f"the training loss became {row['train_loss']} in epoch {epoch + 1} at step {step}; "
                               f"{kept}. Lower optim.lr or set optim.clip_norm.")


class _NullDisplay:
    def start(self, **kw): ...
    def update(self, **kw): ...
    def epoch_done(self, row): ...
    def message(self, text): ...
    def finish(self): ...
