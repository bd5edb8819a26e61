"""cnncli: train, evaluate, fine-tune, inspect and attack convolutional image classifiers."""

import os
from pathlib import Path

__version__ = "0.1.0"

# JAX's persistent compilation cache is on by default, so a second run of the same recipe skips
# most of its compilation. JAX reads this variable when it is imported; a user's setting wins.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnncli" / "jax"))

# XLA's CPU convolution library for the convolution mode in CNNCLI_CONV (see cnncli.runtime);
# like the cache directory, it must be in the environment before JAX starts its CPU backend.
from cnncli.runtime import configure_xla  # noqa: E402

configure_xla()
