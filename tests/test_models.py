"""Every registered model builds, runs, trains one step, and has its reference parameter count."""

import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from model_utils import abstract, abstract_logits_shape, all_finite, param_count, random_batch, train_step

from cnncli.errors import UserError
from cnncli.models import build_network, registered_models

# Published parameter counts (torchvision for ImageNet nets at 224x224x3 with 1000 classes; the
# ResNet paper's CIFAR nets and the PyTorch peer's nets with 10 classes).
REFERENCE_COUNTS = [
    ("vgg16", (224, 224, 3), 1000, {}, 138_357_544),
    ("vgg11", (224, 224, 3), 1000, {}, 132_863_336),
    ("vgg13", (224, 224, 3), 1000, {}, 133_047_848),
    ("vgg19", (224, 224, 3), 1000, {}, 143_667_240),
    ("vgg16_bn", (224, 224, 3), 1000, {}, 138_365_992),
    ("resnet18", (224, 224, 3), 1000, {}, 11_689_512),
    ("resnet34", (224, 224, 3), 1000, {}, 21_797_672),
    ("resnet50", (224, 224, 3), 1000, {}, 25_557_032),
    ("resnet101", (224, 224, 3), 1000, {}, 44_549_160),
    ("resnet152", (224, 224, 3), 1000, {}, 60_192_808),
    ("resnet20", (32, 32, 3), 10, {}, 269_722),  # option-A shortcuts, as the paper's 0.27M
    ("resnet32", (32, 32, 3), 10, {}, 464_154),
    ("resnet44", (32, 32, 3), 10, {}, 658_586),
    ("resnet56", (32, 32, 3), 10, {}, 853_018),
    ("resnet110", (32, 32, 3), 10, {}, 1_727_962),
    ("resnet18", (32, 32, 3), 10, {}, 11_173_962),  # the peer's CIFAR ResNet-18
    ("vgg16_bn", (32, 32, 3), 10, {"classifier": "linear"}, 14_728_266),  # the peer's vgg16
    ("lenet5", (28, 28, 1), 10, {}, 61_706),
    ("alexnet_tv", (224, 224, 3), 1000, {}, 61_100_840),
    ("alexnet", (227, 227, 3), 1000, {}, 60_965_224),  # the paper's two-tower net
    ("alexnet", (227, 227, 3), 1000, {"groups": 1}, 62_378_344),  # single tower
    ("googlenet", (224, 224, 3), 1000, {"variant": "torchvision"}, 6_624_904),
    ("googlenet", (224, 224, 3), 1000, {"variant": "torchvision", "aux": True}, 13_004_888),
    ("nin", (32, 32, 3), 10, {}, 966_986),  # the NIN release's CIFAR-10 model
    ("linear", (28, 28, 1), 10, {}, 7_850),
    ("bovw", (28, 28, 1), 10, {}, 256 * (1 + 4) * 10 + 10),  # only the linear layer on the pyramid trains
]

# How each registered model is exercised for real (small input, small width where the model has one).
RUN_SPECS = {
    "linear": [((28, 28, 1), {})],
    "mlp": [((28, 28, 1), {}), ((8, 8, 1), {"hidden": [16], "activation": "prelu", "dropout": 0.2})],
    "lenet5": [((28, 28, 1), {}), ((32, 32, 3), {"pool": "avg", "activation": "tanh"})],
    "vgg11": [((32, 32, 3), {"width": 0.125})],
    "vgg11_bn": [((28, 28, 1), {"width": 0.125}), ((32, 32, 3), {"width": 0.125, "classifier": "linear"})],
    "vgg13": [((32, 32, 3), {"width": 0.125})],
    "vgg13_bn": [((32, 32, 3), {"width": 0.125})],
    "vgg16": [((32, 32, 3), {"width": 0.125})],
    "vgg16_bn": [((32, 32, 3), {"width": 0.125, "classifier": "linear"})],
    "vgg19": [((32, 32, 3), {"width": 0.125})],
    "vgg19_bn": [((32, 32, 3), {"width": 0.125})],
    "resnet18": [((32, 32, 3), {})],
    "resnet34": [((64, 64, 3), {"stem": "imagenet"})],
    "resnet50": [((64, 64, 3), {"stem": "imagenet"})],
    "resnet101": [((32, 32, 3), {})],
    "resnet152": [((32, 32, 3), {})],
    "resnet20": [((28, 28, 1), {}), ((32, 32, 3), {"shortcut": "B"})],
    "resnet32": [((32, 32, 3), {})],
    "resnet44": [((32, 32, 3), {})],
    "resnet56": [((32, 32, 3), {})],
    "resnet110": [((32, 32, 3), {})],
    "alexnet": [((227, 227, 3), {})],
    "alexnet_tv": [((224, 224, 3), {}), ((64, 64, 3), {})],
    "alexnet_small": [((28, 28, 1), {"width": 0.25, "fc": 64}), ((32, 32, 3), {"width": 0.25, "fc": 64})],
    "zfnet": [((224, 224, 3), {})],
    "googlenet": [((64, 64, 3), {"aux": True}), ((224, 224, 3), {"variant": "torchvision"})],
    "inception_naive": [((16, 16, 8), {"widths": [4, 8, 4]}),
                        ((16, 16, 8), {"widths": [4, 8, 4], "reduce": [4, 4, 4], "blocks": 2})],
    "nin": [((28, 28, 1), {}), ((32, 32, 3), {"pool": "l2", "activation": "elu"})],
    "hog_mlp": [((28, 28, 1), {}), ((32, 32, 3), {"hidden": [32, 16], "dropout": 0.1})],
    "bovw": [((28, 28, 1), {"words": 16}), ((32, 32, 3), {"words": 8, "pyramid": [1, 2, 4]})],
    "sequential": [((28, 28, 1), {"layers": ["conv8k3-relu-maxpool", {"conv": 8, "kernel": 3, "norm": "batch",
                                                                      "act": "prelu"},
                                            {"pool": "conv"}, {"conv": 16, "separable": True, "act": "maxout"},
                                            {"conv": 16, "depthwise": True, "dilation": 2}, "lrn", "lcn",
                                            "l2pool3s2", {"local": 8, "kernel": 2, "act": "relu"}, "gap",
                                            {"fc": 16, "act": "gelu", "dropout": 0.2},
                                            "leaky_relu", {"fc": "classes"}, "softmax"]})],
}
# One model per block type trains a real step in the default run; the others (same blocks, more of
# them: each compiles for 5-50 s on the shared 2-core CPU) are traced always and trained one step
# with CNNCLI_SLOW_TESTS=1.
FAST = {"linear", "mlp", "lenet5", "vgg11_bn", "resnet18", "resnet20", "alexnet_small", "inception_naive", "nin",
        "hog_mlp", "bovw", "sequential"}
SLOW = set(RUN_SPECS) - FAST
RUN_SLOW = os.environ.get("CNNCLI_SLOW_TESTS") == "1"
DEEPEST = {"resnet101", "resnet110", "resnet152"}  # 10-25 s just to trace; same blocks as resnet50/56
NUM_CLASSES = 10


def _cases(slow: bool):
    """The first spec of each fast model trains by default; every spec of every model with RUN_SLOW."""
    return [pytest.param(name, shape, opts, id=f"{name}-{'x'.join(map(str, shape))}-{i}")
            for name, specs in RUN_SPECS.items()
            for i, (shape, opts) in enumerate(specs) if (name in SLOW or i > 0) == slow]


def test_every_registered_model_has_a_run_spec():
    assert sorted(RUN_SPECS) == registered_models()


@pytest.mark.parametrize("name,shape,classes,options,expected", REFERENCE_COUNTS,
                         ids=[f"{c[0]}-{c[1][0]}-{c[2]}" for c in REFERENCE_COUNTS])
def test_reference_parameter_count(name, shape, classes, options, expected):
    assert param_count(abstract(name, shape, classes, **options)) == expected


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(n in DEEPEST and not RUN_SLOW,
                                                                           reason="slow to trace; CNNCLI_SLOW_TESTS=1"))
                                  for n in sorted(RUN_SPECS)])
def test_logits_shape_for_every_supported_input(name):
    for shape, options in RUN_SPECS[name]:
        net = abstract(name, shape, NUM_CLASSES, **options)
        assert abstract_logits_shape(net, shape) == (3, NUM_CLASSES)


def _check_one_step(name, shape, options):
    net = build_network(name, input_shape=shape, num_classes=NUM_CLASSES, **options)
    x, y = random_batch(shape, NUM_CLASSES)
    loss, logits, new_params, stats, grads = train_step(net, x, y)
    assert logits.shape == (2, NUM_CLASSES)
    assert all_finite(logits) and all_finite(new_params) and bool(jnp.isfinite(loss))
    assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads)), "no gradient reached the parameters"


@pytest.mark.parametrize("name,shape,options", _cases(slow=False))
def test_trains_one_step(name, shape, options):
    _check_one_step(name, shape, options)


@pytest.mark.slow
@pytest.mark.skipif(not RUN_SLOW, reason="set CNNCLI_SLOW_TESTS=1 to train every deep preset one step")
@pytest.mark.parametrize("name,shape,options", _cases(slow=True))
def test_trains_one_step_deep(name, shape, options):
    _check_one_step(name, shape, options)


@pytest.mark.slow
def test_bottleneck_blocks_and_imagenet_stem_train():
    from cnncli.models.resnet import Bottleneck, ResNet

    net = ResNet(input_shape=(16, 16, 3), num_classes=NUM_CLASSES, rngs=nnx.Rngs(0), block=Bottleneck,
                 stages=(1, 1), widths=(4, 4), stem="imagenet")
    x, y = random_batch((16, 16, 3), NUM_CLASSES)
    loss, logits, params, _, _ = train_step(net, x, y)
    assert logits.shape == (2, NUM_CLASSES) and all_finite(params)


@pytest.mark.slow
def test_batch_norm_and_dropout_differ_between_train_and_eval():
    layers = [{"conv": 4, "norm": "batch", "act": "relu"}, "maxpool", {"fc": 16, "act": "relu"}, "dropout0.5", "fc"]
    net = build_network("sequential", input_shape=(8, 8, 1), num_classes=NUM_CLASSES, layers=layers)
    x, y = random_batch((8, 8, 1), NUM_CLASSES, batch=4)
    net.eval()
    a, b = net(x), net(x)
    assert jnp.array_equal(a, b), "eval mode must be deterministic"
    net.train()
    c, d = net(x), net(x)
    assert not jnp.allclose(c, d), "dropout must differ between two train-mode calls"
    assert not jnp.allclose(a, c)
    before = nnx.state(net, nnx.BatchStat)
    _, _, _, after, _ = train_step(net, x, y)
    assert not all(jnp.array_equal(u, v) for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def test_resnet18_stem_follows_input_size():
    small = abstract("resnet18", (32, 32, 3), 10)
    big = abstract("resnet18", (224, 224, 3), 10)
    assert small.conv1.kernel.shape == (3, 3, 3, 64) and small.maxpool is None
    assert big.conv1.kernel.shape == (7, 7, 3, 64) and big.maxpool is not None
    forced = abstract("resnet18", (64, 64, 3), 10, stem="imagenet")
    assert forced.conv1.kernel.shape == (7, 7, 3, 64)


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="no option 'widht'.*did you mean: width"):
        build_network("vgg11", input_shape=(32, 32, 3), num_classes=10, widht=0.5)


def test_too_small_input_names_the_layer():
    with pytest.raises(UserError, match="conv2"):
        build_network("lenet5", input_shape=(4, 4, 1), num_classes=10)


@pytest.mark.slow
@pytest.mark.skipif(not RUN_SLOW, reason="compiles GoogLeNet twice (about a minute); CNNCLI_SLOW_TESTS=1")
def test_googlenet_aux_heads_run_in_training_only():
    from cnncli.models.layers.classifier import logits_and_aux

    net = build_network("googlenet", input_shape=(64, 64, 3), num_classes=NUM_CLASSES, aux=True)
    x = jnp.zeros((2, 64, 64, 3))
    graphdef, state = nnx.split(net)

    @jax.jit
    def both_modes(state):
        m = nnx.merge(graphdef, state)
        m.train()
        _, aux_train = logits_and_aux(m, x)
        m.eval()
        logits, aux_eval = logits_and_aux(m, x)
        return logits, aux_train, aux_eval

    logits, aux_train, aux_eval = both_modes(state)
    assert logits.shape == (2, NUM_CLASSES)
    assert [a.shape for a in aux_train] == [(2, NUM_CLASSES)] * 2 and aux_eval == []


def test_paper_alexnet_rejects_224_pixels_as_the_lectures_note():
    with pytest.raises(UserError, match=r"conv1 .*\(224 - 11 \+ 2\*0\)/4 \+ 1 = 54.25 is not an integer"):
        build_network("alexnet", input_shape=(224, 224, 3), num_classes=1000)


def test_sequential_errors_name_the_layer_and_sizes():
    def build(layers, shape=(28, 28, 1)):
        return build_network("sequential", input_shape=shape, num_classes=10, layers=layers)

    with pytest.raises(UserError, match=r"layers\[1\] \(pool1\) \(input 7x7x8\).*3.50 is not an integer"):
        build(["conv8k3", "maxpool", "fc"], (7, 7, 1))
    with pytest.raises(UserError, match="output of 12, but the data has 10 classes"):
        build(["conv8k3", "fc12"])
    with pytest.raises(UserError, match="no option 'kernal' \\(did you mean: kernel"):
        build([{"conv": 8, "kernal": 3}])
    with pytest.raises(UserError, match="cannot read layer 'cnv8'"):
        build(["cnv8"])
    with pytest.raises(UserError, match=r"layers\[1\] \(gap1\).*needs an image-shaped input"):
        build(["fc16", "gap", "fc"])
    with pytest.raises(UserError, match=r"layers\[0\]\.layers\[0\]#3 \(conv2\) \(input 1x1x4\): a 3-pixel window"):
        build([{"repeat": 3, "layers": ["conv4k3s2p0"]}, "fc"], (7, 7, 1))
    with pytest.raises(UserError, match="softmax can only be the last layer"):
        build(["softmax", "fc"])
