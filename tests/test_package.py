"""The installed package, not the checkout: a wheel carries the recipes and works from any directory."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """cnncli built as a wheel from a copy of the source and installed (without dependencies) into a folder."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "cnncli", source / "cnncli", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # offline: the build backend (setuptools) is taken from this environment
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", source], check=True,
                   cwd=root)
    (wheel,) = (root / "dist").glob("cnncli-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", root / "site", wheel], check=True)
    return wheel, root / "site"


def run_installed(site, cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "cnncli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_wheel_carries_every_bundled_recipe(installed):
    wheel, _ = installed
    shipped = {name.rpartition("/")[2] for name in zipfile.ZipFile(wheel).namelist() if "/recipes/" in name}
    assert shipped == {p.name for p in (REPO / "cnncli" / "recipes").glob("*.yaml")}
    assert len(shipped) >= 10


def test_installed_cli_lists_and_trains_recipes_from_any_directory(installed, tmp_path):
    _, site = installed
    check = subprocess.run([sys.executable, "-c", "import cnncli; print(cnncli.__file__)"], cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert check.stdout.startswith(str(site)), check.stdout  # the installed copy, not the checkout
    listing = run_installed(site, tmp_path, "recipes")
    assert listing.returncode == 0
    assert "lenet5_fashion_mnist" in listing.stdout and "mlp_fashion_mnist" in listing.stdout
    # both spellings the README and the recipe headers use, from a directory with no recipes/ in it
    for spelling in ("mlp_fashion_mnist", "recipes/mlp_fashion_mnist.yaml"):
        dry = run_installed(site, tmp_path, "train", spelling, "--data", "digits", "--dry-run")
        assert dry.returncode == 0, dry.stderr
    trained = run_installed(site, tmp_path, "train", "recipes/mlp_fashion_mnist.yaml", "--data", "digits",
                            "--epochs", "1", "--run-dir", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test"]["top1"] > 0.5  # one epoch of an MLP on the 8x8 digits learns
