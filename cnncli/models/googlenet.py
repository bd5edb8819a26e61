"""GoogLeNet / Inception v1 (Szegedy et al. 2015) and the naive Inception module it improves on.

Inception modules run four branches on the same input and concatenate their outputs: a 1x1
convolution, a 1x1 reduction then 3x3, a 1x1 reduction then 5x5, and a 3x3 max-pool then a 1x1
projection. Without the 1x1 reductions (the naive module) the 3x3 and 5x5 convolutions see every
input channel and the pool passes all of them through, so cost and width explode: `inception_naive`
builds such modules (or, with `reduce`, the bottlenecked ones) for the comparison of the lectures.

`googlenet` follows the paper's Table 1 (`variant: paper`: conv biases, LRN after the first pool and
after conv3, no batch norm); `variant: torchvision` is torchvision's (batch norm, no LRN, a 3x3
instead of 5x5 in the third branch, the known deviation kept for weight compatibility):
6,624,904 parameters, 13,004,888 with `aux: true`. Pools are 3x3 stride 2 in ceil mode (torchvision).

Auxiliary heads (`aux: true`, after 4a and 4d) run during analysis, and in training mode when the
step asks for them: `layers.classifier.logits_and_aux(model, x)` calls the model under `nnx.capture`, where the heads
sow their logits (`nnx.Intermediate`, `aux_logits`), and a step adds `AUX_WEIGHT` (the paper's 0.3)
times their cross-entropy to the loss. A plain call (a step that does not ask) skips them.
"""

from flax import nnx

from cnncli.errors import UserError
from cnncli.models.layers import (
    Concat,
    Conv,
    Dense,
    Dropout,
    GlobalPool,
    Norm,
    Pool,
    Stack,
    StackBuilder,
    is_recording,
)
from cnncli.models.layers.classifier import AUX_KEY
from cnncli.models.registry import DEFAULT_INPUTS, IMAGENET_INPUT, MODELS

MIN_INPUT = 48  # 48-24-12-6-3-1 through the five stride-2 stages
AUX_MAP, AUX_STRIDE = 4, 3  # the auxiliary heads average-pool to 4x4 (5x5 stride 3 on 14x14 maps at 224 px)

# name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj), the paper's Table 1; None marks a max-pool
PLAN = (
    ("inception3a", (64, 96, 128, 16, 32, 32)),
    ("inception3b", (128, 128, 192, 32, 96, 64)),
    ("maxpool3", None),
    ("inception4a", (192, 96, 208, 16, 48, 64)),
    ("inception4b", (160, 112, 224, 24, 64, 64)),
    ("inception4c", (128, 128, 256, 24, 64, 64)),
    ("inception4d", (112, 144, 288, 32, 64, 64)),
    ("inception4e", (256, 160, 320, 32, 128, 128)),
    ("maxpool4", None),
    ("inception5a", (256, 160, 320, 32, 128, 128)),
    ("inception5b", (384, 192, 384, 48, 128, 128)),
)
AUX_AFTER = {"inception4a": "aux1", "inception4d": "aux2"}
VARIANTS = ("paper", "torchvision")


class Inception(nnx.Module):
    """Four parallel branches concatenated along channels; a None reduction makes the branch naive
    (no 1x1 bottleneck before the 3x3/5x5 conv, no projection after the pool)."""

    def __init__(self, cin: int, c1: int, c3r: int | None, c3: int, c5r: int | None, c5: int, proj: int | None, *,
                 kernel5: int = 5, norm=None, act="relu", rngs: nnx.Rngs):
        def conv(ci, co, k):
            return Conv(ci, co, k, padding=k // 2, norm=norm, act=act, rngs=rngs)

        def branch(reduce, width, k):
            if reduce is None:
                return Stack([("conv", conv(cin, width, k))])
            return Stack([("reduce", conv(cin, reduce, 1)), ("conv", conv(reduce, width, k))])

        self.branch1 = conv(cin, c1, 1)
        self.branch2 = branch(c3r, c3, 3)
        self.branch3 = branch(c5r, c5, kernel5)
        pool = [("pool", Pool("max", 3, 1, padding=1))]
        self.branch4 = Stack(pool + ([("proj", conv(cin, proj, 1))] if proj is not None else []))
        self.concat = Concat()

    def _branches(self):
        return (self.branch1, self.branch2, self.branch3, self.branch4)

    def __call__(self, x):
        return self.concat(*(b(x) for b in self._branches()))

    def output_shape(self, shape):
        return self.concat.output_shape(*(b.output_shape(shape) for b in self._branches()))


class AuxHead(nnx.Module):
    """Auxiliary classifier: avgpool to 4x4, 1x1 conv 128, fc 1024, dropout 0.7, fc classes."""

    def __init__(self, shape, num_classes: int, *, norm, act, rngs: nnx.Rngs):
        b = StackBuilder(shape[1:], context="aux layer")
        size = shape[1]
        if size >= AUX_STRIDE * (AUX_MAP - 1) + 1:
            b.add("pool", Pool("avg", size - AUX_STRIDE * (AUX_MAP - 1), AUX_STRIDE))  # 5x5/3 at 14x14
        elif size > AUX_MAP:  # small inputs: a stride-1 average down to 4x4
            b.add("pool", Pool("avg", size - AUX_MAP + 1, 1))
        b.add("conv", Conv(b.channels, 128, 1, padding=0, norm=norm, act=act, rngs=rngs))
        b.add("fc1", Dense(b.features, 1024, act=act, rngs=rngs))
        b.add("fc2", Dense(1024, num_classes, dropout=0.7, rngs=rngs))
        self.head = b.build()

    def __call__(self, x):
        return self.head(x)


class GoogLeNet(nnx.Module):
    def __init__(self, *, input_shape, num_classes, rngs: nnx.Rngs, variant="paper", aux=False, dropout=0.4,
                 activation="relu", norm=None):
        if variant not in VARIANTS:
            raise UserError(f"googlenet variant must be one of {', '.join(VARIANTS)}, got '{variant}'")
        tv = variant == "torchvision"
        norm = norm if norm is not None else ("batch" if tv else None)
        lrn = not tv and norm in (None, "none")
        b = StackBuilder(input_shape)
        stem = []

        def add(name, layer):
            stem.append((name, b.add(name, layer)))

        add("conv1", Conv(b.channels, 64, 7, stride=2, padding=3, norm=norm, act=activation, rngs=rngs))
        add("maxpool1", Pool("max", 3, 2, ceil=True))
        if lrn:
            add("norm1", Norm("lrn", b.channels, rngs=rngs))
        add("conv2", Conv(b.channels, 64, 1, padding=0, norm=norm, act=activation, rngs=rngs))
        add("conv3", Conv(b.channels, 192, 3, padding=1, norm=norm, act=activation, rngs=rngs))
        if lrn:
            add("norm2", Norm("lrn", b.channels, rngs=rngs))
        add("maxpool2", Pool("max", 3, 2, ceil=True))
        self.stem = Stack(stem)
        self.order = tuple(name for name, _ in PLAN)
        self.aux_names = tuple(AUX_AFTER.values()) if aux else ()
        for name, widths in PLAN:
            if widths is None:
                window = 2 if tv and name == "maxpool4" else 3
                setattr(self, name, b.add(name, Pool("max", window, 2, ceil=True)))
                continue
            setattr(self, name, b.add(name, Inception(b.channels, *widths, kernel5=3 if tv else 5, norm=norm,
                                                      act=activation, rngs=rngs)))
            if aux and name in AUX_AFTER:
                setattr(self, AUX_AFTER[name], AuxHead(b.shape, num_classes, norm=norm, act=activation, rngs=rngs))
        self.avgpool = b.add("avgpool", GlobalPool())
        self.dropout = b.add("dropout", Dropout(dropout, rngs=rngs))
        self.fc = b.add("fc", Dense(b.features, num_classes, rngs=rngs))
        self.deterministic = False  # set by model.train() / model.eval(): auxiliary heads run in training only

    def __call__(self, x):
        x = self.stem(x)
        for name in self.order:
            x = getattr(self, name)(x)
            head = AUX_AFTER.get(name)
            if head not in self.aux_names:
                continue
            if is_recording():  # the analysis shows the heads' rows; nothing to collect
                getattr(self, head)(x)
            elif not self.deterministic and hasattr(self, "__captures__"):
                # Only under nnx.capture (classifier.logits_and_aux): a plain call must not add state, or a
                # pure train step that splits and merges the model would see an extra leaf.
                self.sow(nnx.Intermediate, AUX_KEY, getattr(self, head)(x))
        return self.fc(self.dropout(self.avgpool(x)))


@MODELS.register("googlenet", help="GoogLeNet / Inception v1; options variant (paper/torchvision), aux (heads)")
def googlenet(*, input_shape, num_classes, rngs, variant="paper", aux=False, dropout=0.4, activation="relu",
              norm=None):
    if min(input_shape[:2]) < MIN_INPUT:
        raise UserError(f"googlenet needs inputs of at least {MIN_INPUT}x{MIN_INPUT} (five stride-2 stages), got "
                        f"{input_shape[0]}x{input_shape[1]}; resize with data.image_size")
    return GoogLeNet(input_shape=input_shape, num_classes=num_classes, rngs=rngs, variant=variant, aux=aux,
                     dropout=dropout, activation=activation, norm=norm)


LECTURE_WIDTHS = (128, 192, 96)  # the lectures' example module: 1x1 128, 3x3 192, 5x5 96, 3x3 pool


@MODELS.register("inception_naive", help="naive Inception modules (no 1x1 bottlenecks) + GAP + fc; options "
                                         "widths, reduce (bottleneck widths: the comparison), blocks")
def inception_naive(*, input_shape, num_classes, rngs, widths=LECTURE_WIDTHS, reduce=None, blocks=1,
                    activation="relu", norm=None):
    """`widths` = (1x1, 3x3, 5x5) outputs; `reduce` = (before 3x3, before 5x5, after pool) 1x1 widths."""
    c1, c3, c5 = widths
    r3, r5, proj = reduce if reduce is not None else (None, None, None)
    b = StackBuilder(input_shape)
    for i in range(1, blocks + 1):
        b.add(f"inception{i}", Inception(b.channels, c1, r3, c3, r5, c5, proj, norm=norm, act=activation, rngs=rngs))
    b.add("avgpool", GlobalPool())
    b.add("fc", Dense(b.features, num_classes, rngs=rngs))
    return b.build()


DEFAULT_INPUTS["googlenet"] = IMAGENET_INPUT
DEFAULT_INPUTS["inception_naive"] = ((28, 28, 256), 10)  # the lectures' example input
