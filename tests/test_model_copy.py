"""`copy_model` gives what `copy.deepcopy` gives: the same values, nothing shared with the
original, and the same sharing inside the copy."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import timm
import torch
import torchvision
from torch import nn

from edgeopt.model_copy import copy_model
from edgeopt.spaces.space import meta_copy


def _sharing(model: nn.Module) -> list[tuple[str, int]]:
    """Which named modules, parameters and buffers are one object or share one storage: each
    name with the index of the first name it shares with."""
    first, out = {}, []
    for name, module in model.named_modules(remove_duplicate=False):
        out.append((f"module {name}", first.setdefault(("m", id(module)), len(out))))
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        out.append((f"tensor {name}", first.setdefault(("t", id(t)), len(out))))
        out.append((f"storage {name}", first.setdefault(("s", t.untyped_storage().data_ptr()), len(out))))
    return out


def _same_copy(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.eval()
    ours, theirs = copy_model(model), copy.deepcopy(model)
    assert type(ours) is type(theirs)
    assert _sharing(ours) == _sharing(theirs)
    originals = {id(t) for t in [*model.parameters(), *model.buffers()]}
    original_storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    for (name, a), (_, b) in zip(ours.state_dict(keep_vars=True).items(), theirs.state_dict(keep_vars=True).items()):
        assert id(a) not in originals and a.untyped_storage().data_ptr() not in original_storages, name
        assert type(a) is type(b) and a.requires_grad == b.requires_grad and a.stride() == b.stride(), name
        assert torch.equal(a, b), name
    assert [m.training for m in ours.modules()] == [m.training for m in theirs.modules()]
    with torch.no_grad():
        assert torch.equal(ours(x), model(x))
    return ours


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    lambda: timm.create_model("mobileone_s0", num_classes=10),
    lambda: timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8),
], ids=["mobilenet_v3_small", "mobileone_s0", "deit_tiny"])
def test_copies_as_deepcopy_does(build):
    torch.manual_seed(0)
    _same_copy(build(), torch.randn(2, 3, 32, 32))


class _Tied(nn.Module):
    """A shared module, a tied weight, a buffer that views another, a hook and a list attribute."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)
        self.head.weight = self.embed.weight
        self.again = self.embed
        self.register_buffer("table", torch.arange(8.0))
        self.register_buffer("front", self.table[:4])
        self.seen = []
        self.calls = 0
        self.scale = torch.tensor([2.0, 3.0, 4.0, 5.0])  # a plain tensor attribute, not a buffer
        self.register_forward_hook(_count)

    def forward(self, x):
        return self.head(self.again(x)) * self.scale + self.front


def _count(module, args, output):
    module.calls += 1


def test_sharing_hooks_and_attributes_are_kept():
    model = _Tied()
    copied = _same_copy(model, torch.randn(3, 4))
    assert copied.again is copied.embed and copied.head.weight is copied.embed.weight
    copied.table[0] = 5.0  # the view follows its base in the copy, as deepcopy leaves it
    assert copied.front[0] == 5.0 and model.table[0] == 0.0
    assert copied.calls == 1 and model.calls == 1  # the hook came along, counting on the copy
    assert copied.seen is not model.seen
    assert copied.scale is not model.scale and torch.equal(copied.scale, model.scale)


class _OwnCopy(nn.Linear):
    def __deepcopy__(self, memo):
        new = nn.Linear(self.in_features, self.out_features)
        new.load_state_dict(self.state_dict())
        new.marked = True
        return new


def test_a_module_with_its_own_copy_is_copied_its_way():
    model = nn.Sequential(nn.ReLU(), _OwnCopy(3, 3))
    assert copy_model(model)[1].marked


def test_a_memo_says_what_stands_for_a_module_or_tensor():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    stand_in = nn.Identity()
    copied = copy_model(model, {id(model[1]): stand_in})
    assert copied[1] is stand_in and copied[0] is not model[0]
    meta = meta_copy(model)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert [t.shape for t in meta.parameters()] == [t.shape for t in model.parameters()]


def test_a_dropped_copy_is_freed_at_once():
    """Nothing of the copy waits for the cyclic garbage collector: a search copies the model for
    every trial, and copies held until a collection would pile up."""
    gc.disable()
    try:
        copied = copy_model(torchvision.models.mobilenet_v3_small(num_classes=10))
        weight = weakref.ref(copied.features[0][0].weight)
        del copied
        assert weight() is None
    finally:
        gc.enable()
