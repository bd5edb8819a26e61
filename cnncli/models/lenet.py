"""LeNet-5 (LeCun et al. 1998) as in the lectures and the PyTorch peer.

conv5x5(6, pad 2) - act - pool2 / conv5x5(16) - act - pool2 / fc120 - act / fc84 - act / fc(classes).
The padding keeps 28x28 inputs at 28x28 after the first conv (the paper used 32x32 unpadded inputs).
"""

import jax
from flax import nnx

from cnncli.models import MODELS
from cnncli.models.layers import activation, avg_pool, max_pool


class LeNet5(nnx.Module):
    def __init__(self, *, input_shape, num_classes, rngs: nnx.Rngs, activation_name="relu", pool="max",
                 dropout=0.0):
        h, w, c = input_shape
        self.conv1 = nnx.Conv(c, 6, (5, 5), padding=2, rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs)
        flat = ((h // 2 - 4) // 2) * ((w // 2 - 4) // 2) * 16
        self.fc1 = nnx.Linear(flat, 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.fc3 = nnx.Linear(84, num_classes, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.act = activation(activation_name)
        self.pool = {"max": max_pool, "avg": avg_pool}[pool]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(self.act(self.fc1(x)))
        x = self.dropout(self.act(self.fc2(x)))
        return self.fc3(x)


@MODELS.register("lenet5", help="LeNet-5 (LeCun 1998): 2 conv + 3 FC layers, 61,706 params on 28x28x1")
def lenet5(*, input_shape, num_classes, rngs, activation="relu", pool="max", dropout=0.0):
    return LeNet5(input_shape=input_shape, num_classes=num_classes, rngs=rngs, activation_name=activation,
                  pool=pool, dropout=dropout)
