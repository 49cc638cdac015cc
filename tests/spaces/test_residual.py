"""Integer residual sums: found on the model's own blocks, one scale along each stream, and run by
onnxruntime as QLinearAdd with exactly the PyTorch model's integers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

from edgeopt import LayerPlan, ModelPlan, SearchSpace, apply_plan, export_onnx
from edgeopt.evaluators.cpu import int8_needs_reduce_range
from edgeopt.spaces.quantize import compressed_layers
from edgeopt.spaces.residual import sum_quantizers


def _runtime_ops(path, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def _compare_scores(small: nn.Module, path, *, exact: bool) -> None:
    """onnxruntime's scores on 64 random inputs: the PyTorch model's integers where every layer is
    an integer one (`exact`), else its top-1 and its scores to float rounding."""
    torch.manual_seed(5)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        ref = small(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    if exact:
        np.testing.assert_array_equal(got, ref)
    else:
        assert (got.argmax(1) == ref.argmax(1)).all()
        # A tie in requantizing a float layer's output may round one activation a step the other
        # way; only the few inputs it reaches move, and by that one step's effect. A wrong scale
        # or zero point would move every input.
        tolerance = 1e-5 * np.abs(ref).max()
        assert np.isclose(got, ref, rtol=0, atol=tolerance).all(1).mean() >= 0.9
        np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())


def _resnet18_int8(plan_change=None):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    example = torch.randn(2, 3, 32, 32)
    calib = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    space = SearchSpace.from_model(model, example)
    plan = space.uniform(w_bits=8, a_bits=8)
    if plan_change is not None:
        plan = ModelPlan(layers={**plan.layers, **plan_change})
    # Without VNNI onnxruntime's u8 x s8 kernels saturate on full-range weights: 7-bit weights
    # there, as optimize gives them, or the integers cannot agree.
    return apply_plan(model, plan, example, calib_data=calib, space=space,
                      reduce_range=int8_needs_reduce_range()), example


def test_resnet_sums_chain_along_each_stage_on_one_scale():
    small, _ = _resnet18_int8()
    sums = sum_quantizers(small)
    # Every BasicBlock, not the ReLU module each block calls twice; the first block's shortcut is
    # the stem through its max pool, the first of each later stage a projection.
    assert list(sums) == [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)]
    assert sums["layer1.0"].inputs == ("layer1.0.conv2", "conv1")
    assert sums["layer1.1"].inputs == ("layer1.1.conv2", "layer1.0")
    assert sums["layer2.0"].inputs == ("layer2.0.conv2", "layer2.0.downsample.0")
    layers = compressed_layers(small)
    for stage in (1, 2, 3, 4):
        members = [sums[f"layer{stage}.0"], sums[f"layer{stage}.1"],
                   layers[f"layer{stage}.0.conv2"].output_range, layers[f"layer{stage}.1.conv2"].output_range]
        members.append(layers["conv1"].output_range if stage == 1 else layers[f"layer{stage}.0.downsample.0"].output_range)
        assert len({float(m.scale) for m in members}) == 1, stage
        # The sum follows a ReLU: its range starts at 0.
        assert int(sums[f"layer{stage}.1"].zero_point) == 0
    assert float(sums["layer1.0"].scale) != float(sums["layer2.0"].scale)  # a projection starts a new one
    # The layers reading a sum quantize their input exactly as the sum is quantized.
    for reader in ("layer2.0.conv1", "layer2.0.downsample.0"):
        rng = layers[reader].input_range
        assert (float(rng.scale), int(rng.zero_point)) == (float(sums["layer1.1"].scale), int(sums["layer1.1"].zero_point))


def test_integer_sums_run_as_qlinearadd_with_the_same_integers(tmp_path):
    small, example = _resnet18_int8()
    path = export_onnx(small, example, tmp_path / "m.onnx")
    ops = _runtime_ops(path, tmp_path)
    assert ops.count("QLinearAdd") == 8 and "Sum" not in ops and "Add" not in ops
    # Nothing is dequantized between the stem and the classifier: one quantizer for the input.
    assert ops.count("QuantizeLinear") == 1 and "DequantizeLinear" not in ops
    _compare_scores(small, path, exact=True)


def test_a_float_branch_keeps_its_sum_float_and_breaks_the_chain(tmp_path):
    small, example = _resnet18_int8({"layer2.1.conv2": LayerPlan()})
    sums = sum_quantizers(small)
    assert "layer2.1" not in sums and "layer2.0" in sums
    assert sums["layer3.0"].inputs == ("layer3.0.conv2", "layer3.0.downsample.0")
    path = export_onnx(small, example, tmp_path / "m.onnx")
    ops = _runtime_ops(path, tmp_path)
    assert ops.count("QLinearAdd") == 7
    _compare_scores(small, path, exact=False)  # a float layer's output is requantized: ties may round apart


class _Block(nn.Module):
    """A block whose sum has no ReLU after it and feeds a float consumer too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Block()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(torch.sigmoid(x).mean((2, 3)))


def test_a_sum_without_relu_gets_its_zero_point_and_training_passes_gradients():
    torch.manual_seed(0)
    model, example = _Net().eval(), torch.randn(2, 3, 8, 8)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    small = apply_plan(model, SearchSpace.from_model(model, example).uniform(w_bits=8, a_bits=8), example,
                       calib_data=calib)
    sums = sum_quantizers(small)
    assert list(sums) == ["block"] and sums["block"].inputs == ("stem", "block.conv")  # in the order added
    assert 0 < int(sums["block"].zero_point) < 255  # the sum has negative values: no ReLU after it
    with torch.no_grad():
        out = small.block(small.stem(example))
    grid = (out / sums["block"].scale).round() * sums["block"].scale
    torch.testing.assert_close(out, grid, rtol=0, atol=1e-6)  # what the block returns is on the sum's grid
    small.train()
    small(example).sum().backward()
    assert small.stem.weight.grad is not None and small.stem.weight.grad.abs().sum() > 0  # straight through


@pytest.mark.parametrize("arch", ["mobilenet_v2"])
def test_inverted_residual_sums_agree_with_onnxruntime(arch, tmp_path):
    torch.manual_seed(1)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    example = torch.randn(2, 3, 32, 32)
    calib = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    small = apply_plan(model, SearchSpace.from_model(model, example).uniform(w_bits=8, a_bits=8), example,
                       calib_data=calib)
    assert len(sum_quantizers(small)) == 10  # the ten blocks with an identity shortcut
    path = export_onnx(small, example, tmp_path / "m.onnx")
    assert _runtime_ops(path, tmp_path).count("QLinearAdd") == 10
    _compare_scores(small, path, exact=True)
