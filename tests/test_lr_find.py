"""`cnncli lr-find`: the exponential range test, its stopping rule and suggestions, checked with NumPy."""

import json

import numpy as np
import pytest
from helpers import cli

from cnncli.tools import lr_find


def test_schedule_is_exponential_from_start_to_end():
    lr = lr_find.schedule(1e-7, 10.0, 100)
    np.testing.assert_allclose([float(lr(i)) for i in range(100)], np.geomspace(1e-7, 10.0, 100), rtol=1e-5)


def test_smoothing_is_a_debiased_moving_average():
    losses = np.array([2.0, 1.0, 3.0, 0.5])
    beta, avg, expected = 0.9, 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        expected.append(avg / (1 - beta ** (i + 1)))
    np.testing.assert_allclose(lr_find.smooth(losses, beta), expected)
    assert lr_find.smooth(np.full(5, 2.0))[-1] == pytest.approx(2.0)  # no bias toward 0 at the start


def range_test_shape(x):
    """A range test's loss against x = log10(lr): flat at first, falling fastest at lr 1e-3 (a tanh), a flat
    bottom (a gentle quadratic takes over) and a blow-up past lr 0.3."""
    return 2.0 - np.tanh(2 * (x + 3)) + 0.1 * np.maximum(0, x + 3) ** 2 + 3 * np.maximum(0, x + 0.5) ** 2


def known_answers():
    """The steepest descent and the minimum of `range_test_shape`, on a grid 8,000 times finer than a range test's."""
    x = np.linspace(-7, 1, 800_001)
    loss = range_test_shape(x)
    return 10 ** x[np.argmin(np.gradient(loss, x))], 10 ** x[np.argmin(loss)]


def test_window_is_a_decade_of_steps():
    assert lr_find.window(np.geomspace(1e-7, 10.0, 100)) == 13  # 99 steps over 8 decades: 12.4 a decade
    assert lr_find.window(np.geomspace(1e-7, 10.0, 300)) == 37
    assert lr_find.window(np.geomspace(1e-3, 1e-2, 4)) == 3  # never narrower than 3


def test_robust_smoothing_ignores_spikes_and_keeps_a_line():
    line = np.linspace(3.0, 1.0, 40)
    np.testing.assert_allclose(lr_find.robust_smooth(line, 5)[4:-4], line[4:-4])  # no lag, no bias
    spiky = line.copy()
    spiky[[10, 20, 30]] += 5.0  # single bad batches: a mean of 5 would move by 1.0 near each
    step = line[0] - line[1]  # a spike only shifts a window's median to the next value of the line
    assert np.abs(lr_find.robust_smooth(spiky, 5) - lr_find.robust_smooth(line, 5)).max() <= step + 1e-12
    # the edges: the median repeats the end value (medians line[0], line[1], line[2]), the mean averages
    # the 3 medians there are
    assert lr_find.robust_smooth(line, 5)[0] == pytest.approx(line[1])
    assert len(lr_find.robust_smooth(line, 5)) == len(line)


def test_suggestions_on_a_curve_with_known_answers():
    lrs = np.geomspace(1e-7, 10.0, 100)
    loss = range_test_shape(np.log10(lrs))
    steepest, minimum = known_answers()
    s = lr_find.suggest(lrs, loss)
    def steps_off(lr, truth):  # how many grid points from the grid point nearest the truth
        return abs(np.argmin(np.abs(np.log(lrs / lr))) - np.argmin(np.abs(np.log(lrs / truth))))

    assert steps_off(s["steepest"], steepest) <= 1
    assert steps_off(s["minimum"], minimum) <= 1  # a smoothing one decade wide moves a lopsided bottom a little
    assert s["suggested"] == pytest.approx(np.sqrt(s["steepest"] * s["minimum"]))
    lo = len(lrs) // 10
    assert s["valley"] == lrs[lo + lr_find.valley_index(lr_find.smooth(loss)[lo:len(lrs) - 5])]
    assert lr_find.suggest(lrs[:14], loss[:14]) == {}  # too short to say
    assert lr_find.suggest(lrs, np.linspace(1.0, 5.0, 100)) == {}  # the loss never falls


def test_suggestion_is_stable_under_noise_and_spikes():
    """One noisy loss per step and a few bad batches must not move the suggestion off the known answer (a
    steepest slope read off a 9-step moving average of such curves strays by more than a decade)."""
    lrs = np.geomspace(1e-7, 10.0, 100)
    loss = range_test_shape(np.log10(lrs))
    truth = np.sqrt(np.prod(known_answers()))
    rng = np.random.default_rng(0)
    found = []
    for _ in range(20):
        noisy = loss + rng.normal(0, 0.1, len(loss))
        noisy[rng.choice(np.arange(10, 65), 3, replace=False)] += rng.uniform(1.0, 3.0, 3)
        found.append(lr_find.suggest(lrs, noisy)["suggested"])
    off = np.log10(found) - np.log10(truth)  # in decades
    assert np.abs(off).max() < 0.25, found  # within a factor 1.8 every time
    assert abs(np.median(off)) < 0.12


def test_valley_is_fastais_point_two_thirds_down_the_longest_descent():
    # rising to index 30, strictly falling from 30 to 90 (61 points), rising after: fastai takes the
    # stretch as (90 - 61, 90] and its point 20 + 10 steps past the start
    losses = np.concatenate([np.linspace(1.0, 2.0, 31), np.linspace(1.99, 0.5, 60), np.linspace(0.6, 3.0, 20)])
    assert lr_find.valley_index(losses) == 29 + 20 + 10


@pytest.mark.slow
def test_lr_find_cli_stops_on_divergence_and_leaves_no_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("lr-find", "mlp_fashion_mnist", "--set", "data.source=digits", "--set", "optim.name=sgd",
                 "--set", "train.batch_size=64", "--end-lr", "1000", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    n = len(out["lrs"])
    assert out["stopped"] == "diverged" and n < 100  # plain SGD cannot survive lr 1000
    np.testing.assert_allclose(out["lrs"], np.geomspace(1e-7, 1000, 100)[:n], rtol=1e-5)
    ema = np.asarray(out["ema"])
    np.testing.assert_allclose(ema, lr_find.smooth(np.asarray(out["losses"])))
    assert ema[-1] > lr_find.DIVERGE * ema.min()  # the stopping rule, and it was the first such step
    assert not (ema[:-1] > lr_find.DIVERGE * np.minimum.accumulate(ema)[:-1]).any()
    assert set(out["suggestions"]) == {"suggested", "steepest", "minimum", "valley"}
    np.testing.assert_allclose(out["smoothed"], lr_find.robust_smooth(np.asarray(out["losses"]), out["window"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find_mlp_fashion_mnist.png"]  # no runs/
