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

from edgeopt.spaces.watch import Window, shape_preserving_windows

_ADDS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
# What may follow the add before the block returns (elementwise, shape-preserving, no weights).
_PASS_THROUGH = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "hardswish",
                 "hardswish_", "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "dropout", "contiguous",
                 "clone", "__get__"}


def residual_blocks(model: nn.Module, example_input: torch.Tensor, *,
                    windows: dict[str, Window] | None = None) -> tuple[str, ...]:
    """The names of the blocks of `model` a plan may drop (module order), found on one forward
    pass of a structure copy (see the module docstring); `windows`, where given, is that pass's
    `shape_preserving_windows(model, example_input)`."""
    innermost: dict[int, tuple[int, str]] = {}  # add call (its position in the pass) -> (window length, module)
    if windows is None:
        windows = shape_preserving_windows(model, example_input)
    for name, window in windows.items():
        add = _identity_add(window.calls, window.given, window.returned)
        if add is not None:
            key = window.start + add
            if key not in innermost or len(window.calls) < innermost[key][0]:
                innermost[key] = (len(window.calls), name)
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
