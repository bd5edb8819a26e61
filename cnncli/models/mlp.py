"""Multi-layer perceptron baseline: flatten - (fc - act - dropout) * k - fc(classes)."""

import jax
from flax import nnx

from cnncli.models import MODELS
from cnncli.models.layers import activation


class MLP(nnx.Module):
    def __init__(self, *, input_shape, num_classes, rngs: nnx.Rngs, hidden=(256, 128), activation_name="relu",
                 dropout=0.0):
        sizes = [int(input_shape[0] * input_shape[1] * input_shape[2]), *hidden]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(sizes[-1], num_classes, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.act = activation(activation_name)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = self.dropout(self.act(layer(x)))
        return self.out(x)


@MODELS.register("mlp", help="multi-layer perceptron; option hidden: list of layer widths")
def mlp(*, input_shape, num_classes, rngs, hidden=(256, 128), activation="relu", dropout=0.0):
    return MLP(input_shape=input_shape, num_classes=num_classes, rngs=rngs, hidden=tuple(hidden),
               activation_name=activation, dropout=dropout)
