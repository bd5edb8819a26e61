"""Fully connected baselines: `linear` (softmax regression) and `mlp` (flatten - (fc - act) * k - fc)."""

from cnncli.models.layers import Dense, StackBuilder
from cnncli.models.registry import DEFAULT_INPUTS, MNIST_INPUT, MODELS

DEFAULT_HIDDEN = (256, 128)


def build_mlp(*, input_shape, num_classes, rngs, hidden=DEFAULT_HIDDEN, activation="relu", norm=None, dropout=0.0):
    """fc1 .. fcK with the activation (dropout on the input of every layer after the first), then the
    output layer; an image input is flattened by the first layer."""
    b = StackBuilder(input_shape)
    for i, width in enumerate(hidden, start=1):
        b.add(f"fc{i}", Dense(b.features, int(width), act=activation, norm=norm, dropout=dropout if i > 1 else 0.0,
                              rngs=rngs))
    b.add(f"fc{len(hidden) + 1}", Dense(b.features, num_classes, dropout=dropout if hidden else 0.0, rngs=rngs))
    return b.build()


@MODELS.register("mlp", help="multi-layer perceptron; option hidden: list of layer widths (default 256, 128)")
def mlp(*, input_shape, num_classes, rngs, hidden=DEFAULT_HIDDEN, activation="relu", norm=None, dropout=0.0):
    return build_mlp(input_shape=input_shape, num_classes=num_classes, rngs=rngs, hidden=tuple(hidden),
                     activation=activation, norm=norm, dropout=dropout)


@MODELS.register("linear", help="softmax regression: one fully connected layer on the pixels")
def linear(*, input_shape, num_classes, rngs):
    return build_mlp(input_shape=input_shape, num_classes=num_classes, rngs=rngs, hidden=())


DEFAULT_INPUTS["mlp"] = MNIST_INPUT
DEFAULT_INPUTS["linear"] = MNIST_INPUT
