"""AutoAttack's attacks against the reference (torchattacks 3.5) on the same weights, and their exact parts
(losses, projections, schedules, Square's pattern) against the reference's own functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnncli.adversarial import apgd, fab, square
from cnncli.adversarial.attacks import AttackConfig, run_attack, run_loop
from cnncli.adversarial.robustness import logits_function
from cnncli.train.trained_run import eval_data, load_trained

torch = pytest.importorskip("torch")
ta = pytest.importorskip("torchattacks")

N = 24  # images: the fast tests stay small
EPS = 0.03  # small enough that the fixture's LeNet-5 keeps some robust points, so the attacks have work to do


@pytest.fixture(scope="module")
def twins(lenet_run):
    """(cnncli model, its torch twin, pixels NHWC, labels) on the first N test images of the fixture's LeNet-5."""
    from tests.torch_models import from_cnncli

    trained = load_trained(lenet_run)
    x, y, names = eval_data(trained, "test")
    model = from_cnncli(trained.model, "lenet5", trained.image_shape, len(names))
    return trained.model, model, x[:N].astype(np.float32) / 255.0, y[:N].astype(np.int32)


def _nchw(x):
    return torch.from_numpy(np.array(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _logits(model):
    return jax.jit(logits_function(model.eval_def, model.params, model.rest))


def test_the_twin_gives_cnncli_logits(twins):
    model, torch_model, x, _ = twins
    with torch.no_grad():
        theirs = torch_model(_nchw(x)).numpy()
    np.testing.assert_allclose(np.asarray(_logits(model)(x)), theirs, atol=1e-4)


def test_dlr_losses_match_the_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)).astype(np.float32)
    labels, targets = rng.integers(0, 10, 64), rng.integers(0, 10, 64)
    logits[:8] *= 20  # confident rows too
    lt, yt, tt = torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(targets)
    reference = ta.APGD.dlr_loss(None, lt, yt).numpy()
    reference_t = ta.APGDT.dlr_loss_targeted(None, lt, yt, tt).numpy()
    np.testing.assert_allclose(np.asarray(apgd.dlr(jnp.asarray(logits), jnp.asarray(labels), None)), reference,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(apgd.dlr_targeted(jnp.asarray(logits), jnp.asarray(labels),
                                                            jnp.asarray(targets))), reference_t, rtol=1e-5, atol=1e-6)


def test_checkpoints_are_the_references(monkeypatch):
    """The iterations where the reference checks its step size, and each window's length, recorded from its own run."""
    calls = []
    original = ta.APGD.check_oscillation

    def spy(self, x, j, k, y5, k3=0.75):
        calls.append((j, k))
        return original(self, x, j, k, y5, k3)

    monkeypatch.setattr(ta.APGD, "check_oscillation", spy)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    for steps in (100, 37, 10):
        calls.clear()
        ta.APGD(net, eps=0.1, steps=steps).attack_single_run(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]))
        is_check, length = apgd.checkpoints(steps)
        assert [(int(i), int(length[i])) for i in np.flatnonzero(is_check)] == calls


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projections_match_the_reference(norm):
    """The minimal step onto a hyperplane inside the box, on random points and hyperplanes (the reference's code)."""
    from torchattacks.attacks.fab import projection_l2, projection_linf

    rng = np.random.default_rng(1)
    t = rng.uniform(size=(40, 50)).astype(np.float32)
    w = rng.normal(size=(40, 50)).astype(np.float32)
    w[:5, :10] = 0.0  # coordinates that cannot move
    b = (np.sum(w * t, 1) + rng.normal(scale=2.0, size=40)).astype(np.float32)
    b[5:10] = np.sum(w * t, 1)[5:10] + 1e-3  # so close that no coordinate reaches its bound
    b[-5:] = 1e3  # out of reach inside the box
    reference = {"linf": projection_linf, "l2": projection_l2}[norm](*map(torch.from_numpy, (t, w, b))).numpy()
    ours = np.asarray(fab.PROJECTIONS[norm](*map(jnp.asarray, (t, w, b))))
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("s", [3, 5, 8, 11])
def test_square_l2_pattern_is_the_references(s, monkeypatch):
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(1))  # the reference then does not transpose
    reference = ta.Square(torch.nn.Linear(1, 1), norm="L2").eta(s).numpy()
    h = 16
    rows = jnp.arange(h)[None, :, None, None] - 2
    cols = jnp.arange(h)[None, None, :, None] - 3
    canvas = np.asarray(square.blob(rows, cols, s, jnp.zeros(1, bool)))[0, :, :, 0]
    np.testing.assert_allclose(canvas[2:2 + s, 3:3 + s], reference, atol=1e-6)
    assert np.count_nonzero(canvas) == np.count_nonzero(reference)  # nothing outside the square
    flipped = np.asarray(square.blob(rows, cols, s, jnp.ones(1, bool)))[0, :, :, 0]
    np.testing.assert_allclose(flipped[2:2 + s, 3:3 + s], reference.T, atol=1e-6)


def test_square_never_proposes_a_square_that_changes_nothing():
    """The reference redraws the signs of a square that would leave the best point as it is; so do we."""
    x = jnp.full((3, 6, 6, 3), 0.5)
    x_best = x.at[:2].add(0.1).at[2].add(-0.1)  # examples 0 and 1 at +eps everywhere, example 2 at -eps
    window = jnp.zeros((3, 6, 6, 1), bool).at[:, 1:3, 2:4].set(True)
    sign = jnp.ones((3, 1, 1, 3)).at[1, ..., 0].set(-1.0)  # 0: a no-op, 1: changes channel 0, 2: changes all
    new = square.changing_sign(x, x_best, window, sign, 0.1, jax.random.key(0))
    assert not np.all(np.asarray(new[0]) == 1.0)  # redrawn until some channel flips
    np.testing.assert_array_equal(new[1:], sign[1:])  # proposals that change pixels stay as drawn
    one = square.changing_sign(x[..., :1], x_best[..., :1], window, sign[..., :1], 0.1, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(one)[:, 0, 0, 0], [-1.0, -1.0, 1.0])  # one channel: the other sign
    grey = square.changing_sign(x[:1], x[:1], window[:1], sign[:1], 0.0, jax.random.key(0))
    assert np.all(np.abs(np.asarray(grey)) == 1.0)  # eps 0: no sign changes anything, and the redrawing stops


def test_square_side_schedule_is_the_references():
    reference = ta.Square(torch.nn.Linear(1, 1), resc_schedule=False)
    for i in (0, 10, 11, 50, 51, 200, 201, 999, 1001, 4500, 9000):
        p = reference.p_selection(i)
        expected = max(int(round(np.sqrt(p * 784))), 1)
        assert int(square.side(jnp.int32(i), 784, 1, 1)) == expected, i


@pytest.mark.slow
def test_apgd_follows_the_reference_from_the_same_start(twins, monkeypatch):
    """Same weights, same random start: APGD-CE's iterates, and who gets fooled, are the reference's."""
    model, torch_model, x, y = twins
    key, steps = jax.random.key(3), 12
    k_start, _ = jax.random.split(key)
    start = np.asarray(jax.random.uniform(k_start, x.shape, minval=-1.0, maxval=1.0))
    monkeypatch.setattr(torch, "rand", lambda *a, **k: (_nchw(start) + 1) / 2)
    reference = ta.APGD(torch_model, eps=EPS, steps=steps, loss="ce")
    _, acc, _, best_adv = reference.attack_single_run(_nchw(x), torch.from_numpy(y.astype(np.int64)))
    run = apgd.apgd(apgd.cross_entropy, apgd.cross_entropy_targeted, steps=steps, norm="linf")
    ours = run_loop(run, _logits(model), jnp.asarray(x), jnp.asarray(y), None, EPS, key, 0)
    fooled = np.asarray(jnp.argmax(_logits(model)(ours), -1)) != y
    np.testing.assert_array_equal(fooled, ~acc.numpy())
    assert 0 < fooled.sum() < N  # the comparison covers both outcomes
    close = np.abs(np.asarray(ours)[fooled] - _nhwc(best_adv)[fooled]) < 1e-4
    assert close.mean() > 0.99  # a gradient's sign may flip on a few pixels where it is ~0


@pytest.mark.slow
def test_fab_t_matches_the_reference(twins):
    """FAB-T without a random start is deterministic: same weights, same adversarial examples."""
    model, torch_model, x, y = twins
    steps, targets = 10, 3
    reference = ta.FAB(torch_model, eps=EPS, steps=steps, multi_targeted=True, n_classes=targets + 1)
    theirs = _nhwc(reference(_nchw(x), torch.from_numpy(y.astype(np.int64))))
    cfg = AttackConfig("fab-t", steps=steps, targets=targets)
    ours = np.asarray(jax.jit(lambda v: run_attack(_logits(model), v, jnp.asarray(y), EPS, jax.random.key(0), cfg,
                                                   10)[0])(jnp.asarray(x)))
    moved = np.abs(theirs - x).reshape(N, -1).max(1) > 0
    np.testing.assert_array_equal(np.abs(ours - x).reshape(N, -1).max(1) > 0, moved)
    assert moved.any()
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_mi_fgsm_matches_the_reference(twins):
    model, torch_model, x, y = twins
    reference = ta.MIFGSM(torch_model, eps=EPS, alpha=EPS / 5, steps=5, decay=1.0)
    theirs = _nhwc(reference(_nchw(x), torch.from_numpy(y.astype(np.int64))))
    cfg = AttackConfig("mi-fgsm", steps=5, step_size=EPS / 5)
    ours = np.asarray(run_attack(_logits(model), jnp.asarray(x), jnp.asarray(y), EPS, jax.random.key(0), cfg, 10)[0])
    assert np.mean(np.abs(ours - theirs) < 1e-5) > 0.99
