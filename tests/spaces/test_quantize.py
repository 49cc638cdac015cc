"""The integer layer computes what onnxruntime's integer kernels compute, integer for integer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeopt import LayerPlan
from edgeopt.spaces.quantize import accumulation_bounds, calibrate, compress_module, integer_accumulate


def _reference(layer, x: torch.Tensor) -> np.ndarray:
    """QLinearMatMul by the book: exact int64 accumulation plus the int32 bias, float32
    multiplier scale_x * scale_w / scale_y, round half to even, clamp to uint8."""
    sx, zx = np.float32(layer.input_range.scale), int(layer.input_range.zero_point)
    sy, zy = np.float32(layer.output_range.scale), int(layer.output_range.zero_point)
    sw = layer.weight_scale().numpy().astype(np.float32)
    x_int = np.clip(np.rint(x.numpy() / sx) + zx, 0, 255).astype(np.int64) - zx
    w_int = np.rint(layer.weight.detach().numpy() / sw[:, None]).astype(np.int64)
    b_int = np.rint(layer.effective_bias().detach().numpy() / (sx * sw)).astype(np.int64)
    acc = x_int @ w_int.T + b_int
    multiplier = (sx * sw / sy).astype(np.float32)
    q = np.clip(np.rint(acc.astype(np.float32) * multiplier), -zy, 255 - zy)
    return (q * sy).astype(np.float32)


@pytest.mark.parametrize("inputs", [64, 1_000, 20_000])  # one float32 pass, two halves, float64
def test_integer_layer_matches_the_integer_kernel_exactly(inputs):
    torch.manual_seed(0)
    linear = nn.Linear(inputs, 6)
    with torch.no_grad():  # weights at +-max: every weight is +-127, the largest partial sums
        linear.weight.copy_(torch.sign(torch.randn_like(linear.weight)))
        linear.bias.uniform_(-3, 3)
    layer = compress_module(linear, LayerPlan(w_bits=8, a_bits=8)).eval()
    calibrate(layer, [torch.randn(16, inputs) * 2 for _ in range(2)])
    x = torch.randn(32, inputs) * 2
    with torch.no_grad():
        got = layer(x).numpy()
    np.testing.assert_array_equal(got, _reference(layer, x))
    assert len(np.unique(got)) > 20  # the outputs span the range, not one clamped value


@pytest.mark.parametrize("inputs", [1_000, 20_000])  # two halves, float64
def test_integer_accumulation_is_exact_where_float32_is_not(inputs):
    # Inputs near 255 and weights of +127 make partial sums far above 2^24, where a plain
    # float32 matrix product drops low bits.
    generator = torch.Generator().manual_seed(0)
    x_int = torch.randint(200, 256, (8, inputs), generator=generator).float()
    w_int = torch.full((3, inputs), 127.0)
    w_int[1, ::3] = -127.0
    bias = torch.tensor([5.0, -(2.0**20) - 3, 7.0])
    exact = x_int.long() @ w_int.long().T + bias.long()
    # What the runtime multiplies: the exact int32 sum cast to float32 (round half to even).
    expected = torch.from_numpy(exact.numpy().astype(np.float32))
    assert not torch.equal(torch.nn.functional.linear(x_int, w_int, bias), expected)
    got = integer_accumulate(torch.nn.functional.linear, x_int, w_int, bias, accumulation_bounds(w_int, bias))
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_integer_linear_on_channels_last_input_scales_each_output_channel():
    # ConvNeXt's MLPs are linear layers on (N, H, W, C) tensors: the channel is the last dim.
    torch.manual_seed(0)
    layer = compress_module(nn.Linear(16, 8), LayerPlan(w_bits=8, a_bits=8)).eval()
    calibrate(layer, [torch.randn(4, 3, 3, 16)])
    x = torch.randn(2, 3, 3, 16)
    with torch.no_grad():
        got = layer(x)
    np.testing.assert_array_equal(got.reshape(-1, 8).numpy(), _reference(layer, x.reshape(-1, 16)))
