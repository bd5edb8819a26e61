"""The fully connected unit."""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from cnncli.errors import UserError
from cnncli.models.layers.activations import act_pieces, make_activation
from cnncli.models.layers.core import DENSE_INIT, Layer, describe_suffix, global_windows
from cnncli.models.layers.norms import make_norm


class Dense(Layer):
    """Fully connected unit: [dropout on the input] -> linear -> [batch norm] -> activation.

    An image-shaped input is flattened first (NHWC order, so a torchvision FC kernel that follows a
    conv needs its input rows permuted from CHW to HWC when imported).
    """

    kind = "fc"

    def __init__(self, in_features: int, out_features: int, *, act: str | None = None, norm: str | None = None,
                 dropout: float = 0.0, bias: bool = True, rngs: nnx.Rngs):
        pieces = act_pieces(act)
        self.in_features, self.out_features, self.pieces = in_features, out_features, pieces
        self.act_name, self.norm_name, self.rate = act, norm, dropout
        self.kernel = nnx.Param(DENSE_INIT(rngs.params(), (in_features, out_features * pieces), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features * pieces,), jnp.float32)) if bias else None
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        if norm not in (None, "none", "batch"):
            raise UserError(f"a fully connected layer takes norm 'batch' or none, not '{norm}'")
        self.bn = make_norm(norm, out_features * pieces, rngs)
        self.act = make_activation(act, out_features)

    def output_shape(self, shape):
        features = math.prod(shape[1:])
        if features != self.in_features:
            raise UserError(f"expects {self.in_features} input features, got {features} "
                            f"({'x'.join(map(str, shape[1:]))})")
        return (shape[0], self.out_features)

    def forward(self, x):
        if x.ndim > 2:
            x = x.reshape(x.shape[0], -1)
        if self.dropout is not None:
            x = self.dropout(x)
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        if self.bn is not None:
            y = self.bn(y)
        if self.act is not None:
            y = self.act(y)
        return y

    def macs(self, in_shapes, out_shape):
        return self.in_features * self.out_features * self.pieces

    def windows(self, in_shape):
        return global_windows(in_shape)

    def describe(self):
        return f"fc {self.out_features}{describe_suffix(self.norm_name, self.act_name, self.rate)}"

