"""What deployment runtimes fuse into a conv/linear: the BatchNorm after it (folded into its
weights) and the ReLU/ReLU6 after it (absorbed by an output quantizer whose range starts at 0).

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


# Torch-Pruning names functional ops after their autograd node.
_ACTIVATION_OPS = {"ReluBackward0": "relu", "HardtanhBackward0": "relu6"}


def following_activations(model: nn.Module, graph, folded: list[str]) -> dict[str, str]:
    """{layer name: "relu" | "relu6"} for each conv/linear whose output (past a folded BatchNorm)
    goes to nothing but one ReLU or ReLU6.

    Such a layer's integer output can be quantized after its activation: the uint8 range then
    starts at 0, the activation becomes a no-op, and onnxruntime chains the integer kernels
    without a float round trip between them. A Hardtanh counts as ReLU6 only when every Hardtanh
    module of the model is one (Torch-Pruning's graph does not carry the bounds).
    """
    names = graph._module2name  # as traced: a folded BatchNorm is no longer in the model
    hardtanhs = [m for m in model.modules() if isinstance(m, nn.Hardtanh)]
    relu6_only = bool(hardtanhs) and all((m.min_val, m.max_val) == (0.0, 6.0) for m in hardtanhs)
    folded_set = set(folded)
    found = {}
    for module, node in graph.module2node.items():
        if not isinstance(module, COMPRESSIBLE) or module not in names:
            continue
        if model.get_submodule(names[module]) is not module:
            continue  # replaced since the graph was built
        outputs = node.outputs
        if len(outputs) == 1 and names.get(outputs[0].module) in folded_set:
            outputs = outputs[0].outputs  # the BatchNorm is an Identity now
        if len(outputs) != 1:
            continue
        kind = next((act for grad_fn, act in _ACTIVATION_OPS.items() if f"({grad_fn})" in str(outputs[0].name)), None)
        if kind == "relu" or (kind == "relu6" and relu6_only):
            found[names[module]] = kind
    return found
