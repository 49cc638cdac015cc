"""`copy_model`: what `copy.deepcopy` gives for a model, in a quarter to a half of the time.

edgeopt copies the user's model for every plan it applies, costs or exports. `copy.deepcopy`
spends most of that time in Python, not in copying weights: every module carries about fifteen
hook dictionaries, nearly always empty, that it rebuilds through `__reduce_ex__`, and every
tensor goes through its storage-level copy. On timm's mobileone_s0 (1,289 modules) a deepcopy
took 300-340 ms, a fifth of `apply_plan`'s time in the coverage tests; this copy takes 76-81 ms.
Where weights weigh more (torchvision's resnet18: 68 modules, 11M parameters) 30 against 15 ms
(`bench/model_copy.py`).

It is the same copy wherever the result could differ: a module class with its own copying or
pickling, a tensor with more to it than its values (a gradient, attributes, a view of or a
storage shared with another, a quantized or sparse layout) and every attribute that is not a
module, a parameter, a buffer, an empty hook dictionary or a plain number or string go to
`copy.deepcopy` with the same memo, so shared modules and tied parameters stay shared.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

_ATOMS = (int, float, bool, str, type(None))
_EMPTY_COPIES = (dict, OrderedDict, set)
_MISSING = object()
_PLAIN_MODULE = {}  # class -> whether its instances copy as plain modules do


def _plain_class(cls: type) -> bool:
    """Whether deepcopy copies `cls` as it copies `nn.Module`: its instance dictionary, handed to
    `__setstate__` (which torch's layers override only to fill in what old pickles lack)."""
    plain = _PLAIN_MODULE.get(cls)
    if plain is None:
        plain = (getattr(cls, "__deepcopy__", None) is None
                 and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
                 and cls.__getstate__ is nn.Module.__getstate__
                 and not any("__slots__" in vars(base) for base in cls.__mro__))
        _PLAIN_MODULE[cls] = plain
    return plain


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A copy of `model` equal to `copy.deepcopy(model, memo)`: `memo` may map the id of any
    module or tensor to the object that stands for it in the copy."""
    # Plain functions, not closures: a closure calling itself would be a reference cycle that
    # keeps the memo, and with it every module and tensor of the copy, until the cyclic
    # garbage collector runs.
    return _copy_module(model, {} if memo is None else memo, _shared_storages(model))


def _copy_module(m: nn.Module, memo: dict[int, Any], shared: set[int]) -> nn.Module:
    got = memo.get(id(m), _MISSING)
    if got is not _MISSING:
        return got
    cls = type(m)
    if not _plain_class(cls):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    state = {}
    for key, value in m.__dict__.items():
        if key == "_modules":
            state[key] = type(value)((n, None if c is None else _copy_module(c, memo, shared))
                                     for n, c in value.items())
        elif key in ("_parameters", "_buffers"):
            state[key] = type(value)((n, None if t is None else _copy_tensor(t, memo, shared))
                                     for n, t in value.items())
        elif key == "_compiled_call_impl":  # as Module.__getstate__ leaves it out
            continue
        elif type(value) in _ATOMS:
            state[key] = value
        elif type(value) in _EMPTY_COPIES and not value:  # the hook dictionaries
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)  # as deepcopy does: a class may fill in what old pickles lack
    return new


def _copy_tensor(t: torch.Tensor, memo: dict[int, Any], shared: set[int]) -> torch.Tensor:
    got = memo.get(id(t), _MISSING)
    if got is not _MISSING:
        return got
    if type(t) is nn.Parameter and not t.__dict__:
        # What Parameter.__deepcopy__ does, without the dispatch around it.
        new = nn.Parameter(t.data.clone(memory_format=torch.preserve_format), t.requires_grad)
    elif (type(t) is torch.Tensor and t.is_leaf and not t.requires_grad and t.grad is None
          and not t.__dict__ and t.layout == torch.strided and not t.is_quantized
          and t.device.type in ("cpu", "cuda") and _owns_storage(t, shared)):
        new = t.clone(memory_format=torch.preserve_format)
    else:
        return copy.deepcopy(t, memo)
    memo[id(t)] = new
    return new


def _shared_storages(model: nn.Module) -> set[int]:
    """The storages that two or more of the model's buffers view: deepcopy copies each once."""
    seen, shared = {}, set()
    for t in model.buffers():
        pointer = t.untyped_storage().data_ptr()
        if seen.setdefault(pointer, id(t)) != id(t):
            shared.add(pointer)
    return shared


def _owns_storage(t: torch.Tensor, shared: set[int]) -> bool:
    """Whether `t` is all of its storage and no other buffer views it: then a clone is what
    deepcopy gives."""
    storage = t.untyped_storage()
    pointer = storage.data_ptr()
    return (pointer != 0 and pointer not in shared and t.storage_offset() == 0
            and storage.nbytes() == t.numel() * t.element_size())
