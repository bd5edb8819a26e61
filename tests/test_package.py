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


@pytest.mark.slow
def test_the_wheel_carries_every_bundled_recipe(installed):
    wheel, _ = installed
    shipped = {name.rpartition("/")[2] for name in zipfile.ZipFile(wheel).namelist() if "/recipes/" in name}
    assert shipped == {p.name for p in (REPO / "cnncli" / "recipes").glob("*.yaml")}
    assert len(shipped) >= 10


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- what gets installed


def _pyproject():
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_dependencies_are_ranges_pinned_by_the_constraints_file():
    project = _pyproject()["project"]
    pins = {_name(line): line.split("==")[1] for line in (REPO / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    for requirement in project["dependencies"]:
        assert "==" not in requirement and "<" in requirement and ">=" in requirement, requirement
        assert _name(requirement) in pins, f"{requirement} has no pin in constraints.txt"
    names = {_name(r) for r in project["dependencies"]}
    # PyTorch is a test reference only, TFDS an extra whose error messages name it
    assert not names & {"torch", "torchmetrics", "tensorflow-datasets", "tensorflow", "pytest"}
    extras = project["optional-dependencies"]
    assert {_name(r) for r in extras["tfds"]} == {"tensorflow-datasets"}
    assert {"torch", "pytest", "cnncli"} <= {_name(r) for r in extras["test"]}
    assert any(r.startswith("jax[cuda") for r in extras["cuda"])


def make(tmp_path, *targets, dry=False):
    return subprocess.run(["make", "-f", str(REPO / "Makefile"), *(["-n"] if dry else []), *targets], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_make_clean_keeps_trained_runs(tmp_path):
    (tmp_path / "runs" / "lenet5").mkdir(parents=True)
    (tmp_path / "runs" / "lenet5" / "recipe.yaml").write_text("name: lenet5\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    assert make(tmp_path, "clean").returncode == 0
    assert (tmp_path / "runs" / "lenet5" / "recipe.yaml").is_file() and not (tmp_path / ".venv").exists()
    assert make(tmp_path, "clean-runs").returncode == 0
    assert not (tmp_path / "runs").exists()


def test_make_demo_installs_no_test_tools(tmp_path):
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copy(REPO / "constraints.txt", tmp_path)
    demo = make(tmp_path, "demo", dry=True).stdout
    installs = [line for line in demo.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert not any("[test]" in line or "torch" in line for line in installs), installs
    test = make(tmp_path, "test", dry=True).stdout
    assert any("'.[test]'" in line for line in test.splitlines() if "pip install" in line)
