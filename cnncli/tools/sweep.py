"""Sweeps: every point of a hyperparameter grid trained as a normal run, one after the other, resumably.

    cnncli sweep lenet5_fashion_mnist --grid optim.name=sgd,adam --grid optim.lr=0.1,0.01 --epochs 5
      runs/sweep_lenet5_fashion_mnist/
        optim-sgd__lr-0.1/ ...   one ordinary run directory per point (eval, resume, ... work on it)
        sweep.json              the results, sorted by best validation accuracy
        sweep.png               validation (solid) and training (dashed) curves of all points

A point whose run has a summary.json is finished and skipped; one with a checkpoint is resumed
exactly; so an interrupted sweep continues with the same command. When the grid varies optim.name
but not optim.lr, each optimizer gets its own suggested learning rate (`optim.SUGGESTED_LR`).
"""

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnncli import recipe as recipe_lib
from cnncli.data.pipeline import load_splits
from cnncli.errors import UserError
from cnncli.run.rundir import DEFAULT_ROOT, RunDir, RunLock
from cnncli.train.loop import check_recipe, start_run, train
from cnncli.train.optim import SUGGESTED_LR

RESULTS_JSON = "sweep.json"
CURVES_PNG = "sweep.png"
NOT_COMPARED = {"name", "description", "finetune.source"}  # differ between any two runs, say nothing
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]")  # characters kept out of point directory names


@dataclass(frozen=True)
class Point:
    """One grid point: its run directory name and its `--set` assignments."""

    name: str
    assignments: tuple[str, ...]


def split_values(text: str) -> list[str]:
    """Split 'a,b,[1,2]' on the commas outside brackets and braces: ['a', 'b', '[1,2]']."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """'optim.name=sgd,adam' -> ('optim.name', ['sgd', 'adam'])."""
    key, sep, text = spec.partition("=")
    values = split_values(text) if sep else []
    if not key.strip() or not values or "" in values:
        raise UserError(f"--grid expects KEY=VALUE1,VALUE2,... (e.g. optim.name=sgd,adam), got '{spec}'")
    if len(set(values)) != len(values):
        raise UserError(f"--grid {key.strip()}: a value is listed twice")
    return key.strip(), values


def grid_points(grids: Sequence[tuple[str, list[str]]], overrides: Sequence[str] = ()) -> list[Point]:
    """The cartesian product of the grids, in the order given.

    Args:
        grids: (dotted key, values) per --grid.
        overrides: the user's --set assignments (an explicit optim.lr turns off the suggested rates).

    Returns:
        The points; when optim.name varies and optim.lr is neither in the grid nor set, each point also
        sets optim.lr to the optimizer's suggested rate.
    """

    keys = [key for key, _ in grids]
    if len(set(keys)) != len(keys):
        raise UserError("--grid: each key may appear in one --grid only")
    set_keys = {o.partition("=")[0].strip() for o in overrides}
    suggest_lr = "optim.name" in keys and "optim.lr" not in keys and "optim.lr" not in set_keys
    labels = _short_labels(keys)
    points = []
    for values in itertools.product(*(values for _, values in grids)):
        assignments = [f"{key}={value}" for key, value in zip(keys, values)]
        optimizer = dict(zip(keys, values)).get("optim.name")
        if suggest_lr and optimizer in SUGGESTED_LR:
            assignments.append(f"optim.lr={SUGGESTED_LR[optimizer]}")
        name = "__".join(f"{label}-{_UNSAFE.sub('_', value)}" for label, value in zip(labels, values))
        points.append(Point(name, tuple(assignments)))
    return points


def _short_labels(keys: list[str]) -> list[str]:
    """The last part of each dotted key ('optim' for optim.name), or the whole key where those collide."""
    last = [key.split(".")[-2] if key.endswith(".name") and "." in key else key.split(".")[-1] for key in keys]
    return [short if last.count(short) == 1 else key for key, short in zip(keys, last)]


def default_out(recipe_name: str) -> Path:
    return DEFAULT_ROOT / f"sweep_{recipe_name}"


def run_sweep(recipe_ref: str, points: Sequence[Point], overrides: Sequence[str], out: Path, *,
              on_point: Callable[[int, Point, str], None] = lambda i, p, status: None,
              display_factory: Callable[[], Any] = lambda: None) -> list[dict[str, Any]]:
    """Train every point that is not finished yet, then return all points' results (best first).

    Args:
        recipe_ref: recipe file or bundled recipe name.
        points: from `grid_points`.
        overrides: --set assignments for every point (applied before the point's own).
        out: the sweep directory.
        on_point: called before each point with (index, point, 'done' | 'resume' | 'start').
        display_factory: a new training display per point (None: silent).

    Raises:
        UserError: a point's directory holds a run of a different recipe.
        Interrupted: Ctrl-C during a point (its checkpoint is saved; the same command continues).
    """

    with RunLock(out, "cnncli sweep"):  # one sweep at a time writes its points
        return _run_points(recipe_ref, points, overrides, out, on_point, display_factory)


def _run_points(recipe_ref, points, overrides, out: Path, on_point, display_factory) -> list[dict[str, Any]]:
    data_cache: dict[str, Any] = {}
    for i, point in enumerate(points):
        recipe = recipe_lib.load(recipe_ref, [*overrides, *point.assignments])
        check_recipe(recipe)
        run = RunDir(out / point.name)
        status = _status(run, recipe)
        on_point(i, point, status)
        if status == "done":
            continue
        data_key = recipe.data.model_dump_json() + f"/seed={recipe.seed}"
        if data_key not in data_cache:  # points that differ only in training settings share the data
            data_cache[data_key] = load_splits(recipe.data, recipe.seed)
        splits = data_cache[data_key]
        if status == "start":
            start_run(recipe, splits, run)
        train(recipe, splits, run, resume=status == "resume", display=display_factory())
    results = ranked([run_result(RunDir(out / p.name), p.name) for p in points])
    RunDir(out).write_json(out / RESULTS_JSON, [{k: v for k, v in r.items() if k != "rows"} for r in results])
    return results


def _status(run: RunDir, recipe) -> str:
    """'done' (finished), 'resume' (started with this recipe) or 'start' (nothing there yet).

    A summary of a run stopped by Ctrl-C (written with early_stopping.restore_best) is not the end of it.
    """

    if not run.recipe.is_file():
        return "start"
    if recipe_lib.load(run.recipe).model_dump() != recipe.model_dump():
        raise UserError(f"{run.path} holds a run of a different recipe (were --epochs or --set changed?); "
                        "use another --run-dir, or delete that directory")
    finished = run.summary.is_file() and run.read_json(run.summary).get("stopped") != "user"
    return "done" if finished else "resume"


def run_labels(paths: list[Path]) -> list[str]:
    """The shortest trailing part of each path that tells the runs apart (a/lenet5, b/lenet5)."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max(map(len, parts), default=1) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]  # the same directory twice


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def differing_keys(results: list[dict[str, Any]]) -> list[str]:
    """The recipe keys whose values differ between the runs (their names aside), in recipe order."""
    flats = [_flat(r["recipe"]) for r in results if r.get("recipe")]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [k for k in keys if k not in NOT_COMPARED and len({repr(f.get(k)) for f in flats}) > 1]


def run_result(run: RunDir, label: str) -> dict[str, Any]:
    """One row of a sweep or comparison table from a run directory (finished or not)."""

    rows = run.read_metrics()
    summary = run.read_json(run.summary) if run.summary.is_file() else {}
    vals = [r.get("val_acc") for r in rows]
    best = max(range(len(vals)), key=lambda i: vals[i], default=None) if vals and None not in vals else None
    recipe = recipe_lib.load(run.recipe) if run.recipe.is_file() else None
    lr = recipe.optim.lr if recipe else None
    return {"run": label, "path": str(run.path), "recipe": recipe.model_dump(mode="json") if recipe else None,
            "lr": lr, "epochs": len(rows),
            "best_val_acc": None if best is None else vals[best], "best_epoch": None if best is None else best + 1,
            "final_train_acc": rows[-1]["train_acc"] if rows else None,
            "test_acc": summary.get("test", {}).get("top1"),
            "train_seconds": round(sum(r.get("seconds", 0.0) for r in rows), 1),
            "finished": bool(summary) and summary.get("stopped") != "user", "rows": rows}


def ranked(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results sorted by best validation accuracy, highest first (runs without validation last)."""
    return sorted(results, key=lambda r: -(r["best_val_acc"] if r["best_val_acc"] is not None else -1.0))
