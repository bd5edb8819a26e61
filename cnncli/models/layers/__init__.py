"""Building blocks shared by every model family, one module per concern.

Every block that should appear as a row of `cnncli summary` is a `Layer` (`core`): it knows its output
shape for an input shape (so builders can size the next layer and report impossible
configurations before anything runs), its multiply-accumulates, and its spatial window (for the
receptive field). When a recorder is active (see `cnncli.inspect.summary`), each layer reports itself
as it runs, so the per-layer table is derived from the real forward pass of every family, branches
and residual additions included. Outside a recorder the only cost is one context-variable lookup
at trace time; nothing changes in the compiled step.

Conventions (kept so that torchvision weights map over directly): images are NHWC, convolution
kernels HWIO, dense kernels (in, out), batch norm = `nnx.BatchNorm` (scale, bias, mean, var) with
PyTorch's momentum 0.1 and eps 1e-5.

Activations, normalizations and pools are chosen by name from one registry each.
"""

# The names model families use; each module's other names are imported from the module itself.
from cnncli.models.layers.activations import ACTIVATIONS, Act
from cnncli.models.layers.blocks import (
    Add,
    Concat,
    Dropout,
    Flatten,
    ShortcutA,
    Stack,
    StackBuilder,
    activates_after_pool,
)
from cnncli.models.layers.classifier import Classifier
from cnncli.models.layers.conv import Conv, LocallyConnected, SeparableConv
from cnncli.models.layers.core import Layer, global_windows, is_recording, recording, resolve_axis, stop_recording
from cnncli.models.layers.dense import Dense
from cnncli.models.layers.norms import LRN, Norm
from cnncli.models.layers.pools import AdaptiveAvgPool, GlobalPool, Pool, avg_pool, max_pool

__all__ = [
    "ACTIVATIONS",
    "Act",
    "AdaptiveAvgPool",
    "Add",
    "Classifier",
    "Concat",
    "Conv",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalPool",
    "LRN",
    "Layer",
    "LocallyConnected",
    "Norm",
    "Pool",
    "SeparableConv",
    "ShortcutA",
    "Stack",
    "StackBuilder",
    "activates_after_pool",
    "avg_pool",
    "global_windows",
    "is_recording",
    "max_pool",
    "recording",
    "resolve_axis",
    "stop_recording",
]
