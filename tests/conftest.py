"""Shared fixtures: the dataset cache in a temporary folder, and one small LeNet-5 run on real
Fashion-MNIST reused by many tests (helpers that are not fixtures live in tests/helpers.py)."""

import pytest

from tests.helpers import FASHION_DIR, SMALL_LENET, cli


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CNNCLI_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def fashion():
    if not FASHION_DIR.is_dir():
        pytest.fail(f"Fashion-MNIST is missing: run `apt-get install dataset-fashion-mnist` ({FASHION_DIR})")
    return FASHION_DIR


@pytest.fixture(scope="session")
def lenet_run(tmp_path_factory, fashion):
    """A LeNet-5 trained for 2 short epochs on 3,000 Fashion-MNIST images."""
    run_dir = tmp_path_factory.mktemp("runs") / "lenet5"
    result = cli("train", "lenet5_fashion_mnist", "--run-dir", run_dir, *SMALL_LENET)
    assert result.exit_code == 0, result.output
    return run_dir
