"""`cnncli benchmark`: the peer's JSON schema, achieved GFLOP/s from the model's FLOP count, the matmul peak."""

import json

import pytest

from cnncli.tools import benchmark as bench
from tests.helpers import cli

PEER_FIELDS = {"impl", "model", "mode", "batch", "img_per_s", "steps", "threads", "device", "dtype"}


@pytest.fixture()
def peak_store(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    return tmp_path / "peak.json"


def test_gflops_are_images_per_second_times_the_modes_forward_passes(peak_store):
    result = json.loads(cli("benchmark", "--model", "lenet5", "--mode", "eval", "--steps", "2", "--warmup", "1",
                            "--json").stdout.strip().splitlines()[-1])
    assert PEER_FIELDS <= set(result)
    # LeNet-5 on 28x28: 416,520 multiply-accumulates per image (conv1 117,600, conv2 240,000, fcs 58,920)
    assert bench.forward_flops(bench.benchmark_recipe("lenet5", 128), (28, 28, 1)) == 2 * 416_520
    assert result["gflops"] == pytest.approx(result["img_per_s"] * 2 * 416_520 / 1e9, rel=1e-3, abs=0.05)
    assert result["peak_gflops"] is None and result["peak_fraction"] is None  # no peak measured here yet


@pytest.mark.slow
def test_peak_is_measured_stored_and_used_for_the_fraction(peak_store):
    out = cli("benchmark", "--model", "lenet5", "--steps", "2", "--warmup", "1", "--peak")
    assert out.exit_code == 0
    peak = next(iter(json.loads(peak_store.read_text()).values()))
    assert 1 < peak < 1e6
    assert "float32 matmul peak" in out.stdout and "of the matmul peak" in out.stdout
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["peak_gflops"] == peak
    # gflops is rounded to 0.1 and the fraction to 0.001: on a busy machine (a low peak) the first rounding shows
    assert result["peak_fraction"] == pytest.approx(result["gflops"] / peak, abs=0.05 / peak + 5e-4)
    assert result["gflops"] == pytest.approx(result["img_per_s"] * 3 * 2 * 416_520 / 1e9, rel=1e-3, abs=0.05)


def test_precision_is_chosen_and_recorded(peak_store):
    def measured(precision):
        out = cli("benchmark", "--model", "lenet5", "--mode", "eval", "--steps", "2", "--warmup", "1",
                  "--precision", precision, "--json")
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert {k: measured("bfloat16")[k] for k in ("dtype", "precision")} == {"dtype": "bfloat16",
                                                                            "precision": "bfloat16"}
    assert {k: measured("auto")[k] for k in ("dtype", "precision")} == {"dtype": "float32", "precision": "auto"}
    out = cli("benchmark", "--precision", "half")
    assert out.exit_code == 2 and "--precision" in out.stderr and "bfloat16" in out.stderr
