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


def test_suggestions_on_a_curve_with_a_known_steepest_point():
    lrs = np.geomspace(1e-6, 1.0, 200)
    loss = 2.0 - np.tanh(np.log10(lrs) + 3.0)  # steepest descent in log lr at lr = 1e-3
    loss = np.concatenate([loss[:180], loss[180] + np.linspace(0, 5, 20)])  # blows up at the end
    s = lr_find.suggest(lrs, loss)
    spacing = lrs[1] / lrs[0]
    assert 1e-3 / spacing <= s["steepest"] <= 1e-3 * spacing
    assert s["minimum"] == pytest.approx(lrs[np.argmin(loss[20:195]) + 20] / 10)
    assert lrs[20] <= s["valley"] <= lrs[195]
    assert lr_find.suggest(lrs[:12], loss[:12]) == {}  # too short to say
    wild = loss.copy()
    wild[185:190] = [9.0, 3.0, 9.0, 3.2, 9.0]  # swings past the minimum are no descent
    assert lr_find.suggest(lrs, wild)["steepest"] == s["steepest"]


def test_centered_average_has_no_lag():
    losses = np.arange(20.0)
    np.testing.assert_allclose(lr_find.centered(losses, 5)[2:-2], losses[2:-2])  # a line stays where it is
    assert lr_find.centered(losses, 5)[0] == pytest.approx(1.0)  # (0 + 1 + 2) / 3 at the edge


def test_lr_find_cli_stops_on_divergence_and_leaves_no_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("lr-find", "mlp_fashion_mnist", "--set", "data.source=digits", "--set", "optim.name=sgd",
                 "--set", "train.batch_size=64", "--end-lr", "1000", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    n = len(out["lrs"])
    assert out["stopped"] == "diverged" and n < 100  # plain SGD cannot survive lr 1000
    np.testing.assert_allclose(out["lrs"], np.geomspace(1e-7, 1000, 100)[:n], rtol=1e-5)
    smoothed = np.asarray(out["smoothed"])
    assert smoothed[-1] > lr_find.DIVERGE * smoothed.min()  # the stopping rule, and it was the first such step
    assert not (smoothed[:-1] > lr_find.DIVERGE * np.minimum.accumulate(smoothed)[:-1]).any()
    assert set(out["suggestions"]) == {"steepest", "valley", "minimum"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find_mlp_fashion_mnist.png"]  # no runs/
