"""Tools around training: the throughput benchmark against the PyTorch peer, and hyperparameter sweeps."""
