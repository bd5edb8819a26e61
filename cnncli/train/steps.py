"""The pure, jitted training step over a `data` device mesh, and the batch plumbing every step shares.

The model is split once into (graphdef, params, rest); the steps merge it inside jit, so there is
no Python graph walk per call (docs/design.md). Batches are sliced from device-resident uint8 arrays
(a per-epoch shuffled copy, sliced contiguously), converted to [0, 1] pixels and augmented inside
the step, with randomness from fold_in(key, step). Steps never print and never touch the host.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnncli.errors import UserError
from cnncli.models.layers.classifier import AUX_WEIGHT, logits_and_aux
from cnncli.train.state import TrainState
from cnncli.train.toolbox import compute_module, ema_update, weighted_cross_entropy

PERTURB_STREAM = 1  # adversarial examples draw from fold_in(step key, 1); augmentation uses the step key
GENERATED_STREAM = 2  # which generated images join the batch: fold_in(step key, 2)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (or `devices`); the batch is sharded along `data`.

    jax.devices() lists every process's devices in a multi-process run, so there the mesh spans all
    hosts.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def check_batch(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise UserError(f"{what}={batch_size} does not divide over {n} devices; use a multiple of {n}")


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def forward(graphdef, params, rest, x, *, with_aux: bool = False):
    """Float32 logits and the updated non-trainable state (graphdef fixes train or eval mode and the
    compute dtype: see toolbox.compute_module).

    Logits are cast to float32 so that losses and softmaxes are float32 under bfloat16 compute too.
    Auxiliary classifier outputs (GoogLeNet's heads, sown in training mode) are captured rather than
    left in the state, and returned as a third value with `with_aux`.
    """
    # copy=True: fresh Variables at the current trace level, so batch norm may update its
    # statistics inside jax.grad (the caller's Variables belong to the outer jit trace)
    model = compute_module(graphdef, params, rest, copy=True)
    logits, aux = logits_and_aux(model, x)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    if with_aux:
        return logits.astype(jnp.float32), new_rest, [a.astype(jnp.float32) for a in aux]
    return logits.astype(jnp.float32), new_rest


def to_pixels(x: np.ndarray | jax.Array) -> jax.Array:
    """uint8 images -> float32 pixels in [0, 1], what every cnncli model takes."""
    return jnp.asarray(x).astype(jnp.float32) * (1.0 / 255.0)


def take_batch(arrays: jax.Array, index, batch_size: int, stacked: bool) -> jax.Array:
    """Batch `index` of per-example `arrays`: a contiguous slice, or with `stacked` the index-th row
    of (batches, batch_size, ...) arrays (the layout of a multi-process run: see `stack_batches`)."""
    if stacked:
        return jax.lax.dynamic_index_in_dim(arrays, index, keepdims=False)
    return jax.lax.dynamic_slice_in_dim(arrays, index * batch_size, batch_size)


def stacked_sharding(mesh: Mesh) -> NamedSharding:
    """(batches, batch, ...) arrays with each batch sharded along `data`: taking one batch needs no communication."""
    return NamedSharding(mesh, P(None, "data"))


def local_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a `data`-sharded global batch that this process's devices hold (a contiguous block)."""
    index = NamedSharding(mesh, P("data")).addressable_devices_indices_map((batch_size,))
    rows = sorted(ix[0].indices(batch_size)[:2] for ix in index.values())
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"this process's devices do not hold one block of the batch: {rows}")
    return slice(start, stop)


def stack_batches(arrays: np.ndarray, order: np.ndarray, batch_size: int, mesh: Mesh) -> jax.Array:
    """A global (len(order) // batch_size, batch_size, ...) array of arrays[order], batch by batch,
    each process putting only its own rows of every batch on its own devices.

    Every process passes the same `order` (the epoch's shuffle, or the padded evaluation order) and
    its own host copy of `arrays`; none gathers or transfers the other processes' rows.
    """
    batches = len(order) // batch_size
    mine = order[: batches * batch_size].reshape(batches, batch_size)[:, local_rows(mesh, batch_size)]
    local = arrays[mine.reshape(-1)].reshape(mine.shape + arrays.shape[1:])
    return jax.make_array_from_process_local_data(stacked_sharding(mesh), local,
                                                  (batches, batch_size, *arrays.shape[1:]))


@dataclass(frozen=True)
class StepOptions:
    """What a training step does besides cross-entropy on its batch; the defaults turn everything off.

    augment: (x, labels, key) -> (x, labels), applied to the [0, 1] batch inside the step.
    label_smoothing: the targets' smoothing (optax.smooth_labels).
    penalty: params -> a scalar added to the loss (L1/L2).
    perturb, mix: adversarial training. `perturb(params, rest, x, labels, key) -> x_adv` makes
        adversarial examples of the (augmented) batch, and the loss is (1 - mix) * loss(clean) +
        mix * loss(adversarial) (Goodfellow et al.'s alpha = 1 - mix; Madry et al.'s PGD training is
        mix = 1). The training accuracy is then measured on the clean half, or on the adversarial
        batch when mix = 1.
    trades: TRADES (Zhang et al. 2019) with this beta instead of the mix: `perturb` attacks the model's own
        (training-mode) predictions on the clean batch, which maximizes KL(clean || adversarial), and the loss
        is cross-entropy on the clean batch + trades * that KL (mean over the batch).
    class_weights: (k,) weights of the loss per class.
    ema_decay, ema_every: update state.ema after every `ema_every`-th step (global steps ema_every - 1,
        2 * ema_every - 1, ...) with the decay ema_decay ** ema_every, as airbench does: about the
        same average for a fraction of the updates.
    distill: (logits, aux_batch) -> (task_logits, loss) (Learning without Forgetting) takes extra
        outputs off the logits and adds a loss on them; aux_batch is the batch's slice of `aux`, a
        per-example array shuffled like xs (see `shuffle_like`).
    stacked: batches come as (steps, batch_size, ...) arrays (several processes: see `stack_batches`).
    loss: the per-example loss (logits, targets) -> (B,) in place of cross-entropy (`train.loss`).
    generated, generated_per_batch: GAN-based augmentation (`data.generated`). `generated` is a pool
        (uint8 images, int32 labels) on the devices; each batch is batch_size - generated_per_batch
        real images followed by generated_per_batch images drawn from the pool (see `mix_generated`),
        so xs/ys are sliced in blocks of the real part.
    """

    augment: Callable | None = None
    label_smoothing: float = 0.0
    penalty: Callable | None = None
    perturb: Callable | None = None
    mix: float = 1.0
    trades: float | None = None
    class_weights: jax.Array | None = None
    ema_decay: float | None = None
    ema_every: int = 1
    distill: Callable | None = None
    stacked: bool = False
    loss: Callable | None = None
    generated: tuple[jax.Array, jax.Array] | None = None
    generated_per_batch: int = 0


def mix_generated(x: jax.Array, y: jax.Array, pool_x: jax.Array, pool_y: jax.Array, n: int, key: jax.Array):
    """The real batch (x, y) followed by `n` images drawn uniformly from the pool, with their labels.

    x and pool_x are uint8 images, y and pool_y integer labels; a pure function of `key`, so a resumed
    run draws the same images at the same step.
    """
    pick = jax.random.randint(key, (n,), 0, pool_x.shape[0])
    return jnp.concatenate([x, pool_x[pick]]), jnp.concatenate([y.astype(pool_y.dtype), pool_y[pick]])


def make_train_step(train_def, tx: optax.GradientTransformation, *, num_classes: int, batch_size: int,
                    mesh: Mesh, options: StepOptions = StepOptions(), steps: int = 1) -> Callable:
    """A jitted step(state, totals, xs, ys, epoch_start, key, aux=None) -> (state, totals) that takes
    `steps` training steps in one dispatch (a loop inside the program).

    xs/ys are the epoch's shuffled uint8 images and labels on device; each step's batch is the slice
    that starts at (state.step - epoch_start) * batch_size, or with `options.stacked` (several
    processes) row state.step - epoch_start of (steps, batch_size, ...) arrays. state and totals are
    donated. `options` (StepOptions) adds augmentation, adversarial examples, loss terms and EMA; the
    compute precision is the graphdef's.

    EMA (StepOptions.ema_every): a several-step program must start where an EMA stretch starts
    (state.step a multiple of ema_every), `steps` being a multiple of ema_every, and it updates the
    EMA after every ema_every-th step. A one-step program updates it after every step when
    ema_every is 1, and never otherwise: then the caller runs `make_ema_update`'s program after the
    steps that end a stretch. Either way each step computes what a one-step program computes.
    """
    o = options
    batch_sharding = NamedSharding(mesh, P("data"))
    real = batch_size - o.generated_per_batch  # rows of xs/ys per step
    every = o.ema_every if o.ema_decay is not None else 1
    if steps > 1 and steps % every:
        raise UserError(f"{steps} steps per call is not a multiple of train.ema_every={every}")

    def step(state: TrainState, totals, xs, ys, epoch_start, key, aux, pool, update_ema: bool):
        i = state.step - epoch_start
        x, y = take_batch(xs, i, real, o.stacked), take_batch(ys, i, real, o.stacked)
        step_key = jax.random.fold_in(key, state.step)
        if o.generated_per_batch:
            x, y = mix_generated(x, y, *pool, o.generated_per_batch, jax.random.fold_in(step_key, GENERATED_STREAM))
        x = to_pixels(x)
        labels = jax.nn.one_hot(y, num_classes)
        if o.augment is not None:
            x, labels = o.augment(x, labels, step_key)
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
        targets = optax.smooth_labels(labels, o.label_smoothing) if o.label_smoothing else labels
        inputs, weights = x, None
        if o.perturb is not None:
            # TRADES attacks the predictions: the cross-entropy towards them is the KL up to a constant
            attacked = labels if o.trades is None else jax.nn.softmax(
                forward(train_def, state.params, state.rest, x)[0])
            x_adv = o.perturb(state.params, state.rest, x, attacked, jax.random.fold_in(step_key, PERTURB_STREAM))
            # TRADES: cross-entropy on the clean half only (weights 1, 0); the KL joins below
            inputs, targets, weights = _mix_adversarial(x, jax.lax.stop_gradient(x_adv), targets,
                                                        o.mix if o.trades is None else 0.0)
            inputs = jax.lax.with_sharding_constraint(inputs, batch_sharding)

        def loss_fn(params):
            # one forward over clean + adversarial examples: one batch-norm update per step
            logits, rest, aux_logits = forward(train_def, params, state.rest, inputs, with_aux=True)
            kept = 0.0
            if o.distill is not None:  # Learning without Forgetting: the old head's outputs are kept
                logits, kept = o.distill(logits, take_batch(aux, i, batch_size, o.stacked))
            loss = weighted_cross_entropy(logits, targets, o.class_weights, weights, per_example=o.loss)
            # auxiliary classifiers (GoogLeNet) join the training loss with the paper's weight
            aux_loss = sum(AUX_WEIGHT * weighted_cross_entropy(a, targets, o.class_weights, weights)
                           for a in aux_logits)
            reg = o.penalty(params) if o.penalty is not None else 0.0
            if o.trades is not None:
                kept = kept + o.trades * trades_kl(logits[:batch_size], logits[batch_size:])
            return loss + aux_loss + reg + kept, (loss, logits[:batch_size], rest)

        grads, (loss, logits, rest) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))
        totals = {"loss": totals["loss"] + loss * batch_size, "correct": totals["correct"] + correct,
                  "count": totals["count"] + batch_size,
                  "grad_norm": totals["grad_norm"] + optax.global_norm(grads) * batch_size}
        ema = state.ema
        if o.ema_decay is not None and update_ema:
            ema = ema_update(state.ema, params, rest, o.ema_decay, state.step, every)
        return TrainState(params, rest, opt_state, state.step + 1, ema), totals

    def train_step(state, totals, xs, ys, epoch_start, key, aux=None, pool=None):
        return step(state, totals, xs, ys, epoch_start, key, aux, pool, every == 1)

    def train_steps(state, totals, xs, ys, epoch_start, key, aux=None, pool=None):
        def plain(_, carry):
            return step(*carry, xs, ys, epoch_start, key, aux, pool, False)

        def stretch(_, carry):  # every - 1 steps, then the step that updates the EMA
            if every > 1:
                carry = jax.lax.fori_loop(0, every - 1, plain, carry)
            return step(*carry, xs, ys, epoch_start, key, aux, pool, True)

        return jax.lax.fori_loop(0, steps // every, stretch, (state, totals))

    jitted = jax.jit(train_step if steps == 1 else train_steps, donate_argnums=(0, 1))
    if not o.generated_per_batch:
        return jitted
    # the pool is an argument, not a constant folded into the compiled step
    return partial(jitted, pool=o.generated)


def make_ema_update(decay: float, every: int) -> Callable:
    """A jitted update(state) -> state that updates state.ema after the step just taken (state.step - 1)
    for a stretch of `every` steps (see StepOptions.ema_every); the state is donated."""

    def update(state: TrainState) -> TrainState:
        ema = ema_update(state.ema, state.params, state.rest, decay, state.step - 1, every)
        return TrainState(state.params, state.rest, state.opt_state, state.step, ema)

    return jax.jit(update, donate_argnums=0)


def trades_kl(clean_logits: jax.Array, adversarial_logits: jax.Array) -> jax.Array:
    """TRADES' robust term: KL(softmax(clean) || softmax(adversarial)), summed over classes, averaged over the batch."""
    p = jax.nn.log_softmax(clean_logits)
    return jnp.mean(jnp.sum(jnp.exp(p) * (p - jax.nn.log_softmax(adversarial_logits)), -1))


def _mix_adversarial(x, x_adv, targets, mix: float):
    """Inputs, targets and per-example loss weights for (1 - mix) * clean + mix * adversarial (mix 0: the
    adversarial half carries no cross-entropy, as in TRADES)."""
    if mix == 1.0:
        return x_adv, targets, None
    n = x.shape[0]
    weights = jnp.concatenate([jnp.full((n,), 1.0 - mix), jnp.full((n,), mix)])
    return jnp.concatenate([x, x_adv]), jnp.concatenate([targets, targets]), weights


@jax.jit
def shuffle(xs: jax.Array, ys: jax.Array, key: jax.Array):
    """The epoch's shuffled copy of the training set, made once per epoch on device."""
    order = jax.random.permutation(key, xs.shape[0])
    return xs[order], ys[order]


@partial(jax.jit, static_argnames="n")
def shuffle_order(key: jax.Array, n: int) -> jax.Array:
    """The order `shuffle` puts n examples in for the same key (for arrays that stay on the host)."""
    return jax.random.permutation(key, n)


@jax.jit
def shuffle_like(aux: jax.Array, key: jax.Array) -> jax.Array:
    """A per-example array in the order `shuffle` gives the training set for the same key."""
    return aux[jax.random.permutation(key, aux.shape[0])]
