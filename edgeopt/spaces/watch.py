"""One forward pass watched call by call: which torch calls ran inside which module, on what.

Depth (residual blocks) and surgery (squeeze-excite gates) both recognize a structure by what a
module does with the very tensor it received, not by its class: torchvision's, timm's and a
user's own blocks then all count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from edgeopt.layers import COMPRESSIBLE

Call = tuple[str, tuple[int, ...], tuple[int, ...]]  # (torch function name, input ids, output ids)


class _Ops(TorchFunctionMode):
    """Every torch call of a forward pass: its name, the ids of its tensor inputs and outputs.
    The tensors are kept alive so that no id is reused within the pass."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self._alive: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self._alive += ins + outs
        self.calls.append((getattr(func, "__name__", str(func)), tuple(map(id, ins)), tuple(map(id, outs))))
        return out


@dataclass(frozen=True)
class Window:
    """The calls a module made on one tensor input that it returned a tensor of the same shape for."""

    start: int  # position of its first call in the whole pass
    calls: list[Call]
    given: int  # id of the input tensor
    returned: int  # id of the output tensor
    shape: tuple[int, ...]


def shape_preserving_windows(model: nn.Module, example_input: torch.Tensor) -> dict[str, Window]:
    """{module name: its window} for every module holding a conv/linear layer that, called once
    with one tensor, returns a tensor of that tensor's shape (one forward pass of a structure
    copy: shapes, no values)."""
    from edgeopt.spaces.space import structure_copy

    work, x = structure_copy(model, example_input[:1])
    ops = _Ops()
    open_: dict[str, list] = {}
    handles = []
    for name, module in work.named_modules():
        if not name or not any(isinstance(m, COMPRESSIBLE) for m in module.modules()):
            continue

        def before(mod, args, name=name):
            if len(args) == 1 and isinstance(args[0], torch.Tensor):
                open_[name] = [len(ops.calls), args[0]]

        def after(mod, args, output, name=name):
            window = open_.get(name)
            if window is not None and len(window) == 2:
                if isinstance(output, torch.Tensor) and output.shape == window[1].shape:
                    window += [len(ops.calls), output]
                else:
                    del open_[name]

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad(), ops:
            work(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: Window(start, ops.calls[start:end], id(given), id(returned), tuple(given.shape))
            for name, (start, given, end, returned) in ((n, w) for n, w in open_.items() if len(w) == 4)}
