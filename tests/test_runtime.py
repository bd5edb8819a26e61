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


def _jax_in_subprocess(tmp_path, code: str, **env) -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"), **env}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()


def test_every_compiled_program_is_cached_with_the_autotune_results_and_a_users_setting_wins(tmp_path):
    code = ("import cnncli, jax; c = jax.config; "
            "print(c.jax_persistent_cache_min_compile_time_secs, c.jax_persistent_cache_min_entry_size_bytes, "
            "c.jax_persistent_cache_enable_xla_caches); jax.jit(lambda x: x + 1)(1.0).block_until_ready()")
    settings = _jax_in_subprocess(tmp_path, code)[0].split()
    # JAX's defaults: 1 s, 0 and the autotune cache; a program that compiles in milliseconds is now cached
    assert settings == ["0.0", "-1", "xla_gpu_per_fusion_autotune_cache_dir"]
    assert any("jit__lambda" in p.name for p in (tmp_path / "cache").iterdir())

    mine = tmp_path / "mine"
    settings = _jax_in_subprocess(mine, code, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="5")[0].split()
    assert settings[0] == "5.0"  # nothing compiled for 5 s: nothing written
    assert not any("jit__lambda" in p.name for p in (mine / "cache").glob("*"))


def test_settings_apply_when_jax_was_imported_first(tmp_path):
    code = ("import jax, cnncli; c = jax.config; "
            "print(c.jax_persistent_cache_min_compile_time_secs, c.jax_compilation_cache_dir)")
    settings = _jax_in_subprocess(tmp_path, code)[0].split()
    assert settings == ["0.0", str(tmp_path / "cache")]
