"""Orbax checkpoints of a training run, with 'latest' and 'best' pointers that survive a crash.

Each checkpoint is its own directory `checkpoints/step_<N>` (Orbax writes it to a temporary name
and renames it when complete). `checkpoints/index.json` names the latest and the best one (and, with
train.keep_checkpoints = k, the `top` k by validation accuracy) and is replaced atomically after the
checkpoint is complete, so a run killed at any moment leaves a consistent, restorable index;
directories no pointer names are removed afterwards. A run with train.ema stores its EMA weights in
the same checkpoint as the raw ones.

Checkpoints hold host (NumPy) arrays, so a run trained on any number of devices restores on any
other. In a multi-process run the parameters are replicated, so process 0's copy is the whole model:
process 0 alone writes checkpoints and reads them back, and `restore` broadcasts what it read to the
other processes (which need not see the run directory at all).
"""

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnncli.errors import UserError
from cnncli.run import distributed

INDEX = "index.json"
EXTRA = Path("extra") / "metadata"  # a caller's JSON item inside a checkpoint (e.g. a data iterator's position)
TOTALS = ("loss", "correct", "count", "grad_norm")  # the running training sums a checkpoint carries


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _saveable(tree):
    """Typed PRNG keys (dropout RNG state) as raw uint32 data, which Orbax can store."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _like(template, raw):
    """Put restored raw arrays into the structure and key types of `template`."""
    from flax import nnx

    def cast(t, r):
        if _is_key(t):
            return jax.random.wrap_key_data(jnp.asarray(r), impl=jax.random.key_impl(t))
        return jnp.asarray(r, dtype=t.dtype)

    if isinstance(template, nnx.State):
        pure = nnx.to_pure_dict(template)
        merged = jax.tree.map(cast, pure, _as_tree_of(pure, raw))
        state = jax.tree.map(lambda x: x, template)  # a copy to fill in
        nnx.replace_by_pure_dict(state, merged)
        return state
    leaves, treedef = jax.tree.flatten(template)
    raw_leaves = _ordered_leaves(raw)
    if len(raw_leaves) != len(leaves):
        raise UserError(f"the checkpoint holds {len(raw_leaves)} optimizer arrays, this recipe needs {len(leaves)}; "
                        "was the optimizer changed since it was saved?")
    return jax.tree.unflatten(treedef, [cast(t, r) for t, r in zip(leaves, raw_leaves)])


def _as_tree_of(pure: dict, raw: dict) -> dict:
    """`raw` restricted to the keys of `pure`, with a clear error for missing or mis-shaped entries."""
    out = {}
    for key, value in pure.items():
        if key not in raw and str(key) not in raw:
            raise UserError(f"the checkpoint has no entry '{key}': it was saved from another architecture")
        r = raw[key] if key in raw else raw[str(key)]
        if isinstance(value, dict):
            out[key] = _as_tree_of(value, r)
        else:
            if hasattr(value, "shape") and not _is_key(value) and tuple(np.shape(r)) != tuple(value.shape):
                raise UserError(f"checkpoint entry '{key}' has shape {tuple(np.shape(r))}, the model needs "
                                f"{tuple(value.shape)}")
            out[key] = r
    return out


def _ordered_leaves(raw) -> list:
    if isinstance(raw, dict):  # Orbax may restore a list as a dict of '0', '1', ...
        return [raw[k] for k in sorted(raw, key=int)]
    return list(raw)


def save(ckpt_dir: Path, *, state, totals: dict, meta: dict[str, Any], best: bool, keep_top: int | None = None,
         score: float | None = None, extra: Any = None) -> None:
    """Save a checkpoint of `state` and point 'latest' (and 'best' if `best`) at it.

    Args:
        ckpt_dir: the run's checkpoints folder.
        state: a TrainState (its EMA too, when it has one).
        totals: the running training sums (for a mid-epoch resume).
        meta: JSON-ready position of the checkpoint (epoch, step_in_epoch, global_step, ...).
        best: point 'best' at this checkpoint.
        keep_top: keep the `keep_top` checkpoints of highest `score` (listed as 'top' in the index).
        score: validation accuracy of this checkpoint (None for a mid-epoch checkpoint: never in 'top').
        extra: anything JSON-ready to keep with the checkpoint (`read_extra` returns it).
    """
    from flax import nnx

    if not distributed.is_main():  # its replica of the state is process 0's: one writer suffices
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(meta['global_step'])}"
    tree = {"params": _saveable(nnx.to_pure_dict(state.params)), "rest": _saveable(nnx.to_pure_dict(state.rest)),
            "opt_state": _saveable(jax.tree.leaves(state.opt_state)), "step": state.step, "totals": totals}
    if state.ema is not None:
        tree["ema"] = {part: _saveable(nnx.to_pure_dict(state.ema[part])) for part in ("params", "rest")}
    target = ckpt_dir / name
    if not target.exists():
        checkpointer = _checkpointer()
        checkpointer.save(target.absolute(), jax.device_get(tree))
        checkpointer.wait_until_finished()
        checkpointer.close()
        if extra is not None:
            (target / EXTRA).parent.mkdir(exist_ok=True)
            _write_json_atomic(target / EXTRA, extra)
    index = read_index(ckpt_dir) or {}
    index["latest"] = {"dir": name, **meta}
    if best or "best" not in index:
        index["best"] = {"dir": name, **meta}
    if keep_top and score is not None:
        index["top"] = top_k(index.get("top", []), {"dir": name, "score": score, **meta}, keep_top)
    _write_json_atomic(ckpt_dir / INDEX, index)
    kept = {index["latest"]["dir"], index["best"]["dir"], *(entry["dir"] for entry in index.get("top", []))}
    _remove_unreferenced(ckpt_dir, kept)


def top_k(entries: list[dict], new: dict, k: int) -> list[dict]:
    """The k entries of highest 'score' among `entries` and `new`; on ties the earlier one stays."""
    candidates = [e for e in entries if e["dir"] != new["dir"]] + [new]
    return sorted(candidates, key=lambda e: -e["score"])[:k]


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _remove_unreferenced(ckpt_dir: Path, keep: set[str]) -> None:
    for child in ckpt_dir.iterdir():
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)


def read_extra(ckpt: Path) -> Any:
    """What the caller stored with `save(..., extra=...)` in this checkpoint (None if nothing)."""
    try:
        return json.loads((Path(ckpt) / EXTRA).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def read_index(ckpt_dir: Path) -> dict | None:
    path = ckpt_dir / INDEX
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def find(path: Path, which: str = "best") -> tuple[Path, dict]:
    """The checkpoint directory and metadata for a run directory (or its checkpoints folder)."""
    candidates = [path / "checkpoints", path]
    for ckpt_dir in candidates:
        index = read_index(ckpt_dir)
        if index:
            entry = index.get(which) or index["latest"]
            return ckpt_dir / entry["dir"], entry
    if path.is_dir() and (path / "_CHECKPOINT_METADATA").exists():  # a single checkpoint directory
        return path, {}
    raise UserError(f"no checkpoint in {path}: expected a run directory written by `cnncli train` "
                    "(with checkpoints/index.json)")


def restore(ckpt: Path, template_state, *, with_optimizer: bool = True):
    """Restore a checkpoint into the structure of `template_state`; returns (state, totals).

    The EMA weights are restored when the template has an EMA (a UserError if the checkpoint has none).
    """
    if distributed.multiprocess():
        totals = {k: np.zeros((), np.float32) for k in TOTALS}
        return distributed.from_main(lambda: _restore(ckpt, template_state, with_optimizer), (template_state, totals))
    return _restore(ckpt, template_state, with_optimizer)


def _checkpointer():
    """An Orbax checkpointer that, in a multi-process run, involves process 0 only (no cross-process barriers)."""
    import orbax.checkpoint as ocp

    if not distributed.multiprocess():
        return ocp.StandardCheckpointer()
    only_main = ocp.options.MultiprocessingOptions(primary_host=distributed.MAIN, active_processes={distributed.MAIN})
    return ocp.StandardCheckpointer(multiprocessing_options=only_main)


def _read(ckpt: Path) -> dict:
    """The raw tree of a checkpoint as NumPy arrays, whatever devices it was saved from."""
    checkpointer = _checkpointer()
    try:
        # a NumPy target: checkpoints saved from device arrays (older runs) would otherwise ask
        # for the devices they were saved on, and fail on another device count
        layout = checkpointer.metadata(ckpt.absolute()).item_metadata.tree
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), layout)
        return checkpointer.restore(ckpt.absolute(), target)
    finally:
        checkpointer.close()


def _restore(ckpt: Path, template_state, with_optimizer: bool):
    raw = _read(ckpt)
    params = _like(template_state.params, raw["params"])
    rest = _like(template_state.rest, raw["rest"])
    opt_state = _like(template_state.opt_state, raw["opt_state"]) if with_optimizer else template_state.opt_state
    ema = None
    if template_state.ema is not None:
        if "ema" not in raw:
            raise UserError(f"{ckpt} holds no EMA weights: the run was trained without train.ema")
        ema = {part: _like(template_state.ema[part], raw["ema"][part]) for part in ("params", "rest")}
    state = replace(template_state, params=params, rest=rest, opt_state=opt_state,
                    step=jnp.asarray(raw["step"], jnp.int32), ema=ema)
    # Exactly TOTALS, whatever the file holds: every process must broadcast the same tree (older runs lack grad_norm).
    totals = {k: jnp.asarray(raw["totals"].get(k, 0.0), jnp.float32) for k in TOTALS}
    return state, totals
