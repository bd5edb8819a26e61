"""Many processes (hosts) training one model: joining the process group and agreeing on host-side facts.

`cnncli train --coordinator HOST:PORT --num-processes N --process-id I` joins N processes into one
JAX runtime (`jax.distributed.initialize`), so `jax.devices()` lists every process's devices and a
mesh over them shards each batch across all hosts. Without the flags, a job that JAX's own cluster
detection recognizes (Slurm, Open MPI, Cloud TPU pods, ...) as several processes joins the same way.

In such a run process 0 alone reads and writes the run directory. Every host-side fact the others
need from it (does a checkpoint exist, where a resume starts, the metrics history) is read by
process 0 and broadcast with `agree` or `from_main`: every process then takes the same decisions,
and the collectives inside the jitted steps never wait for a process that went another way.
All functions here are cheap no-ops in a single process.
"""

import json
import os
import re
from collections.abc import Callable
from typing import Any

from cnncli.errors import UserError

MAIN = 0  # the process that writes the run directory, checkpoints and console output
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(?P<port>\d+)$")


def check_flags(coordinator: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Validate the multi-host flags; True when they were given (all three), False when none was.

    Raises:
        UserError: some but not all flags given, a process id out of range, an address not HOST:PORT.
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    missing = [flag for flag, value in given.items() if value is None]
    if len(missing) == len(given):
        return False
    if missing:
        present = [flag for flag in given if flag not in missing]
        raise UserError(f"{' and '.join(present)} also needs {' and '.join(missing)}: give every process the same "
                        "--coordinator HOST:PORT and --num-processes N and its own --process-id 0..N-1 "
                        "(or none of them, to let JAX detect a Slurm, Open MPI or TPU cluster)")
    if num_processes < 1:
        raise UserError(f"--num-processes {num_processes}: a run needs at least 1 process")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process-id {process_id} is out of range for --num-processes {num_processes}: "
                        f"use 0 to {num_processes - 1}")
    match = _ADDRESS.match(coordinator)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise UserError(f"--coordinator '{coordinator}' is not HOST:PORT (e.g. 10.0.0.1:1234 or node0:1234, "
                        "a port from 1 to 65535 that process 0 can listen on)")
    return True


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the process group named by the flags, or one that JAX detects; otherwise do nothing.

    Must run before anything touches a device (jax.devices(), an array, a jit): JAX fixes its
    device list when the backend starts.
    """
    explicit = check_flags(coordinator, num_processes, process_id)
    import jax

    if jax.distributed.is_initialized() or not (explicit or cluster_detected()):
        return
    # cnncli handles SIGTERM itself (a checkpoint, then exit 143, agreed between processes at the next
    # progress update); JAX's preemption service would take the signal and leave the processes running.
    jax.config.update("jax_enable_preemption_service", False)
    try:
        if explicit:
            jax.distributed.initialize(coordinator, num_processes, process_id)
        else:
            jax.distributed.initialize()
    except (RuntimeError, ValueError) as e:  # JaxRuntimeError (unreachable coordinator, timeout) is a RuntimeError
        where = f" at {coordinator} as process {process_id} of {num_processes}" if explicit else ""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not join the process group{where}: {reason}") from None
    _native_stdout_to_stderr()


def _native_stdout_to_stderr() -> None:
    """Send what native code writes to stdout to stderr, keeping Python's sys.stdout on the real stdout.

    On CPU, Gloo announces every group of devices it connects on stdout ("[Gloo] Rank 0 is connected
    to ..."), when the first collective over it runs; stdout belongs to the command's results.
    """
    import sys

    sys.stdout.flush()
    results = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(results, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8", errors=sys.stdout.errors)


def cluster_detected() -> bool:
    """Whether JAX's cluster auto-detection finds a job of more than one process.

    jax.distributed.initialize() with no arguments consults the same detectors (Slurm, Open MPI,
    Cloud TPU, Kubernetes); a one-process job (a single Slurm task, a one-host TPU VM) stays a plain
    run, so that a Slurm allocation does not pin the run to one GPU. The detector list is JAX
    internals, hence the guard: without it, only the explicit flags start a multi-process run.
    """
    try:
        from jax._src import clusters
        detectors = [env for env in clusters.ClusterEnv._cluster_types if not env.opt_in_only_method]
    except (ImportError, AttributeError):
        return False
    for env in detectors:
        try:
            if env.is_env_present():
                return int(env.get_process_count()) > 1
        except Exception:  # a detector that cannot read its environment does not make a cluster
            continue
    return False


def process_count() -> int:
    import jax

    return jax.process_count()


def multiprocess() -> bool:
    """More than one process (host) shares this run."""
    return process_count() > 1


def is_main() -> bool:
    """This is process 0 (always true in a single-process run)."""
    import jax

    return jax.process_index() == MAIN


def _on_main(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """(fn(), None) on process 0, or (None, message) if it raised a UserError; (None, None) elsewhere."""
    if not is_main():
        return None, None
    try:
        return fn(), None
    except UserError as e:
        return None, str(e)


def agree(fn: Callable[[], Any]) -> Any:
    """fn() evaluated by process 0 and handed to every process; its value must be JSON-ready.

    A UserError raised by fn on process 0 is raised on every process, so all of them stop together.
    In a single process this is just fn().
    """
    if not multiprocess():
        return fn()
    value, error = _broadcast_json(list(_on_main(fn)))
    if error is not None:
        raise UserError(error)
    return value


def together(fn: Callable[[], Any]) -> Any:
    """fn() on every process; a UserError on any process is raised on all of them (naming the process),
    so that a mistake one host makes (a dataset missing there) stops the run instead of hanging it."""
    if not multiprocess():
        return fn()
    value, error = None, None
    try:
        value = fn()
    except UserError as e:
        error = str(e)
    for i, message in enumerate(_allgather_json(error)):
        if message is not None:
            raise UserError(f"process {i}: {message}")
    return value


def gather(value: Any) -> list[Any]:
    """`value` (JSON-ready) of every process, in process order, on every process ([value] in one process)."""
    if not multiprocess():
        return [value]
    return _allgather_json(value)


def check_same(what: str, value: Any) -> None:
    """Raise a UserError on every process unless `value` (JSON-ready) is the same on every process."""
    if not multiprocess():
        return
    values = _allgather_json(value)
    for i, other in enumerate(values[1:], start=1):
        if other != values[0]:
            raise UserError(f"process {i} has other {what} than process 0 ({other} against {values[0]}): "
                            "every process must read the same data and recipe")


def from_main(fn: Callable[[], Any], like: Any) -> Any:
    """The pytree of arrays fn() returns on process 0, broadcast to every process (NumPy leaves).

    The other processes do not call fn; `like` (the same structure, shapes and dtypes) stands in for
    its result. Typed PRNG keys travel as their raw data. A UserError from fn stops every process.
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    if not multiprocess():
        return fn()
    tree, error = _on_main(fn)
    (error,) = _broadcast_json([error])
    if error is not None:
        raise UserError(error)
    source = tree if is_main() else like
    leaves, treedef = jax.tree.flatten(source)
    is_key = [hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key) for x in leaves]
    raw = [jax.random.key_data(x) if k else x for x, k in zip(leaves, is_key)]
    raw = multihost_utils.broadcast_one_to_all(raw)
    out = [jax.random.wrap_key_data(r, impl=jax.random.key_impl(x)) if k else r
           for r, x, k in zip(raw, leaves, is_key)]
    return jax.tree.unflatten(treedef, out)


def first_signal(signum: int) -> int:
    """The stop signal any process received (0: none), the same on every process: the smallest number
    among them, so that a run stops together and every process exits with the same code."""
    if not multiprocess():
        return signum
    import numpy as np
    from jax.experimental import multihost_utils

    received = np.asarray(multihost_utils.process_allgather(np.int32(signum))).reshape(-1)
    received = received[received > 0]
    return int(received.min()) if received.size else 0


def _broadcast_json(obj: Any) -> Any:
    """obj (JSON-ready) from process 0 on every process: its length, then its UTF-8 bytes."""
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buffer = data if is_main() else np.zeros(size, np.uint8)
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(buffer)).decode())


def _allgather_json(obj: Any) -> list[Any]:
    """obj (JSON-ready) of every process, in process order, on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    buffer = np.zeros(int(sizes.max()), np.uint8)
    buffer[: len(data)] = data
    everyone = np.asarray(multihost_utils.process_allgather(buffer))
    return [json.loads(bytes(row[:size]).decode()) for row, size in zip(everyone, sizes)]
