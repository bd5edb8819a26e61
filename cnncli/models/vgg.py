"""VGG (Simonyan & Zisserman 2015): configurations A, B, D, E as vgg11, vgg13, vgg16, vgg19 (+ `_bn`).

Layers are named as in the lectures' table (conv1_1 ... conv5_3, pool1 ... pool5, fc6, fc7, fc8);
their order is torchvision's `features` / `classifier` order, so its weights map over by position.

The classifier adapts to the input: at ImageNet sizes (> 64 px) the paper's 4096-4096-classes
head on 7x7x512 features (torchvision's adaptive pooling is added only when the map is not already
7x7); on small inputs (<= 64 px, e.g. CIFAR, Fashion-MNIST) a 512-512-classes head; `classifier:
linear` is a single FC layer on the flattened features, which with batch norm at 32x32 is exactly
the PyTorch peer's `vgg16` (`vgg16_bn` + `classifier: linear`).

Pools are 2x2 stride 2 in ceil mode, which equals the paper's pooling on even maps and lets odd maps
(28x28 Fashion-MNIST: 28-14-7-4-2-1) keep all five pools.
"""

from flax import nnx

from cnncli.errors import UserError
from cnncli.models.layers import AdaptiveAvgPool, Conv, Dense, Pool, StackBuilder
from cnncli.models.registry import DEFAULT_INPUTS, IMAGENET_INPUT, MODELS

CONFIGS = {  # convolutions per block (widths 64, 128, 256, 512, 512); the paper's Table 1
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
WIDTHS = (64, 128, 256, 512, 512)
SMALL_INPUT = 64  # inputs up to this many pixels get the small head
PAPER_HEAD, SMALL_HEAD = 4096, 512
PAPER_MAP = 7  # the paper's head sees 7x7x512 features
CLASSIFIERS = ("auto", "paper", "small", "linear")


def build_vgg(config: tuple[int, ...], *, input_shape, num_classes, rngs: nnx.Rngs, norm=None, activation="relu",
              pool="max", dropout=0.5, classifier="auto", width=1.0):
    """A VGG network as a named Stack (see the module docstring for the head)."""
    if classifier not in CLASSIFIERS:
        raise UserError(f"vgg classifier must be one of {', '.join(CLASSIFIERS)}, got '{classifier}'")
    if classifier == "auto":
        classifier = "small" if max(input_shape[:2]) <= SMALL_INPUT else "paper"
    b = StackBuilder(input_shape)
    for block, (convs, w) in enumerate(zip(config, WIDTHS, strict=True), start=1):
        w = max(1, round(w * width))
        for i in range(1, convs + 1):
            # torchvision's vgg*_bn (and the peer) keep the conv bias in front of batch norm.
            b.add(f"conv{block}_{i}", Conv(b.channels, w, 3, padding=1, bias=True, norm=norm, act=activation,
                                                  rngs=rngs))
        b.add(f"pool{block}", Pool(pool, 2, 2, ceil=True, channels=b.channels, rngs=rngs))
    if classifier == "linear":
        b.add("fc", Dense(b.features, num_classes, dropout=0.0, rngs=rngs))
        return b.build()
    hidden = PAPER_HEAD if classifier == "paper" else SMALL_HEAD
    if classifier == "paper" and b.spatial != (PAPER_MAP, PAPER_MAP):
        b.add("avgpool", AdaptiveAvgPool(PAPER_MAP))
    b.add("fc6", Dense(b.features, hidden, act=activation, rngs=rngs))
    b.add("fc7", Dense(hidden, hidden, act=activation, dropout=dropout, rngs=rngs))
    b.add("fc8", Dense(hidden, num_classes, dropout=dropout, rngs=rngs))
    return b.build()


def _register(name: str, config: tuple[int, ...], batch_norm: bool) -> None:
    default_norm = "batch" if batch_norm else None

    def builder(*, input_shape, num_classes, rngs, norm=default_norm, activation="relu", pool="max", dropout=0.5,
                classifier="auto", width=1.0):
        return build_vgg(config, input_shape=input_shape, num_classes=num_classes, rngs=rngs, norm=norm,
                         activation=activation, pool=pool, dropout=dropout, classifier=classifier, width=width)

    convs = sum(config)
    MODELS.register(name, builder, help=f"VGG with {convs} conv + 3 FC layers{' and batch norm' if batch_norm else ''}"
                                         f"; options: classifier (auto/paper/small/linear), width")


for _name, _config in CONFIGS.items():
    _register(_name, _config, batch_norm=False)
    _register(f"{_name}_bn", _config, batch_norm=True)
    DEFAULT_INPUTS[_name] = DEFAULT_INPUTS[f"{_name}_bn"] = IMAGENET_INPUT
