"""ResNet-20 for 32x32 inputs (He et al., 2016, section 4.2): the plain-residual base model of
bench/prove.py. Three stages of three basic blocks at 16, 32 and 64 channels; a stage that halves
the resolution widens its shortcut with a 1x1 convolution and BatchNorm (option B), which keeps
every block a module Torch-Pruning and edgeopt's inventory see as ordinary convolutions.

Importable by the CLI from the repository root: `optimize --model bench.cifar_resnet:resnet20`.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None if stride == 1 and cin == cout else _conv_bn(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.conv2(self.relu(self.conv1(x))) + identity)


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(in_channels, 16), nn.ReLU(inplace=True))
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(blocks_per_stage):
                stages.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stages(self.stem(x)).mean((2, 3)))


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(3, num_classes)
