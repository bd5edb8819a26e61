"""The model registry every family module registers its presets in, and the inputs they are designed for."""

from cnncli.registry import Registry

MODELS = Registry("model")

# The input a model is shown with when `cnncli summary NAME` gets no --input: (H, W, C), classes.
IMAGENET_INPUT = ((224, 224, 3), 1000)
CIFAR_INPUT = ((32, 32, 3), 10)
MNIST_INPUT = ((28, 28, 1), 10)
DEFAULT_INPUTS: dict[str, tuple[tuple[int, int, int], int]] = {}
