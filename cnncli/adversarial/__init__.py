"""Adversarial examples: the attacks (pure JAX), robustness of a trained run over eps, and their figures."""
