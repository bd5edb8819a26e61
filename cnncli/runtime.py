"""Process-wide settings of the host runtime that the jitted steps depend on for speed.

XLA's CPU convolutions. XLA 0.10 hands convolutions to YNNPACK by default, whose weight gradients
ran slower than XLA's older Eigen convolution and whose forward passes ran no faster
(docs/performance.md, "The rules"). `configure_xla` turns the YNNPACK convolution off for the fast
path (`CNNCLI_CONV=fast`, the default); `CNNCLI_CONV=xla` keeps XLA's defaults for comparison. The
flag only exists in the XLA of jaxlib 0.10 (an unknown flag is a fatal error in XLA), so it is set
for that version only, and never over a user's own setting.

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
