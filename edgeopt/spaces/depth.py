"""Depth: residual blocks with an identity shortcut, each of which a plan may drop.

EdgeCompress shrinks depth with width and resolution. A block whose output is its own input plus
a branch (`x + f(x)`, perhaps followed by an activation) computes, without the branch, what its
shortcut carries: dropping it leaves `x`. Such blocks are found by watching one forward pass
rather than by knowing module classes, so that torchvision's BasicBlock, Bottleneck,
InvertedResidual, MBConv and CNBlock, timm's blocks and a user's own all count: a module is a
block where its input and output shapes match and, inside its forward, an add takes the very
tensor the module received and its result (through further adds and activations only: a
transformer block adds attention, then its MLP) is what the module returns.
Where modules nest around one such add (a Sequential holding a single block), the innermost is
the block. Dropping one replaces it with `nn.Identity` after pruning, so the channels its
shortcut carries are those of the pruned stream around it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from edgeopt.layers import COMPRESSIBLE

_ADDS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
# What may follow the add before the block returns (elementwise, shape-preserving, no weights).
_PASS_THROUGH = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "hardswish",
                 "hardswish_", "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "dropout", "contiguous",
                 "clone", "__get__"}


class _Ops(TorchFunctionMode):
    """Every torch call of a forward pass: its name, the ids of its tensor inputs and outputs.
    The tensors are kept alive so that no id is reused within the pass."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        self._alive: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self._alive += ins + outs
        self.calls.append((getattr(func, "__name__", str(func)), tuple(map(id, ins)), tuple(map(id, outs))))
        return out


def residual_blocks(model: nn.Module, example_input: torch.Tensor) -> tuple[str, ...]:
    """The names of the blocks of `model` a plan may drop (module order), found on one forward
    pass of a structure copy (see the module docstring)."""
    from edgeopt.spaces.space import structure_copy

    work, x = structure_copy(model, example_input[:1])
    ops = _Ops()
    windows: dict[str, list] = {}
    handles = []
    for name, module in work.named_modules():
        if not name or not any(isinstance(m, COMPRESSIBLE) for m in module.modules()):
            continue

        def before(mod, args, name=name):
            if len(args) == 1 and isinstance(args[0], torch.Tensor):
                windows[name] = [len(ops.calls), args[0]]

        def after(mod, args, output, name=name):
            window = windows.get(name)
            if window is not None and len(window) == 2:
                if isinstance(output, torch.Tensor) and output.shape == window[1].shape:
                    window += [len(ops.calls), output]
                else:
                    del windows[name]

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad(), ops:
            work(x)
    finally:
        for handle in handles:
            handle.remove()
    innermost: dict[int, tuple[int, str]] = {}  # add call -> (window length, module)
    for name, window in windows.items():
        if len(window) != 4:
            continue
        start, given, end, returned = window
        add = _identity_add(ops.calls[start:end], id(given), id(returned))
        if add is not None:
            key = start + add
            if key not in innermost or end - start < innermost[key][0]:
                innermost[key] = (end - start, name)
    found = {name for _, name in innermost.values()}
    return tuple(name for name, _ in model.named_modules() if name in found)


def _identity_add(calls, given: int, returned: int) -> int | None:
    """The position of the first add of `given` if the module's result is `given` carried
    through adds (the residual stream: one or more branches added to it, as a transformer
    block adds attention, then the MLP) and pass-through ops only; None otherwise."""
    reached, first = {given}, None
    for i, (name, ins, outs) in enumerate(calls):
        if name in _ADDS and any(t in reached for t in ins):
            reached |= set(outs)
            first = i if first is None else first
        elif first is not None and name in _PASS_THROUGH and ins and ins[0] in reached:
            reached |= set(outs)
    return first if returned in reached and returned != given else None


def drop_blocks(model: nn.Module, names) -> nn.Module:
    """Replace each named block of `model` with `nn.Identity`, in place."""
    from edgeopt.spaces.fold import set_submodule

    for name in names:
        set_submodule(model, name, nn.Identity())
    return model


def inside(fqn: str, blocks) -> bool:
    """Whether the layer `fqn` lies in one of `blocks`."""
    return any(fqn == block or fqn.startswith(block + ".") for block in blocks)
