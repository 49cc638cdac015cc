"""What deployment runtimes fuse into a conv/linear: the BatchNorm after it (folded into its
weights) and the ReLU/ReLU6 after it (absorbed by an output quantizer whose range starts at 0).

Quantizing after folding is what makes the PyTorch model's integer weights the deployed ones.

A BatchNorm counts wherever a conv's output goes to it and nowhere else, whatever wraps it:
torch's BatchNorm2d, timm's `BatchNormAct2d` (normalization, dropout, activation in one module)
and the frozen variants of torchvision and timm. What such a module does after normalizing
(timm's dropout and activation) stays in the model in its place.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from edgeopt.layers import COMPRESSIBLE, run_model

log = logging.getLogger(__name__)

_PLAIN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.BatchNorm2d.forward)


def set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _statistics(norm: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """(mean, var, gamma, beta, eps) of a BatchNorm-like module in eval mode, or None if it has none.

    Frozen BatchNorms (torchvision.ops.FrozenBatchNorm2d, timm's FrozenBatchNorm(Act)2d) are not
    torch BatchNorm subclasses but hold the same four tensors as buffers.
    """
    mean, var = getattr(norm, "running_mean", None), getattr(norm, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return None
    gamma, beta = getattr(norm, "weight", None), getattr(norm, "bias", None)
    gamma = gamma if isinstance(gamma, torch.Tensor) else torch.ones_like(mean)
    beta = beta if isinstance(beta, torch.Tensor) else torch.zeros_like(mean)
    return mean, var, gamma, beta, float(getattr(norm, "eps", 1e-5))


def _rest_of(norm: nn.Module) -> nn.Module | None:
    """What a BatchNorm module computes after normalizing, as a module to leave in its place once
    the normalization is folded away; None when that cannot be told (a forward of its own)."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and type(norm).forward in _PLAIN_FORWARDS:
        return nn.Identity()
    is_batchnorm = isinstance(norm, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(norm).__name__
    children = dict(norm.named_children())
    if is_batchnorm and not children and "Frozen" in type(norm).__name__:
        return nn.Identity()  # torchvision's FrozenBatchNorm2d: x * scale + shift
    if is_batchnorm and set(children) == {"drop", "act"}:  # timm's *BatchNormAct2d: then drop, then act
        return nn.Sequential(children["drop"], children["act"])
    return None


def _is_norm(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in type(module).__name__) \
        and _statistics(module) is not None


@torch.no_grad()
def _fold_into(layer: nn.Module, norm: nn.Module) -> None:
    mean, var, gamma, beta, eps = _statistics(norm)
    factor = gamma / torch.sqrt(var + eps)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    layer.weight.mul_(factor.reshape(shape))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(mean)
    layer.bias = nn.Parameter(beta + (bias - mean) * factor)


def _norms_after_layers(model: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, nn.Module]:
    """{norm: conv} for each BatchNorm-like module whose input, in one forward pass, is exactly
    the output of one Conv2d; each module must run once (a shared module cannot be folded)."""
    produced: dict[int, nn.Module] = {}
    inputs: dict[nn.Module, int] = {}
    calls: dict[nn.Module, int] = {}
    keep_alive = []

    def after_layer(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, torch.Tensor):
            produced[id(output)] = module
            keep_alive.append(output)

    def before_norm(module, args):
        calls[module] = calls.get(module, 0) + 1
        if args and isinstance(args[0], torch.Tensor):
            inputs[module] = id(args[0])
            keep_alive.append(args[0])

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_layer))
        elif _is_norm(module):
            handles.append(module.register_forward_pre_hook(before_norm))
    try:
        run_model(model, example_input[:1])
    finally:
        for handle in handles:
            handle.remove()
    pairs = {}
    for norm, tensor in inputs.items():
        layer = produced.get(tensor)
        if layer is not None and calls.get(norm) == 1 and calls.get(layer) == 1:
            pairs[norm] = layer
    return pairs


def fold_batchnorm(model: nn.Module, graph, example_input: torch.Tensor) -> dict[str, nn.Module]:
    """Fold every BatchNorm whose only input is a conv used by nothing else, in place.

    `graph` is the model's Torch-Pruning dependency graph (it knows each conv's consumers).
    Returns {name of the folded BatchNorm: the module left in its place} (Identity, or the
    dropout and activation of a timm BatchNormAct2d).
    """
    names = {m: n for n, m in model.named_modules()}
    folded: dict[str, nn.Module] = {}
    for norm, layer in _norms_after_layers(model, example_input).items():
        node = graph.module2node.get(layer)
        if node is None or len(node.outputs) != 1 or norm not in names or layer not in names:
            continue  # the conv's output also goes elsewhere: folding would change that path
        rest = _rest_of(norm)
        if rest is None:
            log.info("BatchNorm %s is not folded into %s: %s has a forward of its own that edgeopt "
                     "cannot split into normalization and the rest.", names[norm], names[layer],
                     type(norm).__name__)
            continue
        _fold_into(layer, norm)
        set_submodule(model, names[norm], rest)
        folded[names[norm]] = rest
    return folded


# Torch-Pruning names functional ops after their autograd node.
_ACTIVATION_OPS = {"ReluBackward0": "relu", "HardtanhBackward0": "relu6"}


def _activation_module(module: nn.Module) -> str | None:
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.ReLU6) or (isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0.0, 6.0)):
        return "relu6"
    return None


def _absorbed_by_rest(rest: nn.Module) -> str | None:
    """The ReLU/ReLU6 a folded BatchNorm leaves behind, if nothing else remains of it."""
    parts = [m for m in (rest if isinstance(rest, nn.Sequential) else [rest]) if not isinstance(m, (nn.Identity, nn.Dropout))]
    return _activation_module(parts[0]) if len(parts) == 1 else None


def following_activations(model: nn.Module, graph, folded: dict[str, nn.Module]) -> dict[str, str]:
    """{layer name: "relu" | "relu6"} for each conv/linear whose output (past a folded BatchNorm)
    goes to nothing but one ReLU or ReLU6.

    Such a layer's integer output can be quantized after its activation: the uint8 range then
    starts at 0, the activation is a no-op on the result, and onnxruntime chains the integer
    kernels without a float round trip between them. A Hardtanh counts as ReLU6 only when every
    Hardtanh module of the model is one (Torch-Pruning's graph does not carry the bounds).
    """
    names = graph._module2name  # as traced: a folded BatchNorm is no longer in the model
    hardtanhs = [m for m in model.modules() if isinstance(m, nn.Hardtanh)]
    relu6_only = bool(hardtanhs) and all((m.min_val, m.max_val) == (0.0, 6.0) for m in hardtanhs)
    found = {}
    for module, node in graph.module2node.items():
        if not isinstance(module, COMPRESSIBLE) or module not in names:
            continue
        if model.get_submodule(names[module]) is not module:
            continue  # replaced since the graph was built
        outputs = node.outputs
        if len(outputs) == 1 and names.get(outputs[0].module) in folded:
            rest = folded[names[outputs[0].module]]
            if not isinstance(rest, nn.Identity):  # a timm BatchNormAct2d: its activation is inside
                kind = _absorbed_by_rest(rest)
                if kind is not None:
                    found[names[module]] = kind
                continue
            outputs = outputs[0].outputs  # the BatchNorm is an Identity now
        elif len(outputs) == 1 and outputs[0].module not in names and "BatchNormBackward" in str(outputs[0].name):
            # timm's BatchNormAct2d runs F.batch_norm inside: Torch-Pruning sees the functional
            # op first, then the module (mapped to its last op, the activation).
            after = outputs[0].outputs
            if len(after) == 1 and names.get(after[0].module) in folded:
                kind = _absorbed_by_rest(folded[names[after[0].module]])
                if kind is not None:
                    found[names[module]] = kind
            continue
        if len(outputs) != 1:
            continue
        kind = next((act for grad_fn, act in _ACTIVATION_OPS.items() if f"({grad_fn})" in str(outputs[0].name)), None)
        if kind == "relu" or (kind == "relu6" and relu6_only):
            found[names[module]] = kind
    return found
