"""The same code on several devices: 4 CPU devices give the losses of 1 device (data-parallel mesh)."""

import json

import pytest

from tests.helpers import cli_on_devices, metric_rows

pytestmark = pytest.mark.slow  # two processes that each train

ARGS = ["--set", "data.source=synthetic:16x16x1:4", "--set", "model.name=mlp", "--set", "train.epochs=2",
        "--set", "train.batch_size=64", "--set", "optim.name=momentum", "--set", "optim.lr=0.05"]


def _train(run_dir, *extra: str) -> list:
    return ["train", "lenet5_fashion_mnist", "--run-dir", run_dir, *ARGS, *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process per device count: the 1-device run trained and evaluated; with 4 devices a batch that does
    not divide, the same run trained, and the 1-device run evaluated."""
    root = tmp_path_factory.mktemp("devices")
    train_one, eval_one = cli_on_devices(1, _train(root / "one"), ["eval", root / "one", "--json"])
    bad, train_four, eval_four = cli_on_devices(4, _train(root / "bad", "--set", "train.batch_size=62"),
                                                _train(root / "four"), ["eval", root / "one", "--json"])
    return {"root": root, "train_one": train_one, "eval_one": eval_one, "bad": bad, "train_four": train_four,
            "eval_four": eval_four}


def test_four_devices_match_one(runs):
    one, four = runs["train_one"], runs["train_four"]
    assert one.exit_code == 0, one.stderr
    assert four.exit_code == 0, four.stderr
    a, b = metric_rows(runs["root"] / "one"), metric_rows(runs["root"] / "four")
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert abs(ra[key] - rb[key]) < 1e-4, (key, ra, rb)
    test_a = json.loads((runs["root"] / "one" / "summary.json").read_text())["test"]
    test_b = json.loads((runs["root"] / "four" / "summary.json").read_text())["test"]
    assert test_a["n"] == test_b["n"] == 500


def test_batch_must_divide_over_devices(runs):
    result = runs["bad"]
    assert result.exit_code == 2
    assert "train.batch_size=62 does not divide over 4 devices" in result.stderr


def test_eval_on_four_devices_matches_one(runs):
    results = []
    for out in (runs["eval_one"], runs["eval_four"]):
        assert out.exit_code == 0, out.stderr
        results.append(json.loads(out.stdout))
    assert results[0]["n"] == results[1]["n"] == 500
    assert results[0]["top1"] == results[1]["top1"]
    assert abs(results[0]["loss"] - results[1]["loss"]) < 1e-5
