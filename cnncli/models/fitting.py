"""Layers fitted to the training data before training (a bag-of-words codebook), and the pass that fits them.

A layer with a `fit(inputs: np.ndarray, seed: int) -> str` method is fitted once, on what it receives
from the layers below it for the training images, before the first step; its fitted values are
state (not parameters), so they are checkpointed and restored with the model.
"""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cnncli.models.layers import recording, stop_recording

BATCH = 500  # images per forward pass while collecting a layer's inputs


class _Reached(Exception):
    """Stops the forward pass once the layer's input is captured."""


class _Capture:
    def __init__(self, target):
        self.target, self.value = target, None

    def record(self, layer, xs, y):
        if layer is self.target:
            self.value = xs[0]
            raise _Reached


def fitted_layers(model: nnx.Module) -> list:
    return [m for _, m in nnx.iter_modules(model) if callable(getattr(m, "fit", None))]


def fit_to_data(model: nnx.Module, images: np.ndarray, seed: int, report: Callable[[str], None] | None = None) -> None:
    """Fit every fitted layer of `model` (a Classifier: pixels in, in eval mode) on uint8 training images."""
    for layer in fitted_layers(model):
        inputs = []
        for start in range(0, len(images), BATCH):
            capture = _Capture(layer)
            token = recording(capture)
            try:
                model(jnp.asarray(images[start:start + BATCH], jnp.float32) / 255.0)
            except _Reached:
                pass
            finally:
                stop_recording(token)
            inputs.append(np.asarray(capture.value))
        line = layer.fit(np.concatenate(inputs), seed)
        if report is not None:
            report(line)
