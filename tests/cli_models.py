"""Model factories for the command-line tests (`--model tests.cli_models:NAME`)."""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import TinyNet


def tiny(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return TinyNet(num_classes=num_classes).eval()


class Untraceable(nn.Module):
    """Returns a Python number: nothing to trace a graph through."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor):
        return float(self.fc(x.mean((2, 3))).sum())


class NeedsBigInput(nn.Module):
    """A 9x9 kernel without padding: inputs below 9x9 cannot pass."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 9)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class NoLayers(nn.Module):
    """Scores from a fixed projection of the pooled input: no Conv2d or Linear to compress."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("projection", torch.randn(3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) @ self.projection
