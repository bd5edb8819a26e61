"""Process settings for speed (cnncli.runtime): XLA's CPU convolution library and the allocator."""

import subprocess
import sys

from cnncli.runtime import EIGEN_CONVOLUTIONS, xla_flags
from tests.helpers import REPO


def test_fast_mode_turns_the_ynnpack_convolution_off_only_where_xla_knows_the_flag():
    assert xla_flags("", "fast", "0.10.2") == EIGEN_CONVOLUTIONS
    assert xla_flags("--xla_dump_to=/tmp/d", "fast", "0.10.0") == f"--xla_dump_to=/tmp/d {EIGEN_CONVOLUTIONS}"
    assert xla_flags("", "xla", "0.10.2") == ""  # the plain baseline keeps XLA's defaults
    assert xla_flags("", "fast", "0.11.0") == ""  # an unknown flag is fatal in XLA: only the versions that have it
    user = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    assert xla_flags(user, "fast", "0.10.2") == user  # never over the user's own setting


def test_importing_cnncli_sets_the_flag_before_jax_starts_and_keeps_memory_mapped():
    code = ("import os, cnncli; from cnncli.runtime import keep_freed_memory; "
            "print(os.environ.get('XLA_FLAGS', '')); print(keep_freed_memory())")
    env = {"PATH": "/usr/bin:/bin", "CNNCLI_CONV": "fast", "PYTHONPATH": str(REPO)}
    lines = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    import jaxlib

    assert (EIGEN_CONVOLUTIONS in lines[0]) == jaxlib.__version__.startswith("0.10.")
    assert lines[1] == ("True" if sys.platform.startswith("linux") else "False")
