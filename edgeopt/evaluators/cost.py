"""What a model costs: MACs (thop), effective MACs under N:M, parameters and stored bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import thop
import torch
from thop.vision.basic_hooks import count_convNd, count_linear
from torch import nn

from edgeopt.canonical import canonical
from edgeopt.layers import trace_layers
from edgeopt.model_copy import copy_model
from edgeopt.plan import FLOAT_BITS
from edgeopt.spaces.quantize import CompressedConv2d, CompressedLinear, CompressedMixin
from edgeopt.spaces.sparsity import kept_count
from edgeopt.input_size import input_for


@dataclass(frozen=True, kw_only=True)
class Cost:
    """Per-sample costs. Latency is filled in by a target (`latency_source` says how)."""

    macs: int  # dense, as thop counts the (physically pruned) model
    effective_macs: int  # N:M layers counted at N/M of their MACs
    params: int
    bytes: int  # stored size: bit widths, N:M and sparse values plus where they are, scales, float rest
    latency_ms: float | None = None
    latency_source: str | None = None  # "lut", "model" or "measured"
    latency_spread_ms: float | None = None  # measured only: interquartile range


def layer_bytes(layer: CompressedMixin) -> int:
    """Bytes a compressed layer stores: weights at their bit width, N:M as values plus indices,
    unstructured sparsity as the kept values plus a bitmask of where they are (one bit per
    weight: below 1/bits of zeros, a list of positions would take more)."""
    numel = layer.weight.numel()
    bits = layer.w_bits
    if layer.nm is not None:
        kept = math.ceil(numel * layer.nm.n / layer.nm.m)
        index_bits = math.ceil(math.log2(layer.nm.m))  # position of each kept value in its block
        weight_bits = kept * (bits + index_bits)
    elif layer.sparsity:
        weight_bits = min(numel * bits, kept_count(numel, layer.sparsity) * bits + numel)
    else:
        weight_bits = numel * bits
    total = math.ceil(weight_bits / 8)
    if bits not in FLOAT_BITS:
        total += 4 * layer.weight.shape[0]  # one float scale per output channel
    if layer.bias is not None:
        total += 4 * layer.bias.numel()  # fp32, or int32 in an integer layer
    if layer.input_range is not None:
        total += 5  # activation scale and zero point
    if layer.output_range is not None:
        total += 5
    return total


def model_bytes(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        if isinstance(module, CompressedMixin):
            total += layer_bytes(module)
            continue
        for tensor in list(module.parameters(recurse=False)) + [
            b for name, b in module.named_buffers(recurse=False)
            if b is not None and name in ("running_mean", "running_var")
        ]:
            total += tensor.numel() * tensor.element_size()
    return total


def model_cost(model: nn.Module, example_input: torch.Tensor) -> Cost:
    """MACs, parameters and bytes of one sample's forward pass, at the model's own input size
    (a plan's input scale)."""
    one = input_for(model, example_input[:1])
    model = canonical(model)  # MACs of nn.MultiheadAttention's projections count too
    counted = copy_model(model).eval()
    macs, _ = thop.profile(
        counted, inputs=(one,), verbose=False,
        custom_ops={CompressedConv2d: count_convNd, CompressedLinear: count_linear},
    )
    # N:M layers' skipped MACs, from a trace of the layers: only where a layer has a pattern (on
    # NAS-Bench-201's networks the trace was a quarter to a third of the costing: 0.27-0.34 s a
    # network with it, 0.20 s without).
    sparse = any(m.nm is not None for m in model.modules() if isinstance(m, CompressedMixin))
    saved = sum(layer.macs * (1 - layer.nm.density) for layer in trace_layers(model, one)
                if layer.nm is not None) if sparse else 0
    params = sum(p.numel() for p in model.parameters())
    return Cost(macs=int(macs), effective_macs=int(round(macs - saved)), params=params,
                bytes=model_bytes(model))
