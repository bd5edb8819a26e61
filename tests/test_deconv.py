"""Deconvnet, guided backpropagation and SmoothGrad against Captum on a PyTorch twin, and their defining properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from captum.attr import Deconvolution, GuidedBackprop
from torch import nn

from cnncli.inspect import interpret
from cnncli.models import build_network

LAYERS = [{"conv": 4, "kernel": 3, "act": "relu"}, {"pool": "max"}, {"conv": 6, "kernel": 3, "act": "relu"},
          {"pool": "max"}, {"fc": 16, "act": "relu"}, {"fc": "classes"}]
SHAPE, CLASSES = (12, 12, 2), 5


def _twin(net) -> nn.Module:
    """The same network in PyTorch with nn.ReLU modules (what Captum's rules hook), weights copied."""
    convs = [nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)]
    fcs = [nn.Linear(6 * 3 * 3, 16), nn.Linear(16, CLASSES)]
    with torch.no_grad():
        for conv, ours in zip(convs, (net.conv0, net.conv2)):
            conv.weight.copy_(torch.from_numpy(np.asarray(ours.kernel[...]).transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.asarray(ours.bias[...]).copy()))
        # our flatten is HWC-ordered, PyTorch's CHW: permute the first FC's input rows
        k = np.asarray(net.fc4.kernel[...]).reshape(3, 3, 6, 16).transpose(2, 0, 1, 3).reshape(-1, 16)
        fcs[0].weight.copy_(torch.from_numpy(k.T.copy()))
        fcs[0].bias.copy_(torch.from_numpy(np.asarray(net.fc4.bias[...]).copy()))
        fcs[1].weight.copy_(torch.from_numpy(np.asarray(net.fc5.kernel[...]).T.copy()))
        fcs[1].bias.copy_(torch.from_numpy(np.asarray(net.fc5.bias[...]).copy()))
    return nn.Sequential(convs[0], nn.ReLU(), nn.MaxPool2d(2), convs[1], nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         fcs[0], nn.ReLU(), fcs[1]).eval()


@pytest.fixture(scope="module")
def pair():
    net = build_network("sequential", input_shape=SHAPE, num_classes=CLASSES, seed=3, layers=LAYERS)
    net.eval()
    x = jax.random.normal(jax.random.key(0), (4, *SHAPE))
    return net, _twin(net), x


@pytest.mark.parametrize("rule,method", [("deconvnet", Deconvolution), ("guided", GuidedBackprop)])
def test_projections_match_captum(pair, rule, method):
    net, twin, x = pair
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    classes = np.array([0, 2, 4, 1])
    np.testing.assert_allclose(np.asarray(net(x)), twin(tx).detach().numpy().copy(), atol=1e-5)  # the same net
    ours = interpret.projections(net, x, rule, classes=classes)
    theirs = method(twin).attribute(tx, target=torch.from_numpy(classes)).detach().numpy().transpose(0, 2, 3, 1)
    assert ours.shape == x.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    vanilla = interpret.projections(net, x, "gradient", classes=classes)
    assert not np.allclose(ours, vanilla, atol=1e-6)  # the rule changed the pass back


@pytest.mark.parametrize("rule", ["deconvnet", "guided"])
def test_rectified_projections_are_non_negative_below_a_relu(rule):
    # A ReLU right on the input: what reaches the pixels is the rectified signal, never negative,
    # while the plain gradient through the same net has both signs.
    net = build_network("sequential", input_shape=SHAPE, num_classes=CLASSES, seed=1, layers=["relu", *LAYERS])
    net.eval()
    x = jax.random.normal(jax.random.key(1), (6, *SHAPE))
    classes = np.arange(6) % CLASSES
    assert interpret.projections(net, x, rule, classes=classes).min() >= 0
    assert interpret.projections(net, x, "gradient", classes=classes).min() < 0


@pytest.mark.slow
def test_unit_projection_sets_the_rest_of_the_layer_to_zero(pair):
    net, _, x = pair
    units, positions = np.array([1, 3, 0, 2]), np.array([[0, 0], [2, 1], [5, 5], [3, 4]])
    ours = interpret.projections(net, x, "gradient", layer="conv2", units=units, positions=positions)

    def activation(px):  # the unit's value, straight from the layers below it
        a = net.conv2(net.pool1(net.conv0(px)))
        return a[jnp.arange(4), positions[:, 0], positions[:, 1], units].sum()

    np.testing.assert_allclose(ours, np.asarray(jax.grad(activation)(x)), rtol=1e-5, atol=1e-7)
    # a unit of conv2 at (r, c) sees a 3x3 window of pool1, i.e. 8x8 pixels at most: nothing outside it moves
    assert not ours[0, 8:].any() and not ours[0, :, 8:].any()


@pytest.mark.slow
def test_smoothgrad_without_noise_is_the_gradient_and_of_a_linear_model_the_weights():
    net = build_network("linear", input_shape=(6, 5, 1), num_classes=3, seed=0)
    x = jax.random.uniform(jax.random.key(2), (2, 6, 5, 1))
    classes = np.array([2, 0])
    weights = np.abs(np.asarray(net.fc1.kernel[...])[:, classes].T).reshape(2, 6, 5)
    # the gradient of a linear score is the same at every noisy copy
    np.testing.assert_allclose(interpret.saliency(net, x, classes, samples=8), weights, rtol=1e-5)
    conv = build_network("sequential", input_shape=SHAPE, num_classes=CLASSES, seed=3, layers=LAYERS)
    px = jax.random.uniform(jax.random.key(3), (2, *SHAPE))
    np.testing.assert_allclose(interpret.saliency(conv, px, classes, samples=3, noise=0.0),
                               interpret.saliency(conv, px, classes), rtol=1e-5)
    assert not np.allclose(interpret.saliency(conv, px, classes, samples=3), interpret.saliency(conv, px, classes))
