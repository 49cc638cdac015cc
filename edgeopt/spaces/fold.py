"""Fold BatchNorm into the conv/linear before it, as every deployment runtime does.

Quantizing after folding is what makes the PyTorch model's integer weights the deployed ones.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeopt.layers import COMPRESSIBLE


def set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.BatchNorm2d) -> None:
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(factor.reshape(shape))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = beta + (bias - bn.running_mean) * factor
    layer.bias = nn.Parameter(new_bias)


def fold_batchnorm(model: nn.Module, graph) -> list[str]:
    """Fold every BatchNorm whose only input is a conv/linear used by nothing else.

    `graph` is the model's Torch-Pruning dependency graph (it knows producers and consumers).
    Returns the names of the BatchNorm layers folded (now Identity).
    """
    names = {m: n for n, m in model.named_modules()}
    folded = []
    for module, node in list(graph.module2node.items()):
        if not isinstance(module, nn.BatchNorm2d) or module not in names or len(node.inputs) != 1:
            continue
        producer = node.inputs[0]
        layer = producer.module
        if not isinstance(layer, COMPRESSIBLE) or len(producer.outputs) != 1 or layer not in names:
            continue
        if isinstance(layer, nn.Linear) or module.running_var is None:
            continue
        _fold_into(layer, module)
        set_submodule(model, names[module], nn.Identity())
        folded.append(names[module])
    return folded
