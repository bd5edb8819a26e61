#!/usr/bin/env python3
"""PyTorch peer: the same reference CNNs, timed the same way, for side-by-side ratios.

Kept in the project (the PyTorch peer of `cnncli benchmark`); torch is a test-only extra, never imported by cnncli.

This is what a user would pick instead of cnncli (torchvision/timm-style eager PyTorch).
It prints one JSON line with the schema that `cnncli benchmark --json` must also print:

  {"impl": "torch", "model": "resnet18", "mode": "train", "batch": 128,
   "img_per_s": 38.1, "steps": 10, "threads": 2, "device": "cpu"}

Models (all 10 classes):
  lenet5    1x28x28  conv5(6,pad2)-relu-maxpool2 / conv5(16)-relu-maxpool2 / fc120-relu / fc84-relu / fc10
  resnet18  3x32x32  CIFAR ResNet-18: conv3x3(64)-BN-ReLU stem, 4 stages of 2 basic blocks
                     (64,128,256,512; stride 2 at stages 2-4, 1x1 conv+BN projection), global avg pool, fc10
  vgg16     3x32x32  VGG-16 config D with BN after every conv, 5 max-pools, fc10 on 512 features

Modes:
  train   one SGD step (lr 0.1, momentum 0.9, nesterov, weight decay 5e-4) on cross-entropy
  eval    forward pass in inference mode, no grad
  fgsm    one FGSM example per image: forward + input gradient + x + eps*sign(g), clipped to [0,1]

Usage: python torch_peer.py --model resnet18 --batch-size 128 --mode train [--channels-last] [--steps N]
                            [--device cpu|cuda] [--bf16] [--compile]
On a GPU the strongest peer is `--device cuda --channels-last --bf16 --compile` (cudnn autotuning is on
for CUDA; torch.compile's compilation happens in the untimed warm-up steps).
Needs: pip install torch (CPU build is enough); numpy is not required.
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class LeNet5(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5, padding=2)
        self.c2 = nn.Conv2d(6, 16, 5)
        self.f1 = nn.Linear(16 * 5 * 5, 120)
        self.f2 = nn.Linear(120, 84)
        self.f3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = x.flatten(1)
        return self.f3(F.relu(self.f2(F.relu(self.f1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


class ResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
            blocks.append(BasicBlock(cin, cout, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        layers, cin = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


MODELS = {"lenet5": (LeNet5, (1, 28, 28)), "resnet18": (ResNet18, (3, 32, 32)), "vgg16": (VGG16, (3, 32, 32))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--batch-size", dest="batch", type=int, default=128)
    p.add_argument("--mode", choices=["train", "eval", "fgsm"], default="train")
    p.add_argument("--steps", type=int, default=0, help="timed steps (0: about 10 s of work)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the step (compiled during warm-up)")
    a = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    cls, shape = MODELS[a.model]
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what a tuned GPU training script sets
    model = cls().to(dev)
    x = torch.rand(a.batch, *shape, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def eval_step():
        model.eval()
        with torch.no_grad():
            model(x).argmax(1)

    def fgsm_step(eps=0.1):
        model.eval()
        xa = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        (g,) = torch.autograd.grad(loss, xa)
        (xa + eps * g.sign()).clamp_(0, 1)

    inner = {"train": train_step, "eval": eval_step, "fgsm": fgsm_step}[a.mode]
    if a.compile:
        model = torch.compile(model)
        a.warmup = max(a.warmup, 5)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            inner()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(a.warmup):
        step()
    steps = a.steps
    if steps <= 0:  # calibrate to about 10 s
        t = time.perf_counter()
        step()
        steps = max(3, int(10.0 / max(time.perf_counter() - t, 1e-4)))
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t
    impl = "torch" + ("-cl" if a.channels_last else "") + ("-compiled" if a.compile else "")
    print(json.dumps({"impl": impl, "model": a.model, "mode": a.mode,
                      "batch": a.batch, "img_per_s": round(steps * a.batch / dt, 2), "steps": steps,
                      "threads": torch.get_num_threads(), "device": a.device,
                      "dtype": "bfloat16" if a.bf16 else "float32"}))


if __name__ == "__main__":
    main()
