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


def pytest_collection_modifyitems(items):
    """The fast tier (`make test-fast`, `-m "not slow"`) runs each parametrized test on its first case not
    marked `slow`; its other cases are `slow` too, so `make test` still runs every case."""
    seen = set()
    for item in items:
        if not hasattr(item, "callspec") or item.get_closest_marker("slow"):
            continue
        test = (item.path, item.cls, item.originalname)
        if test in seen:
            item.add_marker(pytest.mark.slow)
        seen.add(test)
