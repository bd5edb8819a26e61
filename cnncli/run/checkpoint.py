"""Checkpoints of a run: Orbax's CheckpointManager writes and prunes them, a checksum list vouches for them.

    checkpoints/
      step_<N>/          one checkpoint (Orbax writes it under a temporary name and renames it when complete)
        state/           the TrainState as a pytree: params, rest, opt_state, step, training sums, EMA
        meta/            JSON: the position (epoch, step_in_epoch, global_step, best), the best checkpoint's
                         name, the validation score, and copies of recipe.yaml and data.json
        extra/           JSON a caller carries along (optional: e.g. a data iterator's position)
        metrics/         JSON: the score Orbax ranks checkpoints by (epoch ends, with train.keep_checkpoints)
        SHA256SUMS       the sha256 of every file above; `sha256sum -c SHA256SUMS` checks them by hand
      index.json         latest, best and top: a cache of what the step directories say

What holds, and how:
- A checkpoint has its final name only when complete and durable: just before Orbax's rename, every
  file is fsynced and listed in SHA256SUMS (`_DurableRename`), and the rename is fsynced too. A kill
  or a power loss leaves the whole checkpoint or none of it.
- Orbax's preservation policy keeps the latest checkpoint, the one the loop called best, and the top
  k by validation score; it removes the others only after the new checkpoint is durable.
- Every restore checks the checksums first. A damaged checkpoint, or one that a running training
  pruned while it was being read, gives way to the newest intact one, with a message; when none is
  intact, the message names the damaged files.
- index.json is replaced atomically (temporary file, fsync, rename); when unreadable it is rebuilt
  from the step directories.
- A signal that arrives while a checkpoint is written waits until the write is complete.
- Runs saved before this layout (one StandardCheckpointer tree with the optimizer state as a list of
  leaves) still restore; their checkpoints carry no checksums.

Checkpoints hold host (NumPy) arrays, so a run trained on any number of devices restores on any other. In
a multi-process run the parameters are replicated, so process 0's copy is the whole model: process 0
alone writes checkpoints and reads them back, and `restore` broadcasts what it read to the other
processes (which need not see the run directory at all).
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnncli import interrupts
from cnncli.errors import UserError, is_disk_full, os_fault
from cnncli.run import distributed
from cnncli.run.rundir import fsync_dir, write_atomic

INDEX = "index.json"
SUMS = "SHA256SUMS"
FORMAT = 2  # index.json's "format"; the layout before it (format 1) had no such key
PREFIX = "step"
STEP_DIR = re.compile(rf"^{PREFIX}_(\d+)$")
ITEMS = ("state", "meta", "extra")
WHICH = ("best", "latest")
TOTALS = ("loss", "correct", "count", "grad_norm")  # the running training sums a checkpoint carries
RUN_FILES = ("recipe.yaml", "data.json")  # copied into every checkpoint, so that a run survives losing them
# Orbax rewrites these two top-level files while it renames the directory; no restore reads them
UNSUMMED = ("_CHECKPOINT_METADATA", "commit_success.txt")
CHUNK = 1 << 20


class NotFinite(UserError):
    """The state to checkpoint holds NaN or infinite values; it is not saved."""


class Vanished(UserError):
    """A checkpoint disappeared while it was read (a running training pruned it)."""


def _say(text: str) -> None:
    if distributed.is_main():
        from cnncli.console import err_console

        err_console.print(text, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- checksums and durability


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    """Every file below `root` as a relative POSIX path, sorted, without Orbax's two commit-time files."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in UNSUMMED and rel != SUMS:
                out.append(rel)
    return sorted(out)


def _seal(tmp: Path) -> None:
    """fsync every file of a finished (still temporary) checkpoint and list their checksums in SHA256SUMS."""
    lines = [f"{_sha256(tmp / rel, fsync=True)}  {rel}\n" for rel in _files(tmp)]
    with open(tmp / SUMS, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    for dirpath, _, _ in os.walk(tmp, topdown=False):
        fsync_dir(Path(dirpath))


def _fsync_renamed(final: Path) -> None:
    """Make the rename and Orbax's commit-time files durable."""
    for name in UNSUMMED:
        if (final / name).is_file():
            fd = os.open(final / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(final)
    fsync_dir(final.parent)


def _durable_rename():
    """Orbax's atomic-rename protocol, with `_seal` before the rename of a step directory."""
    from orbax.checkpoint.path import atomicity

    class DurableRename(atomicity.AtomicRenameTemporaryPath):
        async def finalize(self):
            final = Path(self.get_final())
            if STEP_DIR.match(final.name) is None:  # an item inside the step: sealed with the step
                return await super().finalize()
            await asyncio.to_thread(_seal, Path(self.get()))
            await super().finalize()
            await asyncio.to_thread(_fsync_renamed, final)

    return DurableRename


def damage(step_dir: Path) -> str | None:
    """What is wrong with a checkpoint directory (a missing, changed or unlisted file), or None if intact.

    Runs saved before checksums existed are taken as they are.
    """
    if _is_legacy(step_dir):
        return None
    try:
        listing = (step_dir / SUMS).read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"{SUMS} is missing" if step_dir.is_dir() else "the directory is missing"
    except (OSError, UnicodeDecodeError) as e:
        return f"{SUMS} is unreadable ({e})"
    listed = {}
    for line in listing.splitlines():
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            return f"{SUMS} is damaged"
        listed[rel] = digest
    for rel, digest in listed.items():
        try:
            actual = _sha256(step_dir / rel)
        except FileNotFoundError:
            return f"{rel} is missing"
        except OSError as e:
            return f"{rel} is unreadable ({e.strerror})"
        if actual != digest:
            return f"{rel} does not match its checksum"
    unlisted = sorted(set(_files(step_dir)) - set(listed))
    if unlisted:
        return f"{unlisted[0]} is not listed in {SUMS}"
    return None


def _is_legacy(step_dir: Path) -> bool:
    """A checkpoint of the layout before format 2: one pytree at the top of the step directory."""
    return (step_dir / "_METADATA").is_file() and not (step_dir / "state").exists()


# ----------------------------------------------------------------------------- the index


def _steps(ckpt_dir: Path) -> dict[int, str]:
    """The step directories present: {global step: directory name}."""
    try:
        names = [p.name for p in ckpt_dir.iterdir() if p.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return dict(sorted((int(m.group(1)), m.group(0)) for m in map(STEP_DIR.match, names) if m))


def _read_meta(step_dir: Path) -> dict | None:
    """The meta document of a format-2 checkpoint ({} for a legacy one; None when unreadable)."""
    if _is_legacy(step_dir):
        step = STEP_DIR.match(step_dir.name)
        return {"global_step": int(step.group(1))} if step else {}
    try:
        doc = json.loads((step_dir / "meta" / "metadata").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _position(doc: dict) -> dict:
    """The position part of a meta document: what index entries carry."""
    return {k: v for k, v in doc.items() if k not in ("best_dir", "score", "keep_top", "files")}


def _entry(name: str, doc: dict) -> dict:
    entry = {"dir": name, **_position(doc)}
    if doc.get("score") is not None:
        entry["score"] = doc["score"]
    return entry


def _rank(score: float, step: int) -> tuple[float, int]:
    """The order of the top-k checkpoints: higher score first; on ties the earlier checkpoint."""
    return (score, -step)


def _top(entries: list[dict], k: int) -> list[dict]:
    return sorted(entries, key=lambda e: _rank(e["score"], e["global_step"]), reverse=True)[:k]


def _rebuild(ckpt_dir: Path, steps: dict[int, str]) -> dict | None:
    """The index as the step directories say it (None when none of them is readable)."""
    docs = {name: doc for name in steps.values() if (doc := _read_meta(ckpt_dir / name)) is not None}
    if not docs:
        return None
    latest = max(docs, key=lambda name: int(STEP_DIR.match(name).group(1)))
    best = docs[latest].get("best_dir")
    index = {"format": FORMAT, "latest": _entry(latest, docs[latest]),
             "best": _entry(best, docs[best]) if best in docs else _entry(latest, docs[latest])}
    keep_top = docs[latest].get("keep_top")
    if keep_top:
        scored = [_entry(name, doc) for name, doc in docs.items() if doc.get("score") is not None]
        index["top"] = _top(scored, keep_top)
    return index


def read_index(ckpt_dir: Path, *, quiet: bool = False) -> dict | None:
    """The run's index: latest, best (and top) entries; None when the run has no checkpoint.

    An unreadable index.json (truncated, empty, deleted) is rebuilt from the step directories, with a
    message unless `quiet`.
    """
    path = ckpt_dir / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(index, dict) and isinstance(index.get("latest"), dict) and "dir" in index["latest"]:
            return index
        problem = "does not name a latest checkpoint"
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"is unreadable ({type(e).__name__})"
    steps = _steps(ckpt_dir)
    index = _rebuild(ckpt_dir, steps) if steps else None
    if index is not None and not quiet:
        _say(f"{path} {problem}: rebuilt from the step directories (latest {index['latest']['dir']}, "
             f"best {index['best']['dir']})")
    return index


def checkpoints_dir(path: Path) -> Path | None:
    """The checkpoints folder of a run directory (or the folder itself)."""
    for candidate in (path / "checkpoints", path):
        if (candidate / INDEX).is_file() or _steps(candidate):
            return candidate
    return None


def describe(entry: dict) -> str:
    """'step_84 (epoch 3)' or 'step_60 (epoch 3, step 4)' for messages."""
    epoch, step = entry.get("epoch"), entry.get("step_in_epoch")
    if epoch is None:
        return entry["dir"]
    return f"{entry['dir']} (epoch {epoch}{f', step {step}' if step else ''})"


# ----------------------------------------------------------------------------- finding a checkpoint


def find(path: Path, which: str = "best") -> tuple[Path, dict]:
    """The intact checkpoint `which` (best or latest) of a run directory (or its checkpoints folder),
    and its position.

    A damaged or missing `which` gives way to the newest intact checkpoint, with a message. A
    UserError names the damaged files when no checkpoint is intact.
    """
    if which not in WHICH:
        raise UserError(f"--checkpoint must be {' or '.join(WHICH)}, got '{which}' (to read another checkpoint, "
                        "give its directory, e.g. RUN/checkpoints/step_N)")
    path = Path(path)
    ckpt_dir = checkpoints_dir(path)
    if ckpt_dir is None:
        if path.is_dir() and STEP_DIR.match(path.name) and _read_meta(path) is not None:
            check_intact(path)  # a single checkpoint directory
            return path, _position(_read_meta(path) or {})
        raise no_checkpoint(path)
    for _ in range(3):  # a running training may prune the checkpoint the index named: read again
        index = read_index(ckpt_dir)
        if index is None:
            break
        wanted = index.get(which) or index["latest"]
        present = _steps(ckpt_dir)
        if wanted["dir"] not in present.values() and index is not None and _moved_on(ckpt_dir, index):
            continue
        named = {e["dir"]: e for e in (index["latest"], index["best"], *index.get("top", []))}
        order = [wanted["dir"]] + [name for _, name in sorted(present.items(), reverse=True) if name != wanted["dir"]]
        problems = []
        for name in order:
            problem = damage(ckpt_dir / name) if name in present.values() else "the directory is missing"
            if problem is None:
                entry = named.get(name) or _entry(name, _read_meta(ckpt_dir / name) or {})
                if problems:
                    _say(f"checkpoint {which} ({problems[0]}); using the newest intact one, {describe(entry)}")
                return ckpt_dir / name, {k: v for k, v in entry.items() if k not in ("dir", "score")}
            problems.append(f"{name}: {problem}")
        raise UserError(f"no intact checkpoint in {ckpt_dir}: {'; '.join(problems)}")
    raise no_checkpoint(path)


def no_checkpoint(path: Path) -> UserError:
    return UserError(f"no checkpoint in {path}: expected a run directory written by `cnncli train` "
                     "(with checkpoints/index.json)")


def _moved_on(ckpt_dir: Path, index: dict) -> bool:
    """Whether a writer replaced the index since it was read (its latest has changed)."""
    again = read_index(ckpt_dir, quiet=True)
    return again is not None and again["latest"]["dir"] != index["latest"]["dir"]


def check_intact(step_dir: Path) -> None:
    """A UserError naming what is damaged in one checkpoint the user named explicitly."""
    problem = damage(step_dir)
    if problem is not None:
        raise UserError(f"checkpoint {step_dir} is damaged: {problem}; use the run directory instead, to fall "
                        "back to its newest intact checkpoint")


def run_file(ckpt_dir: Path, name: str) -> str | None:
    """The copy of a run file (recipe.yaml, data.json) kept in the newest readable checkpoint."""
    for _, step in sorted(_steps(ckpt_dir).items(), reverse=True):
        doc = _read_meta(ckpt_dir / step)
        if doc and isinstance(doc.get("files"), dict) and isinstance(doc["files"].get(name), str):
            return doc["files"][name]
    return None


def read_run_file(run_path: Path, name: str, parse: Callable[[str], Any], *, repair: bool = False) -> Any:
    """parse(text of a run file) (recipe.yaml, data.json). When the file is missing or does not parse: the
    copy kept in the newest readable checkpoint, with a message, written back in place with `repair`."""
    path = Path(run_path) / name
    try:
        return parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, UnicodeDecodeError) as e:
        problem = f"is unreadable ({e})"
    except (UserError, ValueError) as e:
        problem = f"is damaged ({e})"
    copy = run_file(Path(run_path) / "checkpoints", name)
    if copy is None:
        raise UserError(f"{path} {problem}, and no checkpoint of the run keeps a copy of it")
    value = parse(copy)
    if repair:
        write_atomic(path, copy)
    _say(f"{path} {problem}: {'restored from' if repair else 'using'} the copy kept in the run's checkpoints")
    return value


def read_extra(ckpt: Path) -> Any:
    """What the caller stored with `save(..., extra=...)` in this checkpoint (None if nothing)."""
    try:
        return json.loads((Path(ckpt) / "extra" / "metadata").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------- saving


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _saveable(tree):
    """Typed PRNG keys (dropout RNG state) as raw uint32 data, which Orbax can store."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


class _Named:
    """An Orbax preservation policy keeping the named step directories (the loop's best checkpoint)."""

    def __init__(self, names: set[str]):
        self.names = names

    def should_preserve(self, checkpoints, *, context):
        return [f"{PREFIX}_{c.step}" in self.names for c in checkpoints]


def _manager(ckpt_dir: Path, keep_top: int | None, keep: set[str]):
    """Orbax's CheckpointManager for a run's checkpoints folder: synchronous, durable renames, and a
    preservation policy of the latest checkpoint, the `keep` ones and the `keep_top` best scores."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    def rank(metrics):
        return _rank(metrics["score"], metrics["step"])

    kept = [policies.LatestN(1), _Named(keep)]
    if keep_top:
        kept.append(policies.BestN(get_metric_fn=rank, n=keep_top, keep_checkpoints_without_metrics=False))
    extra = {}
    if distributed.multiprocess():
        extra["multiprocessing_options"] = _only_main()
    options = ocp.CheckpointManagerOptions(
        # best_fn only makes Orbax store the metrics it ranks by; the preservation policy decides what stays
        step_prefix=PREFIX, preservation_policy=policies.AnyPreservationPolicy(kept), best_fn=rank, create=False,
        enable_async_checkpointing=False, save_root_metadata=False, temporary_path_class=_durable_rename(),
        cleanup_tmp_directories=True,  # what a killed write left
        **extra)
    ckpt_dir.mkdir(parents=True, exist_ok=True)  # Orbax creates it only without active_processes (one process)
    with _quiet_orbax():
        return ocp.CheckpointManager(ckpt_dir.absolute(), options=options, item_names=ITEMS)


def _only_main():
    """Orbax's options for a multi-process run in which process 0 alone reads and writes: no barriers with
    the other processes, which wait elsewhere (in `distributed.from_main`)."""
    import orbax.checkpoint as ocp

    return ocp.options.MultiprocessingOptions(primary_host=distributed.MAIN, active_processes={distributed.MAIN})


def _reader(standard: bool = False):
    """An Orbax checkpointer for reading (on process 0 alone in a multi-process run)."""
    import orbax.checkpoint as ocp

    if not distributed.multiprocess():
        return ocp.StandardCheckpointer() if standard else ocp.PyTreeCheckpointer()
    if standard:
        return ocp.StandardCheckpointer(multiprocessing_options=_only_main())
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=_only_main()),
                            multiprocessing_options=_only_main())


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs routine notes (missing optional metadata files) as absl warnings on stderr, and its
    threads' failures with their tracebacks; the failures reach us as exceptions, which say it in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _signals_held(what: str):
    """Hold Ctrl-C, SIGTERM and SIGHUP while a checkpoint is written, then deliver them (once each), unless
    the run is already stopping.

    A signal in the middle of Orbax's write would leave its threads half-way ("cannot schedule new
    futures after shutdown"); the write takes seconds at most, then the usual handler acts.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum, frame):
        if not caught:
            os.write(2, f"\nfinishing the checkpoint of {what} first...\n".encode())
        caught.append(signum)

    previous = {s: signal.signal(s, hold) for s in interrupts.SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if interrupts.requested() is None:  # else the run is stopping already: a second signal only waited
            for s in dict.fromkeys(caught):
                signal.raise_signal(s)


def _check_finite(tree: dict, name: str, ckpt_dir: Path, index: dict | None) -> None:
    """A NaN step must never become a checkpoint (and so never `latest`)."""
    loss = float(np.asarray(tree["totals"]["loss"]))
    weights_ok = all(np.isfinite(x).all() for x in jax.tree.leaves(tree["params"])
                     if np.issubdtype(np.asarray(x).dtype, np.floating))
    if math.isfinite(loss) and weights_ok:
        return
    what = f"the training loss is {loss}" if not math.isfinite(loss) else "the weights hold NaN or infinite values"
    kept = (f"the last finite checkpoint, {describe(index['latest'])}, is kept in {ckpt_dir}" if index
            else "no checkpoint was written yet")
    raise NotFinite(f"{what} at {name}, which is therefore not saved; {kept}. Lower optim.lr or set optim.clip_norm.")


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

    Raises:
        NotFinite: the loss or the weights are not finite (nothing is written).
        UserError: the disk is full or not writable; the previous checkpoints are intact.
    """
    from flax import nnx

    if not distributed.is_main():  # its replica of the state is process 0's: one writer suffices
        return
    step = int(meta["global_step"])
    name = f"{PREFIX}_{step}"
    tree = {"params": nnx.to_pure_dict(state.params), "rest": nnx.to_pure_dict(state.rest),
            "opt_state": state.opt_state, "step": state.step, "totals": totals}
    if state.ema is not None:
        tree["ema"] = {part: nnx.to_pure_dict(state.ema[part]) for part in ("params", "rest")}
    tree = jax.device_get(_saveable(tree))
    index = read_index(ckpt_dir, quiet=True) if ckpt_dir.is_dir() else None
    _check_finite(tree, name, ckpt_dir, index)
    best_dir = name if best or index is None else index["best"]["dir"]
    doc = {**meta, "best_dir": best_dir, "score": score, "keep_top": keep_top, "files": _run_files(ckpt_dir.parent)}
    with _signals_held(name), _storage_faults(ckpt_dir, name, index), _quiet_orbax():
        manager = _manager(ckpt_dir, keep_top, {best_dir})
        try:
            present = set(manager.all_steps())
            if step in present and damage(ckpt_dir / name) is not None:
                manager.delete(step)  # a damaged copy of this very step: write it again
                present.discard(step)
            # later steps can only come from before a resume that fell back past them (one writer holds
            # the run): the resumed run writes them anew, and Orbax saves no step below its latest
            for later in sorted(s for s in present if s > step):
                manager.delete(later)
                present.discard(later)
                _say(f"removed {PREFIX}_{later}: it came from before the resume")
            if step not in present:  # the same step saved twice (a resume stopped at once) holds the same state
                import orbax.checkpoint as ocp

                items = {"state": ocp.args.StandardSave(tree), "meta": ocp.args.JsonSave(doc)}
                if extra is not None:
                    items["extra"] = ocp.args.JsonSave(extra)
                metrics = {"score": score, "step": step} if keep_top and score is not None else None
                manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)
            kept = {f"{PREFIX}_{s}" for s in manager.all_steps()}
        finally:
            manager.close()
        _write_index(ckpt_dir, index, name, doc, best_dir, keep_top, score, kept)


def _write_index(ckpt_dir: Path, index: dict | None, name: str, doc: dict, best_dir: str, keep_top: int | None,
                 score: float | None, kept: set[str]) -> None:
    new = _entry(name, doc)
    new.pop("score", None)
    out = {"format": FORMAT, "latest": new,
           "best": new if best_dir == name else (index or {}).get("best", new)}
    top = [e for e in (index or {}).get("top", []) if e["dir"] in kept and e["dir"] != name]
    if keep_top and score is not None:
        top.append({**new, "score": score})
    if keep_top:
        out["top"] = _top(top, keep_top)
    write_atomic(ckpt_dir / INDEX, json.dumps(out, indent=1))


def _run_files(run_path: Path) -> dict[str, str]:
    files = {}
    for name in RUN_FILES:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            files[name] = (run_path / name).read_text(encoding="utf-8")
    return files


@contextlib.contextmanager
def _storage_faults(ckpt_dir: Path, name: str, index: dict | None):
    """A full disk, a read-only file system or a lost permission while saving: one line saying what is
    intact, and no half-written temporary directory left behind."""
    try:
        yield
    except Exception as e:
        fault = os_fault(e, f"cannot write checkpoint {name} in {ckpt_dir}")
        if fault is None and not is_disk_full(e):
            raise
        for tmp in ckpt_dir.glob(f"{name}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        intact = (f"the checkpoint {describe(index['latest'])} is intact" if index
                  else "no earlier checkpoint exists")
        reason = "disk full writing" if is_disk_full(e) else str(fault).removeprefix("cannot write ")
        if is_disk_full(e):
            raise UserError(f"{reason} {name} in {ckpt_dir}; {intact}; free space, then continue with --resume") \
                from None
        raise UserError(f"cannot write {reason}; {intact}") from None


# ----------------------------------------------------------------------------- restoring


def restore(ckpt: Path, template_state, *, with_optimizer: bool = True):
    """Restore a checkpoint into the structure of `template_state`; returns (state, totals).

    The EMA weights are restored when the template has an EMA (a UserError if the checkpoint has none).
    """
    if distributed.multiprocess():
        totals = {k: np.zeros((), np.float32) for k in TOTALS}
        return distributed.from_main(lambda: _restore(ckpt, template_state, with_optimizer), (template_state, totals))
    return _restore(ckpt, template_state, with_optimizer)


def _target(template_state, with_optimizer: bool, stored_totals=TOTALS) -> dict:
    """The part of a TrainState to read, as a tree of the template's nnx states and optax states (of the
    totals, those the checkpoint holds: older ones lack grad_norm)."""
    from flax import nnx

    tree = {"params": nnx.to_pure_dict(template_state.params), "rest": nnx.to_pure_dict(template_state.rest)}
    if with_optimizer:
        tree.update(opt_state=template_state.opt_state, step=template_state.step,
                    totals={k: jnp.zeros((), jnp.float32) for k in TOTALS if k in stored_totals})
    if template_state.ema is not None:
        tree["ema"] = {part: nnx.to_pure_dict(template_state.ema[part]) for part in ("params", "rest")}
    return tree


def _check_layout(ckpt: Path, stored: dict, abstract: dict) -> None:
    """A UserError when the checkpoint does not hold what the target needs (names and shapes)."""
    import orbax.checkpoint as ocp

    have = ocp.tree.to_flat_dict(stored)
    need = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True))
    missing = [key for key in need if key not in have and hasattr(need[key], "shape")]
    if missing:
        where = ".".join(map(str, missing[0]))
        if missing[0][0] == "opt_state":
            raise UserError(f"{ckpt}: the optimizer state saved there ({len(missing)} entries missing, e.g. '{where}') "
                            "does not fit this recipe's optimizer: was `optim` changed since it was saved?")
        if missing[0][0] == "ema":
            raise UserError(f"{ckpt} holds no EMA weights: the run was trained without train.ema")
        raise UserError(f"the checkpoint {ckpt} has no entry '{where}' ({len(missing)} missing): it was saved from "
                        "another architecture")
    for key, spec in need.items():
        if hasattr(spec, "shape") and tuple(have[key].shape) != tuple(spec.shape):
            raise UserError(f"checkpoint entry '{'.'.join(map(str, key))}' has shape {tuple(have[key].shape)}, the "
                            f"model needs {tuple(spec.shape)}")


def _restore(ckpt: Path, template_state, with_optimizer: bool):
    if _is_legacy(ckpt):
        return _restore_legacy(ckpt, template_state, with_optimizer)
    import orbax.checkpoint as ocp

    checkpointer = _reader()
    try:
        with _quiet_orbax():
            stored = checkpointer.metadata((ckpt / "state").absolute()).item_metadata.tree
            target = _target(template_state, with_optimizer, stored.get("totals") or ())
            abstract = jax.eval_shape(_saveable, target)
            _check_layout(ckpt, stored, abstract)
            raw = checkpointer.restore((ckpt / "state").absolute(), args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True))
    except UserError:
        raise
    except Exception:
        if not (ckpt / "state").is_dir():
            raise Vanished(f"checkpoint {ckpt} was removed while it was read (the run is still training): "
                           "run the command again") from None
        raise
    finally:
        checkpointer.close()
    return _assemble(template_state, target, raw, with_optimizer)


def _cast(template, raw):
    if _is_key(template):
        return jax.random.wrap_key_data(jnp.asarray(raw), impl=jax.random.key_impl(template))
    return jnp.asarray(raw, dtype=template.dtype)


def _filled(template_nnx_state, pure: dict, raw: dict):
    """A copy of an nnx.State with the restored values of its pure-dict form."""
    from flax import nnx

    state = jax.tree.map(lambda x: x, template_nnx_state)
    nnx.replace_by_pure_dict(state, jax.tree.map(_cast, pure, raw))
    return state


def _assemble(template_state, target: dict, raw: dict, with_optimizer: bool):
    params = _filled(template_state.params, target["params"], raw["params"])
    rest = _filled(template_state.rest, target["rest"], raw["rest"])
    ema = None
    if template_state.ema is not None:
        ema = {part: _filled(template_state.ema[part], target["ema"][part], raw["ema"][part])
               for part in ("params", "rest")}
    if not with_optimizer:
        state = replace(template_state, params=params, rest=rest, ema=ema)
        return state, {k: jnp.zeros((), jnp.float32) for k in TOTALS}
    opt_state = jax.tree.map(_cast, template_state.opt_state, raw["opt_state"])
    state = replace(template_state, params=params, rest=rest, opt_state=opt_state,
                    step=jnp.asarray(raw["step"], jnp.int32), ema=ema)
    return state, _totals(raw["totals"])


def _totals(stored: dict) -> dict:
    """Exactly TOTALS, whatever the file holds: every process must broadcast the same tree (older runs lack
    grad_norm)."""
    return {k: jnp.asarray(stored.get(k, 0.0), jnp.float32) for k in TOTALS}


# ----------------------------------------------------------------------------- the layout before format 2


def _restore_legacy(ckpt: Path, template_state, with_optimizer: bool):
    """A checkpoint of the first layout: the whole tree at the top of the step directory, the optimizer
    state as a list of its leaves (matched by position, so only their count and shapes can be checked)."""
    from flax import nnx

    checkpointer = _reader(standard=True)
    try:
        with _quiet_orbax():
            layout = checkpointer.metadata(ckpt.absolute()).item_metadata.tree
            raw = checkpointer.restore(ckpt.absolute(), jax.tree.map(lambda m: np.empty(m.shape, m.dtype), layout))
    finally:
        checkpointer.close()

    def filled(template, stored):
        pure = nnx.to_pure_dict(template)
        return _filled(template, pure, _as_tree_of(pure, stored))

    params, rest = filled(template_state.params, raw["params"]), filled(template_state.rest, raw["rest"])
    ema = None
    if template_state.ema is not None:
        if "ema" not in raw:
            raise UserError(f"{ckpt} holds no EMA weights: the run was trained without train.ema")
        ema = {part: filled(template_state.ema[part], raw["ema"][part]) for part in ("params", "rest")}
    if not with_optimizer:
        return replace(template_state, params=params, rest=rest, ema=ema), {k: jnp.zeros((), jnp.float32)
                                                                              for k in TOTALS}
    leaves, treedef = jax.tree.flatten(template_state.opt_state)
    stored = raw["opt_state"]
    stored = [stored[k] for k in sorted(stored, key=int)] if isinstance(stored, dict) else list(stored)
    if len(stored) != len(leaves) or any(np.shape(s) != np.shape(t) for s, t in zip(stored, leaves)
                                         if not _is_key(t)):
        raise UserError(f"{ckpt} (saved by an earlier cnncli) holds {len(stored)} optimizer arrays that do not fit "
                        f"this recipe's {len(leaves)}: was `optim` changed since it was saved?")
    opt_state = jax.tree.unflatten(treedef, [_cast(t, s) for t, s in zip(leaves, stored)])
    state = replace(template_state, params=params, rest=rest, opt_state=opt_state,
                    step=jnp.asarray(raw["step"], jnp.int32), ema=ema)
    return state, _totals(raw["totals"])


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
