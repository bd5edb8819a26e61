"""cnncli: train, evaluate, fine-tune, inspect and attack convolutional image classifiers."""

__version__ = "0.1.0"

# XLA's settings for this process (see cnncli.runtime): the persistent compilation cache for every
# program, XLA's GPU autotuning results kept beside it, and the CPU convolution library for the mode
# in CNNCLI_CONV. JAX and XLA read them when they start, so they are set on import; a user's wins.
from cnncli.runtime import configure_cache, configure_xla  # noqa: E402

configure_cache()
configure_xla()
