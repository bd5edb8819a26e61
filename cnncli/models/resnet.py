"""ResNets (He et al. 2016): the ImageNet family (resnet18-152), its CIFAR-stem resnet18 (the PyTorch
peer's), and the CIFAR family of the paper's section 4.2 (resnet20-110).

Names follow torchvision (conv1, layer1.0.conv1, layer1.0.downsample, fc; batch norm lives inside
each conv unit as `.bn`), blocks are torchvision's v1.5 (the stride sits on the 3x3 conv of a
bottleneck), so its state dicts map over by name.

`resnet18`..`resnet152` pick their stem from the input size (`stem: auto`): inputs of at most 64
pixels get the CIFAR stem (3x3 stride-1 conv, no max-pool: the peer's exact `resnet18` at 32x32),
larger ones the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool). `stem: imagenet` or
`stem: cifar` forces one.
"""

from flax import nnx

from cnncli.errors import UserError
from cnncli.models.layers import Add, Conv, Dense, GlobalPool, Pool, ShortcutA, StackBuilder
from cnncli.models.registry import DEFAULT_INPUTS, IMAGENET_INPUT, MODELS

SMALL_INPUT = 64
STEMS = ("auto", "imagenet", "cifar")
SHORTCUTS = ("A", "B")  # A: zero-padded identity (paper's CIFAR nets), B: 1x1 projection (ImageNet nets)


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions and a residual connection."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, *, norm, act, shortcut: str, rngs: nnx.Rngs):
        cout = width * self.expansion
        self.conv1 = Conv(cin, width, 3, stride=stride, padding=1, norm=norm, act=act, rngs=rngs)
        self.conv2 = Conv(width, cout, 3, padding=1, norm=norm, act=None, rngs=rngs)
        self.downsample = _shortcut(cin, cout, stride, norm=norm, shortcut=shortcut, rngs=rngs)
        self.add = Add(act, cout)

    def residual(self, x):
        return self.conv2(self.conv1(x))

    def __call__(self, x):
        y = self.residual(x)
        return self.add(y, x if self.downsample is None else self.downsample(x))

    def output_shape(self, shape):
        y = shape
        for layer in self._path():
            y = layer.output_shape(y)
        s = shape if self.downsample is None else self.downsample.output_shape(shape)
        return self.add.output_shape(y, s)

    def _path(self):
        return (self.conv1, self.conv2)


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, and a residual connection."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, *, norm, act, shortcut: str, rngs: nnx.Rngs):
        cout = width * self.expansion
        self.conv1 = Conv(cin, width, 1, padding=0, norm=norm, act=act, rngs=rngs)
        self.conv2 = Conv(width, width, 3, stride=stride, padding=1, norm=norm, act=act, rngs=rngs)
        self.conv3 = Conv(width, cout, 1, padding=0, norm=norm, act=None, rngs=rngs)
        self.downsample = _shortcut(cin, cout, stride, norm=norm, shortcut=shortcut, rngs=rngs)
        self.add = Add(act, cout)

    def residual(self, x):
        return self.conv3(self.conv2(self.conv1(x)))

    def _path(self):
        return (self.conv1, self.conv2, self.conv3)


def _shortcut(cin, cout, stride, *, norm, shortcut, rngs):
    if stride == 1 and cin == cout:
        return None
    if shortcut == "A":
        return ShortcutA(cin, cout, stride)
    return Conv(cin, cout, 1, stride=stride, padding=0, norm=norm, act=None, rngs=rngs)


class ResNet(nnx.Module):
    """Stem, residual stages `layer1`..`layerK`, global average pooling, `fc`."""

    def __init__(self, *, input_shape, num_classes, rngs: nnx.Rngs, block: type[BasicBlock],
                 stages: tuple[int, ...], widths: tuple[int, ...], stem: str, norm="batch", activation="relu",
                 shortcut="B"):
        if shortcut not in SHORTCUTS:
            raise UserError(f"resnet shortcut must be A (zero-padded identity) or B (projection), got '{shortcut}'")
        if norm not in (None, "none", "batch"):
            raise UserError(f"resnet norm must be 'batch' or 'none', got '{norm}'")
        b = StackBuilder(input_shape)
        if stem == "imagenet":
            self.conv1 = b.add("conv1", Conv(b.channels, widths[0], 7, stride=2, padding=3, norm=norm,
                                             act=activation, rngs=rngs))
            self.maxpool = b.add("maxpool", Pool("max", 3, 2, padding=1))
        else:
            self.conv1 = b.add("conv1", Conv(b.channels, widths[0], 3, padding=1, norm=norm, act=activation,
                                             rngs=rngs))
            self.maxpool = None
        self.stages = tuple(f"layer{i}" for i in range(1, len(stages) + 1))
        for i, (count, width) in enumerate(zip(stages, widths, strict=True)):
            blocks = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(b.add(f"{self.stages[i]}.{j}", block(b.channels, width, stride, norm=norm,
                                                                  act=activation, shortcut=shortcut, rngs=rngs)))
            setattr(self, self.stages[i], nnx.List(blocks))
        self.avgpool = b.add("avgpool", GlobalPool())
        self.fc = b.add("fc", Dense(b.features, num_classes, rngs=rngs))

    def __call__(self, x):
        x = self.conv1(x)
        if self.maxpool is not None:
            x = self.maxpool(x)
        for stage in self.stages:
            for block in getattr(self, stage):
                x = block(x)
        return self.fc(self.avgpool(x))


IMAGENET = {  # depth: block, blocks per stage (the paper's Table 1)
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_DEPTHS = (20, 32, 44, 56, 110)  # 6n + 2 layers
CIFAR_WIDTHS = (16, 32, 64)


def _register_imagenet(depth: int) -> None:
    block, stages = IMAGENET[depth]

    def builder(*, input_shape, num_classes, rngs, stem="auto", norm="batch", activation="relu", shortcut="B"):
        if stem not in STEMS:
            raise UserError(f"resnet stem must be one of {', '.join(STEMS)}, got '{stem}'")
        if stem == "auto":
            stem = "cifar" if max(input_shape[:2]) <= SMALL_INPUT else "imagenet"
        return ResNet(input_shape=input_shape, num_classes=num_classes, rngs=rngs, block=block, stages=stages,
                      widths=IMAGENET_WIDTHS, stem=stem, norm=norm, activation=activation, shortcut=shortcut)

    kind = "basic" if block is BasicBlock else "bottleneck"
    MODELS.register(f"resnet{depth}", builder,
                    help=f"ResNet-{depth} ({kind} blocks); CIFAR stem for inputs <= {SMALL_INPUT} px (option stem)")


def _register_cifar(depth: int) -> None:
    n = (depth - 2) // 6

    def builder(*, input_shape, num_classes, rngs, norm="batch", activation="relu", shortcut="A"):
        return ResNet(input_shape=input_shape, num_classes=num_classes, rngs=rngs, block=BasicBlock,
                      stages=(n, n, n), widths=CIFAR_WIDTHS, stem="cifar", norm=norm, activation=activation,
                      shortcut=shortcut)

    MODELS.register(f"resnet{depth}", builder,
                    help=f"CIFAR ResNet-{depth} (paper section 4.2: 3 stages of {n} basic blocks, 16/32/64 wide)")


for _depth in IMAGENET:
    _register_imagenet(_depth)
    DEFAULT_INPUTS[f"resnet{_depth}"] = IMAGENET_INPUT
for _depth in CIFAR_DEPTHS:
    _register_cifar(_depth)
