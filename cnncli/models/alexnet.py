"""AlexNet (Krizhevsky et al. 2012) and ZFNet (Zeiler & Fergus 2014).

- `alexnet`: the paper's network on 227x227x3 (the paper says 224, but (224 - 11)/4 + 1 = 54.25:
  the first layer only tiles a 227-pixel input, which this preset enforces, as the lectures point
  out). Local response normalization after conv1 and conv2 (after the ReLU), overlapping 3x3
  stride-2 pooling, dropout on the inputs of fc7 and fc8. `groups: 2` (default) keeps the two-GPU
  split of conv2, conv4 and conv5 (60,965,224 parameters); `groups: 1` is the single-tower net.
- `alexnet_tv`: torchvision's variant (64-192-384-256-256 filters, padding 2 in conv1, no LRN,
  adaptive 6x6 pooling, dropout before fc6 and fc7): 61,100,840 parameters at 224x224x3.
- `alexnet_small`: the same five-conv/three-FC shape for 28-32 pixel inputs: 5x5 stride-1 first
  layer, 3x3 stride-2 overlapping pools (ceil mode), FC layers of 1024; `width` scales the filters.
- `zfnet`: 7x7 stride-2 first layer and 5x5 stride-2 second layer (the paper's fix of AlexNet's
  aliasing), local contrast normalization after pool1 and pool2.
"""

from cnncli.errors import UserError
from cnncli.models.layers import AdaptiveAvgPool, Conv, Dense, Norm, Pool, StackBuilder
from cnncli.models.registry import DEFAULT_INPUTS, IMAGENET_INPUT, MNIST_INPUT, MODELS

PAPER_INPUT = ((227, 227, 3), 1000)
FC_WIDTH = 4096
SMALL_FC_WIDTH = 1024


@MODELS.register("alexnet", help="AlexNet as in the paper (227x227 input, LRN, two-tower groups); option groups")
def alexnet(*, input_shape, num_classes, rngs, activation="relu", norm="lrn", pool="max", dropout=0.5, groups=2):
    b = StackBuilder(input_shape)
    # exact: a configuration whose windows do not tile the input is an error, as in the lectures.
    try:
        b.add("conv1", Conv(b.channels, 96, 11, stride=4, padding=0, norm=norm, act=activation, exact=True,
                            rngs=rngs))
    except UserError as e:
        raise UserError(f"{e} (the paper's AlexNet takes 227x227 inputs; alexnet_tv takes 224x224, "
                        f"alexnet_small 28-32 px)") from None
    b.add("pool1", Pool(pool, 3, 2, exact=True, channels=b.channels, rngs=rngs))
    b.add("conv2", Conv(b.channels, 256, 5, padding=2, groups=groups, norm=norm, act=activation, rngs=rngs))
    b.add("pool2", Pool(pool, 3, 2, exact=True, channels=b.channels, rngs=rngs))
    b.add("conv3", Conv(b.channels, 384, 3, padding=1, act=activation, rngs=rngs))
    b.add("conv4", Conv(b.channels, 384, 3, padding=1, groups=groups, act=activation, rngs=rngs))
    b.add("conv5", Conv(b.channels, 256, 3, padding=1, groups=groups, act=activation, rngs=rngs))
    b.add("pool5", Pool(pool, 3, 2, exact=True, channels=b.channels, rngs=rngs))
    b.add("fc6", Dense(b.features, FC_WIDTH, act=activation, rngs=rngs))
    b.add("fc7", Dense(FC_WIDTH, FC_WIDTH, act=activation, dropout=dropout, rngs=rngs))
    b.add("fc8", Dense(FC_WIDTH, num_classes, dropout=dropout, rngs=rngs))
    return b.build()


@MODELS.register("alexnet_tv", help="torchvision's AlexNet (no LRN, 64-192-384-256-256): 61,100,840 params")
def alexnet_tv(*, input_shape, num_classes, rngs, activation="relu", norm=None, pool="max", dropout=0.5):
    b = StackBuilder(input_shape)
    b.add("conv1", Conv(b.channels, 64, 11, stride=4, padding=2, norm=norm, act=activation, rngs=rngs))
    b.add("pool1", Pool(pool, 3, 2, channels=b.channels, rngs=rngs))
    b.add("conv2", Conv(b.channels, 192, 5, padding=2, norm=norm, act=activation, rngs=rngs))
    b.add("pool2", Pool(pool, 3, 2, channels=b.channels, rngs=rngs))
    b.add("conv3", Conv(b.channels, 384, 3, padding=1, norm=norm, act=activation, rngs=rngs))
    b.add("conv4", Conv(b.channels, 256, 3, padding=1, norm=norm, act=activation, rngs=rngs))
    b.add("conv5", Conv(b.channels, 256, 3, padding=1, norm=norm, act=activation, rngs=rngs))
    b.add("pool5", Pool(pool, 3, 2, channels=b.channels, rngs=rngs))
    if b.spatial != (6, 6):
        b.add("avgpool", AdaptiveAvgPool(6))
    b.add("fc6", Dense(b.features, FC_WIDTH, act=activation, dropout=dropout, rngs=rngs))
    b.add("fc7", Dense(FC_WIDTH, FC_WIDTH, act=activation, dropout=dropout, rngs=rngs))
    b.add("fc8", Dense(FC_WIDTH, num_classes, rngs=rngs))
    return b.build()


@MODELS.register("alexnet_small", help="AlexNet's shape for 28-32 px inputs (5x5 stride-1 first layer); option width")
def alexnet_small(*, input_shape, num_classes, rngs, activation="relu", norm=None, pool="max", dropout=0.5,
                  width=1.0, fc=SMALL_FC_WIDTH):
    def w(c):
        return max(1, round(c * width))

    b = StackBuilder(input_shape)
    b.add("conv1", Conv(b.channels, w(64), 5, padding=2, norm=norm, act=activation, rngs=rngs))
    b.add("pool1", Pool(pool, 3, 2, ceil=True, channels=b.channels, rngs=rngs))
    b.add("conv2", Conv(b.channels, w(192), 5, padding=2, norm=norm, act=activation, rngs=rngs))
    b.add("pool2", Pool(pool, 3, 2, ceil=True, channels=b.channels, rngs=rngs))
    b.add("conv3", Conv(b.channels, w(384), 3, padding=1, norm=norm, act=activation, rngs=rngs))
    b.add("conv4", Conv(b.channels, w(256), 3, padding=1, norm=norm, act=activation, rngs=rngs))
    b.add("conv5", Conv(b.channels, w(256), 3, padding=1, norm=norm, act=activation, rngs=rngs))
    b.add("pool5", Pool(pool, 3, 2, ceil=True, channels=b.channels, rngs=rngs))
    b.add("fc6", Dense(b.features, fc, act=activation, dropout=dropout, rngs=rngs))
    b.add("fc7", Dense(fc, fc, act=activation, dropout=dropout, rngs=rngs))
    b.add("fc8", Dense(fc, num_classes, rngs=rngs))
    return b.build()


@MODELS.register("zfnet", help="ZFNet (Zeiler & Fergus 2014): 7x7/2 first layer, local contrast normalization")
def zfnet(*, input_shape, num_classes, rngs, activation="relu", norm="lcn", pool="max", dropout=0.5):
    b = StackBuilder(input_shape)
    b.add("conv1", Conv(b.channels, 96, 7, stride=2, padding=1, act=activation, rngs=rngs))
    b.add("pool1", Pool(pool, 3, 2, ceil=True, channels=b.channels, rngs=rngs))
    if norm not in (None, "none"):
        b.add("norm1", Norm(norm, b.channels, rngs=rngs))
    b.add("conv2", Conv(b.channels, 256, 5, stride=2, padding=0, act=activation, rngs=rngs))
    b.add("pool2", Pool(pool, 3, 2, ceil=True, channels=b.channels, rngs=rngs))
    if norm not in (None, "none"):
        b.add("norm2", Norm(norm, b.channels, rngs=rngs))
    b.add("conv3", Conv(b.channels, 384, 3, padding=1, act=activation, rngs=rngs))
    b.add("conv4", Conv(b.channels, 384, 3, padding=1, act=activation, rngs=rngs))
    b.add("conv5", Conv(b.channels, 256, 3, padding=1, act=activation, rngs=rngs))
    b.add("pool5", Pool(pool, 3, 2, ceil=True, channels=b.channels, rngs=rngs))
    b.add("fc6", Dense(b.features, FC_WIDTH, act=activation, rngs=rngs))
    b.add("fc7", Dense(FC_WIDTH, FC_WIDTH, act=activation, dropout=dropout, rngs=rngs))
    b.add("fc8", Dense(FC_WIDTH, num_classes, dropout=dropout, rngs=rngs))
    return b.build()


DEFAULT_INPUTS.update(alexnet=PAPER_INPUT, alexnet_tv=IMAGENET_INPUT, alexnet_small=MNIST_INPUT, zfnet=IMAGENET_INPUT)
