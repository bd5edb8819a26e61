"""Network in Network (Lin, Chen & Yan 2014), the CIFAR-10 model of the paper's Caffe release.

Three "mlpconv" blocks (a spatial convolution followed by two 1x1 convolutions, each with ReLU),
3x3 stride-2 pooling and dropout between blocks, and global average pooling over the last block's
class maps instead of fully connected layers (966,986 parameters for 10 classes). As in the
release, the last 1x1 convolution keeps its ReLU before the global average.
"""

from cnncli.models.layers import Conv, Dropout, GlobalPool, Pool, StackBuilder
from cnncli.models.registry import CIFAR_INPUT, DEFAULT_INPUTS, MODELS

BLOCKS = (  # (kernel, width of the spatial conv, widths of the two 1x1 convs)
    (5, 192, (160, 96)),
    (5, 192, (192, 192)),
    (3, 192, (192, None)),  # None: the class count
)


@MODELS.register("nin", help="Network in Network: mlpconv blocks (1x1 convs) and global average pooling")
def nin(*, input_shape, num_classes, rngs, activation="relu", norm=None, pool="max", dropout=0.5, width=1.0):
    """`width` scales every hidden layer (the class maps keep `num_classes` channels)."""

    def w(c):
        return max(1, round(c * width))

    b = StackBuilder(input_shape)
    pools = (pool, "avg" if pool == "max" else pool)  # the release pools max, then average
    for i, (kernel, spatial, (c1, c2)) in enumerate(BLOCKS, start=1):
        b.add(f"conv{i}", Conv(b.channels, w(spatial), kernel, padding=kernel // 2, norm=norm, act=activation,
                               rngs=rngs))
        b.add(f"cccp{2 * i - 1}", Conv(b.channels, w(c1), 1, padding=0, norm=norm, act=activation, rngs=rngs))
        b.add(f"cccp{2 * i}", Conv(b.channels, w(c2) if c2 else num_classes, 1, padding=0,
                                   norm=norm if c2 else None, act=activation, rngs=rngs))
        if i < len(BLOCKS):
            b.add(f"pool{i}", Pool(pools[i - 1], 3, 2, ceil=True, channels=b.channels, rngs=rngs))
            if dropout:
                b.add(f"drop{i}", Dropout(dropout, rngs=rngs))
    b.add("gap", GlobalPool())
    return b.build()


DEFAULT_INPUTS["nin"] = CIFAR_INPUT
