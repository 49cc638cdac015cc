"""Tiny models with the structures users bring: residual, depthwise, concat, squeeze-excite."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 4, 1)
        self.fc2 = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class TinyNet(nn.Module):
    """Stem, a residual block, an inverted-residual depthwise block with SE, a concat, a head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.res1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False),
                                nn.BatchNorm2d(32), nn.ReLU())
        self.se = SqueezeExcite(32)
        self.project = nn.Sequential(nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.branch_a = nn.Conv2d(24, 16, 1)
        self.branch_b = nn.Conv2d(24, 16, 3, padding=1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.res1(x))
        x = self.project(self.se(self.dw(self.expand(x))))
        x = torch.cat([torch.relu(self.branch_a(x)), torch.relu(self.branch_b(x))], dim=1)
        return self.head(x.mean((2, 3)))


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet().eval()
    # Non-trivial BatchNorm statistics, so folding is tested for real.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture
def example() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 16, 16)


@pytest.fixture
def calib() -> list[torch.Tensor]:
    torch.manual_seed(2)
    return [torch.randn(8, 3, 16, 16) for _ in range(3)]


# The coverage tests print, at the end of the run, each family's agreement with onnxruntime and
# its largest score difference (tests/spaces/test_coverage.py). They travel as the reports' user
# properties, which pytest-xdist brings back from its worker processes.
COVERAGE_PROPERTY = "coverage"


def pytest_configure(config) -> None:
    # Under pytest-xdist each of the workers gets one thread: the workers are the parallelism.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def coverage_log(request):
    """Lines a test adds here are printed in the run's summary, passed or failed."""
    lines: list[str] = []
    yield lines
    if lines:
        request.node.user_properties.append((COVERAGE_PROPERTY, "\n".join(lines)))


def pytest_terminal_summary(terminalreporter) -> None:
    seen: dict[str, str] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for key, value in getattr(report, "user_properties", ()):
                if key == COVERAGE_PROPERTY:
                    seen.setdefault(report.nodeid, value)
    if seen:
        terminalreporter.section("coverage: compressed models in onnxruntime against PyTorch")
        for nodeid in sorted(seen):
            for line in seen[nodeid].splitlines():
                terminalreporter.write_line(line)


@pytest.fixture(autouse=True, scope="session")
def edgeopt_cache(tmp_path_factory):
    """Each test session (each xdist worker) keeps edgeopt's shared cache (trained demo models,
    complete sensitivity tables) in a folder of its own: a table an earlier session measured must
    not stand in for the measuring a test checks, and the tests leave ~/.cache/edgeopt alone."""
    before = os.environ.get("EDGEOPT_CACHE")
    os.environ["EDGEOPT_CACHE"] = str(tmp_path_factory.mktemp("edgeopt-cache"))
    yield
    if before is None:
        os.environ.pop("EDGEOPT_CACHE", None)
    else:
        os.environ["EDGEOPT_CACHE"] = before
