"""Adversarial attacks as pure JAX functions over a batch of pixels in [0, 1].

Models normalize inside (docs/design.md), so an attack perturbs pixels directly and clips to [0, 1].
Every attack is `fn(logits_fn, x, y, eps, key, cfg) -> x_adv`, where `logits_fn` maps pixels to
logits, `y` holds (N, C) label distributions (one-hot, or soft labels during training) and `eps`
is a traced scalar, so one compilation serves every epsilon. Untargeted attacks ascend the
cross-entropy of `y`; targeted ones (cfg.target set, `y` = the target) descend it.

    fgsm          x + eps * sign(g)                                    (Goodfellow et al. 2014)
    fgm-l2        x + eps * g / ||g||_2                                (the lectures' x + a dE/dx)
    bim           iterated steps projected onto the eps-ball           (Kurakin et al. 2016)
    pgd           bim from a uniform random start, best of R restarts  (Madry et al. 2017)
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
        steps: iterations of bim/pgd.
        step_size: bim/pgd step; None picks DEFAULT_STEP_FACTOR * eps / steps.
        restarts: pgd random restarts; the strongest example per input is kept.
        target: None (untargeted), a class index, 'least-likely' or 'random'.
    """

    name: str = "fgsm"
    norm: str = "linf"
    steps: int = 10
    step_size: float | None = None
    restarts: int = 1
    target: int | str | None = None

    @property
    def targeted(self) -> bool:
        return self.target is not None

    def step_for(self, eps):
        """The bim/pgd step size at `eps` (a float or a traced scalar)."""
        return DEFAULT_STEP_FACTOR * eps / self.steps if self.step_size is None else self.step_size


@dataclass(frozen=True)
class Attack:
    """A registered attack: the function and what it supports."""

    fn: Callable
    norms: tuple[str, ...]
    iterative: bool = False
    random_start: bool = False
    needs_affine: bool = False  # only exact (and only allowed) for a model that is one affine map


ATTACKS = Registry("attack")


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


def run_attack(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array, eps, key: jax.Array, cfg: AttackConfig,
               num_classes: int):
    """Attack a batch with integer labels; returns (x_adv, clean logits, targets or None)."""
    attack = ATTACKS.get(cfg.name)
    clean_logits = logits_fn(x)
    k_target, k_attack = jax.random.split(key)
    targets = None
    if cfg.targeted or attack.needs_affine:
        targets = choose_targets(cfg.target, clean_logits, labels, k_target, num_classes)
    y = jax.nn.one_hot(labels if targets is None else targets, num_classes)
    return attack.fn(logits_fn, x, y, eps, k_attack, cfg), clean_logits, targets


def check_config(cfg: AttackConfig, class_names: list[str]) -> None:
    """Raise a UserError for an attack that cannot run as configured."""
    attack = ATTACKS.get(cfg.name)
    if cfg.norm not in attack.norms:
        other = {"fgsm": "fgm-l2", "fgm-l2": "fgsm"}.get(cfg.name, "pgd")
        raise UserError(f"{cfg.name} works in the {'/'.join(attack.norms)} norm, not {cfg.norm}; use {other}")
    if cfg.steps < 1:
        raise UserError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.restarts < 1:
        raise UserError(f"--restarts must be at least 1, got {cfg.restarts}")
    if cfg.restarts > 1 and not attack.random_start:
        raise UserError(f"--restarts needs a random start: use pgd, not {cfg.name}")
    if cfg.step_size is not None and cfg.step_size <= 0:
        raise UserError(f"--step-size must be positive, got {cfg.step_size}")
    if isinstance(cfg.target, int) and not 0 <= cfg.target < len(class_names):
        raise UserError(f"target class {cfg.target} does not exist: the model has classes 0..{len(class_names) - 1} "
                        f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})")
    if isinstance(cfg.target, str) and cfg.target not in TARGET_MODES:
        raise UserError(f"unknown target '{cfg.target}'; give a class, {' or '.join(TARGET_MODES)}")


def check_eps(eps_values) -> list[float]:
    """Each epsilon must lie in [0, 1]: pixels live in [0, 1], so a larger ball is the whole image space."""
    values = [float(e) for e in eps_values]
    bad = [e for e in values if not 0.0 <= e <= 1.0]
    if bad:
        raise UserError(f"eps must lie in [0, 1] (pixels are in [0, 1]), got {bad[0]:g}")
    if not values:
        raise UserError("give at least one eps, e.g. --eps 0,0.05,0.1")
    return values


def step_size_warning(cfg: AttackConfig, eps_values) -> str | None:
    """A warning when an explicit bim/pgd step exceeds eps: each step then overshoots the ball."""
    if not ATTACKS.get(cfg.name).iterative or cfg.step_size is None:
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
