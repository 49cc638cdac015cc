"""edgeopt's bounds on Torch-Pruning's reshape index mappings (edgeopt/spaces/prune.py)."""

from __future__ import annotations

import random

import pytest
from torch_pruning._helpers import _HybridIndex
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

from edgeopt.spaces.prune import MappingExplodes, _BoundedFlattenMapping


@pytest.fixture
def unbounded(monkeypatch):
    monkeypatch.setattr(_BoundedFlattenMapping, "budget", 10**9)
    monkeypatch.setattr(_BoundedFlattenMapping, "remaining", 10**9)
    monkeypatch.setattr(_BoundedFlattenMapping, "per_call", 10**9)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("stride", [1, 3, 64])
def test_the_bounded_mapping_maps_indices_as_torch_pruning_does(unbounded, reverse, stride):
    rng = random.Random(stride)
    idxs = [_HybridIndex(idx=rng.randrange(500), root_idx=rng.choice([None, rng.randrange(50)])) for _ in range(300)]
    ours, theirs = _BoundedFlattenMapping(stride, reverse)(idxs), _FlattenIndexMapping(stride, reverse)(idxs)
    assert ours == theirs  # the same indices in the same order
    assert all(type(i) is _HybridIndex for i in ours)


def test_one_mapping_past_what_a_tensor_holds_gives_up_at_once(monkeypatch):
    monkeypatch.setattr(_BoundedFlattenMapping, "budget", 10**9)
    monkeypatch.setattr(_BoundedFlattenMapping, "remaining", 10**9)
    monkeypatch.setattr(_BoundedFlattenMapping, "per_call", 1000)
    idxs = [_HybridIndex(idx=i, root_idx=i) for i in range(100)]
    assert len(_BoundedFlattenMapping(10)(idxs)) == 1000  # exactly what a tensor may hold
    with pytest.raises(MappingExplodes, match="1,100 indices"):
        _BoundedFlattenMapping(11)(idxs)
    # The refused mapping did not draw on the group's budget.
    assert _BoundedFlattenMapping.remaining == 10**9 - 1000
