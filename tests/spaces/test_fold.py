"""BatchNorm folds through the wrappers users' models use (issue 17, point 3)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeopt import SearchSpace, apply_plan, export_onnx
from edgeopt.evaluators.cpu import int8_needs_reduce_range

timm = pytest.importorskip("timm", reason="timm is a test dependency (pip install -e '.[test]')")


def _randomized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_timm_batchnorm_act_folds_and_keeps_its_activation():
    from timm.layers import BatchNormAct2d

    model = _randomized(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    space = SearchSpace.from_model(model, x[:1])
    small = apply_plan(model, space.uniform(), x[:1], space=space)  # no compression: folding alone
    assert not any(isinstance(m, BatchNormAct2d) for m in small.modules())
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-4)
    # The ReLU of a BatchNormAct2d is absorbed by the conv's integer output quantizer.
    calib = [torch.randn(8, 3, 32, 32)]
    quantized = apply_plan(model, space.uniform(w_bits=8, a_bits=8), x[:1], space=space, calib_data=calib)
    absorbed = [n for n, m in quantized.named_modules() if getattr(m, "output_activation", None) == "relu"]
    assert absorbed


def test_frozen_batchnorm_folds():
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    frozen = FrozenBatchNorm2d(8)
    frozen.running_mean.uniform_(-1, 1)
    frozen.weight.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), frozen, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    small = apply_plan(model, SearchSpace.from_model(model, x[:1]).uniform(), x[:1])
    assert isinstance(small[1], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


class ZeroScaled(nn.Module):
    """Two residual branches of one shape whose last BatchNorm scale is zero (timm's
    zero_init_last): their folded weights are equal (all zero), which the ONNX exporter merges."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
                                      for _ in range(2))
        for branch in self.branches:
            nn.init.zeros_(branch[1].weight)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for branch in self.branches:
            x = torch.relu(x + branch(x))
        return self.head(x.mean((2, 3)))


def test_all_zero_folded_weights_export_and_agree(tmp_path):
    torch.manual_seed(0)
    model = ZeroScaled().eval()
    x = torch.randn(8, 3, 8, 8)
    space = SearchSpace.from_model(model, x[:1])
    small = apply_plan(model, space.uniform(w_bits=8, a_bits=8), x[:1], space=space, calib_data=[x],
                       reduce_range=int8_needs_reduce_range())
    assert not small.branches[0][0].weight.any()
    path = export_onnx(small, x[:1], tmp_path / "zero.onnx")
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - small(x).numpy()).max() < 1e-5
