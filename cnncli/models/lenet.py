"""LeNet-5 (LeCun et al. 1998) as in the lectures and the PyTorch peer.

conv5x5(6, pad 2) - act - pool2 / conv5x5(16) - act - pool2 / fc120 - act / fc84 - act / fc(classes).
The padding keeps 28x28 inputs at 28x28 after the first conv, which is what the paper's 32x32
unpadded inputs amount to (61,706 parameters on 28x28x1 with 10 classes).
"""

from cnncli.models.layers import Conv, Dense, Pool, StackBuilder
from cnncli.models.registry import DEFAULT_INPUTS, MNIST_INPUT, MODELS


@MODELS.register("lenet5", help="LeNet-5 (LeCun 1998): 2 conv + 3 FC layers, 61,706 params on 28x28x1")
def lenet5(*, input_shape, num_classes, rngs, activation="relu", pool="max", norm=None, dropout=0.0):
    b = StackBuilder(input_shape)
    b.add("conv1", Conv(b.channels, 6, 5, padding=2, norm=norm, act=activation, rngs=rngs))
    b.add("pool1", Pool(pool, 2, channels=b.channels, rngs=rngs))
    b.add("conv2", Conv(b.channels, 16, 5, padding=0, norm=norm, act=activation, rngs=rngs))
    b.add("pool2", Pool(pool, 2, channels=b.channels, rngs=rngs))
    b.add("fc1", Dense(b.features, 120, act=activation, rngs=rngs))
    b.add("fc2", Dense(b.features, 84, act=activation, dropout=dropout, rngs=rngs))
    b.add("fc3", Dense(b.features, num_classes, dropout=dropout, rngs=rngs))
    return b.build()


DEFAULT_INPUTS["lenet5"] = MNIST_INPUT
