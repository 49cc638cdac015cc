"""Input resolution: one model-level knob, the share of the given input size the model runs at.

EdgeCompress couples width, depth and input resolution ("compound shrinking"): on most
convolutional networks a smaller input cuts latency more per point of accuracy than thinner
layers do, and it needs no change to the weights. A plan's `input_scale` picks the size; the
compressed model carries it as a forward pre-hook (`edgeopt.input_size`) that resizes whatever
full-size input it is given, so that calibration, the proxy, fine-tuning and a user's own PyTorch
code all feed it the data as it is. Costs, latency and export take the model at its own size: the
exported ONNX expects the reduced image, and its metadata says how to make it. This module says
which sizes a model may take.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn


log = logging.getLogger(__name__)


def total_stride(full_hw: tuple[int, int], layers) -> int:
    """How much the network downsamples: the full input's height over the smallest feature map a
    spatial convolution (kernel or stride above 1) makes. 1x1 convolutions are left out: a
    squeeze-excite gate's run on a pooled 1x1 map, which says nothing of the strides."""
    outputs = [math.ceil(layer.input_hw[0] / layer.stride[0]) for layer in layers
               if layer.kind != "linear" and (max(layer.kernel) > 1 or max(layer.stride) > 1)]
    smallest = min(outputs, default=full_hw[0])
    return max(1, full_hw[0] // max(1, smallest))


def size_multiple(full_hw: tuple[int, int], stride: int) -> int:
    """What input sizes are rounded to: the network's total stride (every feature map whole), or
    the largest power of two below it that is at most an eighth of the input, where the input is
    small for the stride (a 64x64 input to a stride-32 network: multiples of 8, not 32, or the
    scales would collapse into one or two sizes)."""
    finest = max(1, min(full_hw) // 8)
    multiple = 1
    while multiple * 2 <= min(stride, finest):
        multiple *= 2
    return stride if stride <= finest else multiple


def scaled_size(full_hw: tuple[int, int], scale: float, multiple: int) -> tuple[int, int]:
    """`scale` of the full size, rounded to the nearest multiple of `multiple` (ties down: the
    smaller, faster size); at least one multiple."""
    def one(n: int) -> int:
        if scale >= 1.0 or multiple > n:
            return n
        return max(multiple, math.floor(n * scale / multiple + 0.5 - 1e-9) * multiple)
    return one(full_hw[0]), one(full_hw[1])


def supported_sizes(model: nn.Module, example: torch.Tensor, scales: tuple[float, ...], *,
                    multiple: int) -> tuple[dict[float, tuple[int, int]], dict[float, str]]:
    """The input size of each scale the model runs at (scale 1 always: the given size), and why
    each other scale is left out: its rounded size is one a larger scale already gives, or the
    model does not run there (a fixed position embedding, a Linear after a flatten). The model
    is run on `example`'s copy resized (a structure copy where the model allows). `multiple`
    is the network's total stride (`total_stride`); sizes are rounded as `size_multiple` says."""
    from edgeopt.spaces.space import structure_copy

    full = (int(example.shape[-2]), int(example.shape[-1]))
    multiple = size_multiple(full, multiple)
    sizes: dict[float, tuple[int, int]] = {1.0: full}
    left_out: dict[float, str] = {}
    work, x = None, None
    for scale in sorted((s for s in scales if s < 1.0), reverse=True):
        size = scaled_size(full, scale, multiple)
        if size in sizes.values():
            left_out[scale] = f"rounds to {size[0]}x{size[1]} (multiples of {multiple}), as a larger scale does"
            continue
        if work is None:
            work, x = structure_copy(model, example[:1])
        try:
            with torch.no_grad():
                work(torch.zeros((1, x.shape[1], *size), dtype=x.dtype, device=x.device))
        except Exception as exc:  # noqa: BLE001 -- any failure means the model cannot take that size
            why = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            left_out[scale] = f"the model does not run at {size[0]}x{size[1]} ({why})"
            continue
        sizes[scale] = size
    for scale, why in left_out.items():
        log.info("Input scale %g is left out of the search space: %s.", scale, why)
    return dict(sorted(sizes.items(), reverse=True)), left_out




def model_input_sizes(model: nn.Module, example: torch.Tensor, layers, scales: tuple[float, ...]
                      ) -> dict[float, tuple[int, int]]:
    """`supported_sizes` at the rounding the traced `layers` (LayerSpecs) call for."""
    full = (int(example.shape[-2]), int(example.shape[-1]))
    sizes, _ = supported_sizes(model, example, scales, multiple=total_stride(full, layers))
    return sizes
