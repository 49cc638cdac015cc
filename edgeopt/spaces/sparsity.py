"""Unstructured sparsity: a share of a layer's weights, the smallest in magnitude, zeroed.

No CPU runtime here runs a dense-format model faster for its zeros (onnxruntime's Conv and
MatMul kernels, int8 or float, multiply every weight), so the knob buys stored size only: the
search offers it where a size budget is set (`edgeopt.search.optimize.target_knobs`), and
`edgeopt.evaluators.cost.layer_bytes` counts what a sparse format stores. The mask is chosen once,
on the weights the layer has when it is compressed (after channel pruning), and stays fixed
through fine-tuning (the zeros stay zeros; the kept weights train), as TF-MOT's and TI's
magnitude pruning keep theirs between pruning steps.
"""

from __future__ import annotations

import math

import torch


def kept_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a layer at `sparsity` keeps (at least one)."""
    return max(1, math.ceil(numel * (1.0 - sparsity)))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0/1 mask of the weight's shape that keeps its kept_count(...) largest |w| and zeroes the
    rest (ties broken by position, so the count is exact)."""
    flat = weight.detach().abs().reshape(-1)
    mask = torch.zeros_like(flat)
    mask[flat.topk(kept_count(flat.numel(), sparsity)).indices] = 1.0
    return mask.reshape(weight.shape).to(weight.dtype)
