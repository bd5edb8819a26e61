"""Adversarial attacks as pure JAX functions over a batch of pixels in [0, 1], and their registry.

Models normalize inside (docs/design.md), so an attack perturbs pixels directly and clips to [0, 1].
Two kinds of attack share the registry:

- classic ones are `fn(logits_fn, x, y, eps, key, cfg) -> x_adv`, where `y` holds (N, C) label
  distributions (one-hot, or soft labels during training): untargeted attacks ascend the
  cross-entropy of `y`, targeted ones (cfg.target set, `y` = the target) descend it;
- the attacks of the AutoAttack evaluation (apgd.py, fab.py, square.py) and the minimum-norm ones
  (minimum_norm.py) build a `Run` from their config (start, step and finish functions over a state,
  with integer labels) that `run_loop` runs as one `lax` loop. An attack is a sequence of runs
  (restarts, target classes), and `sweep` keeps, per example, the first run that fools the model, as
  AutoAttack's attacks do.

`eps` is a traced scalar, so one compilation serves every epsilon.

    fgsm          x + eps * sign(g)                                    (Goodfellow et al. 2014)
    fgm-l2        x + eps * g / ||g||_2                                (the lectures' x + a dE/dx)
    bim           iterated steps projected onto the eps-ball           (Kurakin et al. 2016)
    pgd           bim from a uniform random start, best of R restarts  (Madry et al. 2017)
    mi-fgsm       bim with a momentum of L1-normalized gradients       (Dong et al. 2018)
    linear-fool   x + a * w_t, with a * ||w_t|| = eps, for an affine model (the lectures' kit fox)
"""

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from cnncli.errors import UserError
from cnncli.registry import Registry

NORMS = ("linf", "l2")
TARGET_MODES = ("least-likely", "random")
# Madry et al.'s heuristic: with step = 2.5 * eps / steps the iterate can cross the ball and still refine.
DEFAULT_STEP_FACTOR = 2.5
TINY = 1e-12  # guards the L2 normalizations against a zero gradient or a zero perturbation
AFFINE_RTOL = 1e-3  # float32 round-off in an affine map stays far below this; any ReLU/pool kink does not

LogitsFn = Callable[[jax.Array], jax.Array]


@dataclass(frozen=True)
class AttackConfig:
    """How to attack (everything except epsilon, which varies per call).

    Attributes:
        name: a registered attack (see ATTACKS).
        norm: 'linf' or 'l2': the ball the perturbation stays in (fgsm is Linf, fgm-l2 is L2).
        steps: iterations of the iterative attacks.
        step_size: bim/pgd/mi-fgsm step; None picks DEFAULT_STEP_FACTOR * eps / steps (mi-fgsm: eps / steps).
        restarts: random restarts (pgd keeps the strongest example; the AutoAttack attacks the first success).
        target: None (untargeted), a class index, 'least-likely' or 'random'.
        targets: apgd-t / fab-t: how many of the top classes (after the first) the runs target.
        queries: square: model queries per run.
        eot: apgd: gradient samples averaged per step (expectation over transformation, for random models).
        decay: mi-fgsm: momentum decay.
        c: cw-l2: weight of the misclassification term against the squared L2 norm.
        kappa: cw-l2: the logit margin it aims for.
    """

    name: str = "fgsm"
    norm: str = "linf"
    steps: int = 10
    step_size: float | None = None
    restarts: int = 1
    target: int | str | None = None
    targets: int = 9
    queries: int = 5000
    eot: int = 1
    decay: float = 1.0
    c: float = 1.0
    kappa: float = 0.0

    @property
    def targeted(self) -> bool:
        return self.target is not None

    def step_for(self, eps, factor: float = DEFAULT_STEP_FACTOR):
        """The bim/pgd step size at `eps` (a float or a traced scalar)."""
        return factor * eps / self.steps if self.step_size is None else self.step_size


@dataclass(frozen=True)
class Run:
    """One run of an iterative attack: a start, `steps` steps and a finish (see `run_loop`).

    Attributes:
        start: (logits_fn, x, labels, targets, eps, key, index) -> state, a pytree holding everything the
            steps need (index: the run's number, traced).
        step: (logits_fn, i, state) -> state for iteration i (traced).
        finish: (logits_fn, state) -> x_adv.
        steps: iterations.
        working: state -> per-example bool, or None; the run stops early once no example works.
    """

    start: Callable
    step: Callable
    finish: Callable
    steps: int
    working: Callable | None = None


@dataclass(frozen=True)
class Attack:
    """A registered attack: its function (`fn`, classic) or its runs (`run(cfg) -> Run`, see the module
    docstring), and what it supports."""

    fn: Callable | None = None
    norms: tuple[str, ...] = NORMS
    iterative: bool = False
    random_start: bool = False
    needs_affine: bool = False  # only exact (and only allowed) for a model that is one affine map
    run: Callable[[AttackConfig], Run] | None = None
    runs: Callable[[AttackConfig, int], int] | None = None  # (cfg, num_classes) -> how many runs
    default_steps: int = 10
    auto_step: bool = False  # chooses its own step sizes: --step-size does not apply
    minimum_norm: bool = False  # looks for the smallest perturbation; kept only when it lies inside eps
    black_box: bool = False  # queries the model's outputs only, no gradients
    untargeted_only: bool = False
    sweeps_targets: bool = False  # untargeted, its runs still aim at the top classes in turn
    min_classes: int = 2

    def num_runs(self, cfg: AttackConfig, num_classes: int) -> int:
        return 1 if self.runs is None else self.runs(cfg, num_classes)

    def apply(self, logits_fn, x, labels, targets, eps, key, cfg: AttackConfig, index, num_classes: int):
        """Run number `index` (a traced int) of the attack on integer labels (and targets when targeted)."""
        if self.run is not None:
            return run_loop(self.run(cfg), logits_fn, x, labels, targets, eps, key, index)
        y = jax.nn.one_hot(labels if targets is None else targets, num_classes)
        return self.fn(logits_fn, x, y, eps, key, cfg)


ATTACKS = Registry("attack")


def run_loop(run: Run, logits_fn: LogitsFn, x, labels, targets, eps, key, index):
    """The run inside the caller's trace, as one `lax` loop: x_adv."""
    state = run.start(logits_fn, x, labels, targets, eps, key, index)
    if run.working is None:
        state = jax.lax.fori_loop(0, run.steps, lambda i, s: run.step(logits_fn, i, s), state)
    else:
        def more(carry):
            i, s = carry
            return (i < run.steps) & jnp.any(run.working(s))

        state = jax.lax.while_loop(more, lambda c: (c[0] + 1, run.step(logits_fn, c[0], c[1])),
                                   (jnp.int32(0), state))[1]
    return run.finish(logits_fn, state)


# ----------------------------------------------------------------------------- building blocks


def objective(logits: jax.Array, y: jax.Array, targeted: bool) -> jax.Array:
    """Per-example quantity every attack increases: the loss of y, or minus it when y is a target."""
    ce = optax.softmax_cross_entropy(logits, y)
    return -ce if targeted else ce


def input_gradient(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, targeted: bool) -> jax.Array:
    """d objective / d x per example (examples are independent: the model runs in inference mode)."""
    return jax.grad(lambda v: objective(logits_fn(v), y, targeted).sum())(x)


def _per_example(fn, v: jax.Array) -> jax.Array:
    """Reduce over all but the batch axis, keeping dims so the result broadcasts against v."""
    return fn(v, axis=tuple(range(1, v.ndim)), keepdims=True)


def l2_norm(v: jax.Array) -> jax.Array:
    return jnp.sqrt(_per_example(jnp.sum, v * v))


def linf_norm(v: jax.Array) -> jax.Array:
    return _per_example(jnp.max, jnp.abs(v))


def steepest_direction(g: jax.Array, norm: str) -> jax.Array:
    """The unit-norm step that increases a linearized objective most: sign(g) (Linf) or g / ||g|| (L2)."""
    return jnp.sign(g) if norm == "linf" else g / jnp.maximum(l2_norm(g), TINY)


def project(delta: jax.Array, eps, norm: str) -> jax.Array:
    """The closest perturbation inside the eps-ball."""
    if norm == "linf":
        return jnp.clip(delta, -eps, eps)
    return delta * jnp.minimum(1.0, eps / jnp.maximum(l2_norm(delta), TINY))


def clip_pixels(x: jax.Array) -> jax.Array:
    """Clip to [0, 1]. From a clean x inside [0, 1] this moves every pixel towards x, so it never leaves the ball."""
    return jnp.clip(x, 0.0, 1.0)


def random_ball(key: jax.Array, shape, eps, norm: str) -> jax.Array:
    """A perturbation drawn uniformly from the eps-ball (Linf: a cube; L2: the solid ball)."""
    if norm == "linf":
        return jax.random.uniform(key, shape, minval=-1.0, maxval=1.0) * eps
    k_dir, k_rad = jax.random.split(key)
    direction = jax.random.normal(k_dir, shape)
    direction = direction / jnp.maximum(l2_norm(direction), TINY)
    dims = 1
    for d in shape[1:]:
        dims *= d
    radius = jax.random.uniform(k_rad, (shape[0],) + (1,) * (len(shape) - 1)) ** (1.0 / dims)
    return eps * radius * direction


def succeeded(logits: jax.Array, y: jax.Array, targeted: bool) -> jax.Array:
    """Per example: does the model predict the target (targeted) or anything but y's class (untargeted)?"""
    hit = jnp.argmax(logits, -1) == jnp.argmax(y, -1)
    return hit if targeted else ~hit


def hits(logits: jax.Array, labels: jax.Array, targets: jax.Array | None) -> jax.Array:
    """Per example, integer labels: predicted as the target (targets given), or misclassified."""
    pred = jnp.argmax(logits, -1)
    return pred != labels if targets is None else pred == targets


def ranked_class(logits: jax.Array, rank) -> jax.Array:
    """The class with the rank-th highest logit per example (rank 1: the top one; may be traced)."""
    order = jnp.argsort(logits, axis=-1)
    index = jnp.broadcast_to(logits.shape[-1] - jnp.asarray(rank, jnp.int32), logits.shape[:1])
    return jnp.take_along_axis(order, index[:, None], axis=-1)[:, 0]


def inside(x_adv: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """x_adv where its perturbation lies inside the eps-ball, else x: a minimum-norm attack within a budget."""
    delta = x_adv - x
    size = linf_norm(delta) if norm == "linf" else l2_norm(delta)
    return jnp.where(size <= eps, x_adv, x)


# ----------------------------------------------------------------------------- the attacks


def fgsm(logits_fn: LogitsFn, x, y, eps, key, cfg: AttackConfig):
    """Fast gradient sign method: one Linf step of size eps."""
    del key  # deterministic
    return clip_pixels(x + eps * jnp.sign(input_gradient(logits_fn, x, y, cfg.targeted)))


def fgm_l2(logits_fn: LogitsFn, x, y, eps, key, cfg: AttackConfig):
    """Fast gradient method, L2: one step of L2 length eps along the gradient."""
    del key
    return clip_pixels(x + eps * steepest_direction(input_gradient(logits_fn, x, y, cfg.targeted), "l2"))


def _descend(logits_fn: LogitsFn, x, y, eps, key, cfg: AttackConfig, random_start: bool):
    """One run of projected steepest ascent from x (or from a random point of the ball)."""
    step = cfg.step_for(eps)
    delta = random_ball(key, x.shape, eps, cfg.norm) if random_start else jnp.zeros_like(x)
    x_adv = clip_pixels(x + delta)
    # A Python loop (unrolled in the trace) rather than lax.fori_loop: on CPU, XLA runs loop bodies
    # several times slower than the same ops unrolled (docs/design.md), and steps is small.
    for _ in range(cfg.steps):
        g = input_gradient(logits_fn, x_adv, y, cfg.targeted)
        x_adv = clip_pixels(x + project(x_adv + step * steepest_direction(g, cfg.norm) - x, eps, cfg.norm))
    return x_adv


def bim(logits_fn: LogitsFn, x, y, eps, key, cfg: AttackConfig):
    """Basic iterative method: `steps` projected gradient steps from x."""
    return _descend(logits_fn, x, y, eps, key, cfg, random_start=False)


def pgd(logits_fn: LogitsFn, x, y, eps, key, cfg: AttackConfig):
    """Projected gradient descent from a uniform random start; per input, the strongest of the restarts."""
    best = None
    for restart in range(cfg.restarts):
        x_adv = _descend(logits_fn, x, y, eps, jax.random.fold_in(key, restart), cfg, random_start=True)
        logits = logits_fn(x_adv)
        # rank by success first, then by the objective: a successful example beats a higher loss
        score = (succeeded(logits, y, cfg.targeted), objective(logits, y, cfg.targeted))
        if best is None:
            best = (x_adv, score)
            continue
        (best_x, (best_ok, best_obj)), (ok, obj) = best, score
        better = (ok & ~best_ok) | ((ok == best_ok) & (obj > best_obj))
        pick = better.reshape((-1,) + (1,) * (x.ndim - 1))
        best = (jnp.where(pick, x_adv, best_x), (ok | best_ok, jnp.where(better, obj, best_obj)))
    return best[0]


def mi_fgsm(logits_fn: LogitsFn, x, y, eps, key, cfg: AttackConfig):
    """Momentum iterative FGSM (Dong et al. 2018): steps along the sign of a decayed sum of L1-normalized gradients."""
    del key
    step = cfg.step_for(eps, factor=1.0)  # the paper's alpha = eps / T
    x_adv, momentum = x, jnp.zeros_like(x)
    for _ in range(cfg.steps):  # unrolled, like _descend
        g = input_gradient(logits_fn, x_adv, y, cfg.targeted)
        momentum = cfg.decay * momentum + g / jnp.maximum(_per_example(jnp.sum, jnp.abs(g)), TINY)
        x_adv = clip_pixels(x + project(x_adv + step * steepest_direction(momentum, cfg.norm) - x, eps, cfg.norm))
    return x_adv


def linear_fool(logits_fn: LogitsFn, x, y, eps, key, cfg: AttackConfig):
    """Add a multiple of the target class's weights: x + a * w_t, with ||a * w_t|| = eps in the chosen norm.

    For an affine model, w_t (the target's row of the weights, in pixel units) is the gradient of the
    target's logit, so the target's score rises by exactly a * ||w_t||_2^2 (before clipping).
    """
    del key
    w = jax.grad(lambda v: jnp.sum(logits_fn(v) * y))(x)
    size = linf_norm(w) if cfg.norm == "linf" else l2_norm(w)
    return clip_pixels(x + eps * w / jnp.maximum(size, TINY))


ATTACKS.register("fgsm", Attack(fgsm, ("linf",)), help="fast gradient sign: x + eps*sign(grad) (Linf)")
ATTACKS.register("fgm-l2", Attack(fgm_l2, ("l2",)), help="fast gradient, L2: x + eps*grad/||grad||")
ATTACKS.register("bim", Attack(bim, NORMS, iterative=True),
                 help="basic iterative method: projected gradient steps from x (Linf or L2)")
ATTACKS.register("pgd", Attack(pgd, NORMS, iterative=True, random_start=True),
                 help="projected gradient descent: random start, restarts keep the strongest (Linf or L2)")
ATTACKS.register("mi-fgsm", Attack(mi_fgsm, NORMS, iterative=True),
                 help="momentum iterative FGSM (Dong et al. 2018): decay 1.0, step eps/steps (Linf or L2)")
ATTACKS.register("linear-fool", Attack(linear_fool, NORMS, needs_affine=True),
                 help="x + a*w_target for a linear (softmax) model, as on the lectures' kit-fox slide")


# ----------------------------------------------------------------------------- targets and checks


def choose_targets(target: int | str | None, clean_logits: jax.Array, labels: jax.Array, key: jax.Array,
                   num_classes: int) -> jax.Array:
    """Integer target classes per example.

    Args:
        target: a class index; 'least-likely' (the clean model's lowest score); 'random' (uniform over
            the classes other than the label); or None: the runner-up (highest-scoring class other
            than the label), which an attack that always moves towards a class uses when untargeted.
        clean_logits: the model's logits on the clean batch.
        labels: integer labels the attack starts from.
        key: randomness for 'random'.
        num_classes: the class count.
    """
    if isinstance(target, int):
        return jnp.full(labels.shape, target, jnp.int32)
    if target == "least-likely":
        return jnp.argmin(clean_logits, -1).astype(jnp.int32)
    if target == "random":
        return ((labels + jax.random.randint(key, labels.shape, 1, num_classes)) % num_classes).astype(jnp.int32)
    masked = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), -jnp.inf, clean_logits)
    return jnp.argmax(masked, -1).astype(jnp.int32)


def sweep(logits_fn: LogitsFn, x, labels, targets, eps, key, cfg: AttackConfig, num_classes: int):
    """Every run of the attack in turn; per example, the first run that succeeds (else the last run) is kept."""
    attack = ATTACKS.get(cfg.name)
    runs = attack.num_runs(cfg, num_classes)

    def one(i):
        return attack.apply(logits_fn, x, labels, targets, eps, jax.random.fold_in(key, i), cfg, i, num_classes)

    best = one(0)
    if runs == 1:
        return best

    def body(i, carry):
        best, done = carry
        x_i = one(i)
        keep = done.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(keep, best, x_i), done | hits(logits_fn(x_i), labels, targets)

    best, _ = jax.lax.fori_loop(1, runs, body, (best, hits(logits_fn(best), labels, targets)))
    return best


def run_attack(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, eps, key: jax.Array, cfg: AttackConfig,
               num_classes: int):
    """Attack a batch with integer labels; returns (x_adv, clean logits, targets or None)."""
    attack = ATTACKS.get(cfg.name)
    clean_logits = logits_fn(x)
    k_target, k_attack = jax.random.split(key)
    targets = None
    if cfg.targeted or attack.needs_affine:
        targets = choose_targets(cfg.target, clean_logits, labels, k_target, num_classes)
    if attack.run is None:
        y = jax.nn.one_hot(labels if targets is None else targets, num_classes)
        return attack.fn(logits_fn, x, y, eps, k_attack, cfg), clean_logits, targets
    return sweep(logits_fn, x, labels, targets, eps, k_attack, cfg, num_classes), clean_logits, targets


def check_config(cfg: AttackConfig, class_names: list[str]) -> None:
    """Raise a UserError for an attack that cannot run as configured."""
    attack = ATTACKS.get(cfg.name)
    if cfg.norm not in attack.norms:
        other = {"fgsm": "fgm-l2", "fgm-l2": "fgsm", "cw-l2": "deepfool"}.get(cfg.name, "pgd")
        raise UserError(f"{cfg.name} works in the {'/'.join(attack.norms)} norm, not {cfg.norm}; use {other}")
    if cfg.steps < 1:
        raise UserError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.restarts < 1:
        raise UserError(f"--restarts must be at least 1, got {cfg.restarts}")
    if cfg.restarts > 1 and not attack.random_start:
        raise UserError(f"--restarts needs a random start: use pgd or apgd-ce, not {cfg.name}")
    if cfg.step_size is not None and cfg.step_size <= 0:
        raise UserError(f"--step-size must be positive, got {cfg.step_size}")
    if cfg.step_size is not None and attack.auto_step:
        raise UserError(f"{cfg.name} adapts its own step size; drop --step-size")
    for value, flag in ((cfg.targets, "--n-targets"), (cfg.queries, "--queries"), (cfg.eot, "--eot")):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if cfg.targeted and attack.untargeted_only:
        raise UserError(f"{cfg.name} is untargeted only; for a targeted attack use apgd-t, pgd or cw-l2")
    if len(class_names) < attack.min_classes:
        raise UserError(f"{cfg.name} needs at least {attack.min_classes} classes (its loss ranks the classes); this "
                        f"model has {len(class_names)}: use apgd-ce or pgd")
    if isinstance(cfg.target, int) and not 0 <= cfg.target < len(class_names):
        raise UserError(f"target class {cfg.target} does not exist: the model has classes 0..{len(class_names) - 1} "
                        f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})")
    if isinstance(cfg.target, str) and cfg.target not in TARGET_MODES:
        raise UserError(f"unknown target '{cfg.target}'; give a class, {' or '.join(TARGET_MODES)}")


def check_eps(eps_values, norm: str = "linf") -> list[float]:
    """Linf radii must lie in [0, 1]: pixels live in [0, 1], so a larger ball is the whole image space.
    L2 radii only need to be non-negative (an image of D pixels spans an L2 distance of up to sqrt(D))."""
    values = [float(e) for e in eps_values]
    bad = [e for e in values if not (0.0 <= e <= 1.0 if norm == "linf" else 0.0 <= e < float("inf"))]
    if bad:
        where = "[0, 1] (pixels are in [0, 1])" if norm == "linf" else "[0, inf) for the L2 norm"
        raise UserError(f"eps must lie in {where}, got {bad[0]:g}")
    if not values:
        raise UserError("give at least one eps, e.g. --eps 0,0.05,0.1")
    return values


def step_size_warning(cfg: AttackConfig, eps_values) -> str | None:
    """A warning when an explicit bim/pgd step exceeds eps: each step then overshoots the ball."""
    attack = ATTACKS.get(cfg.name)
    if not attack.iterative or attack.auto_step or cfg.step_size is None:
        return None
    over = [e for e in eps_values if 0 < e < cfg.step_size]
    if not over:
        return None
    return (f"step size {cfg.step_size:g} is larger than eps {', '.join(f'{e:g}' for e in over)}: every step "
            "overshoots the ball and is projected back; a step of about 2.5 * eps / steps works better")


def is_affine(logits_fn: LogitsFn, shape, key: jax.Array) -> bool:
    """True when logits_fn is one affine map (checked on random pixels): f(ta + (1-t)b) = t f(a) + (1-t) f(b)."""
    k_a, k_b = jax.random.split(key)
    a, b = jax.random.uniform(k_a, shape), jax.random.uniform(k_b, shape)
    t = 0.3
    fa, fb, fm = logits_fn(a), logits_fn(b), logits_fn(t * a + (1 - t) * b)
    scale = 1.0 + float(jnp.max(jnp.abs(jnp.stack([fa, fb]))))
    return float(jnp.max(jnp.abs(fm - (t * fa + (1 - t) * fb)))) <= AFFINE_RTOL * scale
