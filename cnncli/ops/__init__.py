"""Hand-written JAX operations with their own gradients where XLA is slow on CPU (see docs/performance.md)."""
