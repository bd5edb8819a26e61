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
    ("linear", (28, 28, 1), 10, {}, 7_850),
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
}
# One model per block type trains a real step in the default run; the others (same blocks, more of
# them: each compiles for 5-50 s on the shared 2-core CPU) are traced always and trained one step
# with CNNCLI_SLOW_TESTS=1.
FAST = {"linear", "mlp", "lenet5", "vgg11_bn", "resnet18", "resnet20"}
SLOW = set(RUN_SPECS) - FAST
RUN_SLOW = os.environ.get("CNNCLI_SLOW_TESTS") == "1"
NUM_CLASSES = 10


def _cases(slow: bool):
    return [pytest.param(name, shape, opts, id=f"{name}-{'x'.join(map(str, shape))}-{i}")
            for name, specs in RUN_SPECS.items() if (name in SLOW) == slow
            for i, (shape, opts) in enumerate(specs)]


def test_every_registered_model_has_a_run_spec():
    assert sorted(RUN_SPECS) == registered_models()


@pytest.mark.parametrize("name,shape,classes,options,expected", REFERENCE_COUNTS,
                         ids=[f"{c[0]}-{c[1][0]}-{c[2]}" for c in REFERENCE_COUNTS])
def test_reference_parameter_count(name, shape, classes, options, expected):
    assert param_count(abstract(name, shape, classes, **options)) == expected


@pytest.mark.parametrize("name", sorted(RUN_SPECS))
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


def test_bottleneck_blocks_and_imagenet_stem_train():
    from cnncli.models.resnet import Bottleneck, ResNet

    net = ResNet(input_shape=(32, 32, 3), num_classes=NUM_CLASSES, rngs=nnx.Rngs(0), block=Bottleneck,
                 stages=(1, 2), widths=(4, 8), stem="imagenet")
    x, y = random_batch((32, 32, 3), NUM_CLASSES)
    loss, logits, params, _, _ = train_step(net, x, y)
    assert logits.shape == (2, NUM_CLASSES) and all_finite(params)


def test_batch_norm_and_dropout_differ_between_train_and_eval():
    net = build_network("vgg11_bn", input_shape=(32, 32, 3), num_classes=NUM_CLASSES, width=0.125, dropout=0.5)
    x, y = random_batch((32, 32, 3), NUM_CLASSES, batch=4)
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
