"""Process-wide settings of the host runtime that the jitted steps depend on for speed.

XLA's CPU convolutions. XLA 0.10 hands convolutions to YNNPACK by default, whose weight gradients
ran slower than XLA's older Eigen convolution and whose forward passes ran no faster
(docs/performance.md, "The rules"). `configure_xla` turns the YNNPACK convolution off for the fast
path (`CNNCLI_CONV=fast`, the default); `CNNCLI_CONV=xla` keeps XLA's defaults for comparison. The
flag only exists in the XLA of jaxlib 0.10 (an unknown flag is a fatal error in XLA), so it is set
for that version only, and never over a user's own setting.

The compilation cache. A training run compiles its steps once per process; JAX's persistent cache
keeps the compiled programs on disk, so the next run of the same recipe loads them instead. JAX
writes only programs that took a second or more to compile by default; cnncli writes every one
(`CACHE_SETTINGS`), since on a GPU a handful of "small" programs add up to seconds. With the cache
on, JAX also keeps XLA's per-fusion GPU autotuning results in it (`jax_persistent_cache_enable_xla_caches`,
named here explicitly), so a new program made of known fusions skips their autotuning.
`CompileClock` measures what compiling costs a run (tracing, lowering, compiling or loading from
the cache), so that training times can leave it out.

The allocator. XLA's CPU runtime allocates every step's large buffers (the temporaries of a
ResNet-18 training step are over 1 GB at batch 128) with `malloc`, and glibc serves blocks above
its mmap threshold (at most 32 MB) with fresh `mmap`s that it unmaps again on `free`, so each step
page-faults its whole working set back in. Serving large blocks from one heap (the main arena:
glibc unmaps a per-thread heap as soon as it is empty) and never trimming it keeps the pages
mapped between steps. The cost is that the process keeps its peak memory until it exits, which
is what a training run needs anyway.
"""

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
CACHE_SETTINGS = {  # JAX's config names; its environment variables are the upper-case names
    "jax_persistent_cache_min_compile_time_secs": "0",
    "jax_persistent_cache_min_entry_size_bytes": "-1",  # -1: no size threshold and no override of it
    "jax_persistent_cache_enable_xla_caches": "xla_gpu_per_fusion_autotune_cache_dir",
}
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
CACHE_HIT_EVENT, CACHE_MISS_EVENT = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"

# mallopt(3) parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NO_TRIM = -1  # the documented value that disables trimming the heap completely
ENV_DISABLE = "CNNCLI_KEEP_MEMORY"  # set to 0 to leave the allocator alone

CONV_MODE_ENV = "CNNCLI_CONV"  # fast (default) or xla: see cnncli.ops.conv
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVOLUTIONS = f"{YNN_FLAG}=-individual_convolution"
FLAG_JAXLIB = "0.10."  # the jaxlib releases whose XLA knows the flag


def xla_flags(current: str, conv_mode: str, jaxlib_version: str) -> str:
    """XLA_FLAGS with the fast path's CPU convolution setting added (unchanged if not applicable)."""
    if conv_mode != "fast" or not jaxlib_version.startswith(FLAG_JAXLIB) or YNN_FLAG in current:
        return current
    return f"{current} {EIGEN_CONVOLUTIONS}".strip()


def configure_xla() -> None:
    """Set XLA_FLAGS for the convolution mode in CNNCLI_CONV; XLA reads it when its CPU backend starts."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        jaxlib = version("jaxlib")
    except PackageNotFoundError:
        return
    flags = xla_flags(os.environ.get("XLA_FLAGS", ""), os.environ.get(CONV_MODE_ENV, "fast"), jaxlib)
    if flags:
        os.environ["XLA_FLAGS"] = flags


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory mapped for reuse instead of returning it to the system.

    Call it early (before JAX allocates); it affects the whole process. Returns whether the
    allocator was changed: False off Linux/glibc or when CNNCLI_KEEP_MEMORY=0.
    """
    if os.environ.get(ENV_DISABLE, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # musl has no mallopt
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NO_TRIM), (M_ARENA_MAX, 1))
    return all([bool(libc.mallopt(param, value)) for param, value in settings])


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnncli" / "jax"


def configure_cache() -> None:
    """Turn JAX's persistent compilation cache on for every program (a user's own settings win).

    The environment is what JAX reads when it is imported; if it already is, its config is updated too.
    """
    user_set = {name for name in CACHE_SETTINGS if name.upper() in os.environ}
    os.environ.setdefault(CACHE_DIR_ENV, str(default_cache_dir()))
    for name, value in CACHE_SETTINGS.items():
        os.environ.setdefault(name.upper(), value)
    if "jax" in sys.modules:
        import jax

        if jax.config.jax_compilation_cache_dir is None:
            jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_DIR_ENV])
        for name, value in CACHE_SETTINGS.items():
            if name not in user_set:
                current = getattr(jax.config, name)
                jax.config.update(name, type(current)(value) if current is not None else value)


class CompileClock:
    """Seconds this process has spent compiling (tracing, lowering, XLA compiling or loading a cached
    program), and how many programs came from the persistent cache or missed it.

    One clock per process (`of_process`) listens to JAX's compilation events from its first use on.
    Compilation runs synchronously in the thread that first calls a program, so a caller takes the
    clock's reading before and after a stretch of work and subtracts the difference from that
    stretch's wall time.
    """

    _process: "CompileClock | None" = None

    def __init__(self):
        self.seconds = 0.0
        self.cache_hits = 0
        self.cache_misses = 0

    @classmethod
    def of_process(cls) -> "CompileClock":
        if cls._process is None:
            from jax import monitoring

            clock = cls()
            monitoring.register_event_duration_secs_listener(clock._duration)
            monitoring.register_event_listener(clock._event)
            cls._process = clock
        return cls._process

    def _duration(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration

    def _event(self, event: str, **kwargs) -> None:
        self.cache_hits += event == CACHE_HIT_EVENT
        self.cache_misses += event == CACHE_MISS_EVENT
