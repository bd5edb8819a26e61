"""PyTorch models with torchvision's exact module names (torchvision itself is not installed here).

ResNet follows torchvision.models.resnet (v1.5: the stride on the bottleneck's 3x3 conv), VGG and
AlexNet torchvision.models.vgg / .alexnet (features / avgpool / classifier); only what the state dict
and the forward pass need is kept.
"""

import torch
from torch import nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VGG_CONFIGS = {"vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG(nn.Module):
    def __init__(self, cfg, batch_norm, num_classes=1000):
        super().__init__()
        layers, channels = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(channels, v, 3, padding=1))
            layers += [nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
            channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class AlexNet(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(True),
                                        nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(True),
                                        nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def resnet18(num_classes=1000):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes=1000):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def vgg11_bn(num_classes=1000):
    return VGG(VGG_CONFIGS["vgg11"], batch_norm=True, num_classes=num_classes)


BUILDERS = {"resnet18": resnet18, "resnet50": resnet50, "vgg11_bn": vgg11_bn, "alexnet": AlexNet}


@torch.no_grad()
def randomized(name: str, input_size: int, seed: int = 0, num_classes: int = 1000) -> nn.Module:
    """torchvision's `name` with random weights and batch-norm statistics, in eval mode.

    BN scales and shifts are drawn at random, the last BN of each residual branch smaller (as with
    torchvision's zero_init_residual, less so) so that activations do not grow through 50 layers; the
    running statistics are then those of a batch of random images in [0, 1] after ImageNet normalization
    (what the tests feed), not the defaults.
    """
    torch.manual_seed(seed)
    model = BUILDERS[name](num_classes)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0.0, 0.2)
            module.momentum = None  # cumulative average: the statistics of the batches seen
        if isinstance(module, (BasicBlock, Bottleneck)):
            last = module.bn3 if isinstance(module, Bottleneck) else module.bn2
            last.weight.uniform_(0.1, 0.4)
    model.train()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model((torch.rand(4, 3, input_size, input_size) - mean) / std)
    return model.eval()


# ----------------------------------------------------------------------------- cnncli's small models in torch
# The adversarial tests run torchattacks on the same weights as cnncli: LeNet-5 and the CIFAR ResNets
# (option-A shortcuts), built from a cnncli model's state. Their inputs are pixels in [0, 1]; the
# normalization is the first op, as in cnncli.


class Normalized(nn.Module):
    """(x - mean) / std per channel in front of a network."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


class LeNet5(nn.Module):
    """cnncli's `lenet5`: conv5x5(6, pad 2) - relu - max2 / conv5x5(16) - relu - max2 / fc120 - fc84 - fc."""

    def __init__(self, channels=1, num_classes=10, side=28):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        flat = 16 * ((side // 2 - 4) // 2) ** 2
        self.fc1, self.fc2, self.fc3 = nn.Linear(flat, 120), nn.Linear(120, 84), nn.Linear(84, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class BasicBlockA(nn.Module):
    """The CIFAR ResNets' basic block with the paper's option-A shortcut (subsample, zero-pad channels)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.extra = stride, planes - inplanes

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        short = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            short = nn.functional.pad(short, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return torch.relu(out + short)


class CifarResNet(nn.Module):
    """cnncli's resnet20/32/...: 3x3 stem, three stages of n basic blocks (16, 32, 64 wide), average pool, fc."""

    def __init__(self, depth=20, channels=1, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, inplanes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlockA(inplanes, planes, 2 if i > 0 and j == 0 else 1))
                inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


@torch.no_grad()
def from_cnncli(model, arch: str, input_shape, num_classes: int) -> nn.Module:
    """The torch twin of a cnncli model (a train.state.Model of `lenet5` or a CIFAR `resnetN`), in eval mode."""
    import numpy as np
    from flax import nnx
    from flax.traverse_util import flatten_dict

    from cnncli.transfer.import_weights import resnet_mapping

    h, _, c = input_shape
    state = {**flatten_dict(nnx.to_pure_dict(model.params)), **flatten_dict(nnx.to_pure_dict(model.rest))}
    arrays = {k: np.asarray(v, np.float32) for k, v in state.items()}
    mean, std = arrays.pop(("normalize", "mean")), arrays.pop(("normalize", "std"))
    tensors = {}
    if arch == "lenet5":
        net = LeNet5(c, num_classes, h)
        for (_, layer, leaf), value in arrays.items():
            if leaf == "bias":
                tensors[f"{layer}.bias"] = value
            elif value.ndim == 4:
                tensors[f"{layer}.weight"] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            elif layer == "fc1":  # cnncli flattens H, W, C; torch C, H, W
                side = int(round((value.shape[0] // 16) ** 0.5))
                tensors["fc1.weight"] = value.reshape(side, side, 16, -1).transpose(3, 2, 0, 1).reshape(
                    value.shape[1], -1)
            else:
                tensors[f"{layer}.weight"] = value.T
    else:
        net = CifarResNet(int(arch.removeprefix("resnet")), c, num_classes)
        for path, (key, _) in resnet_mapping(arrays, {}, None).items():
            value = arrays[path]
            tensors[key] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value
    net.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in tensors.items()}, strict=False)
    missing = set(net.state_dict()) - set(tensors) - {k for k in net.state_dict() if k.endswith("num_batches_tracked")}
    if missing:
        raise ValueError(f"no cnncli weights for {sorted(missing)}")
    return Normalized(net, mean.tolist(), std.tolist()).eval()
