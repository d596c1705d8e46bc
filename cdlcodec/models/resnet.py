"""ResNets with torchvision's module layout, so that its state_dicts (and those of CIFAR ports that
follow it, e.g. chenyaofo/pytorch-cifar-models) load with strict=True.

ResNet-18: torchvision.models.resnet18 (7x7 stem, max pool, 64-128-256-512, 2 blocks each).
ResNet-20: the CIFAR variant of He et al. (3x3 stem, 16-32-64, 3 blocks each, 1x1 conv + BN shortcuts).
"""
from __future__ import annotations

from ..optional import require
require("torch", "the built-in models")
import torch
from torch import nn


def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        # torchvision calls `relu` twice; a second module (no state: state_dicts load as before) lets
        # cdlcodec.cdl.convert give the block output its own activation quantizer, in place.
        self.relu_out = nn.ReLU(inplace=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu_out(out + identity)


class _ResNet(nn.Module):
    # the graph is exported with free batch, height and width: global pooling makes any size work
    onnx_dynamic_axes = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}}

    def __init__(self, stem: nn.Module, widths: tuple[int, ...], blocks: int, num_classes: int):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = stem
        inplanes = widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(*[BasicBlock(inplanes if b == 0 else planes, planes, stride if b == 0 else 1)
                                    for b in range(blocks)])
            setattr(self, f"layer{i + 1}", layer)
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        self.layers = len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    @staticmethod
    def config_from_shapes(shapes: dict) -> dict:
        """The class count a checkpoint was trained for (fine-tuned heads differ from 1000 / 10)."""
        return {"num_classes": shapes["fc.weight"][0]} if len(shapes.get("fc.weight", ())) == 2 else {}


class ResNet18(_ResNet):
    example_input_shape = (1, 3, 224, 224)

    def __init__(self, num_classes: int = 1000):
        stem = (nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        super().__init__(stem, (64, 128, 256, 512), 2, num_classes)


class ResNet20(_ResNet):
    """`in_channels=1` (architecture "resnet20:in_channels=1") takes grey digits (resnet20-mnist)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        stem = (_conv3x3(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Identity())
        super().__init__(stem, (16, 32, 64), 3, num_classes)
        self.example_input_shape = (1, in_channels, 32, 32)

    @staticmethod
    def config_from_shapes(shapes: dict) -> dict:
        """The class count and the input channels (1 for resnet20-mnist checkpoints)."""
        config = _ResNet.config_from_shapes(shapes)
        stem = shapes.get("conv1.weight", ())
        return {**config, "in_channels": stem[1]} if len(stem) == 4 else config
