"""Every torchvision family and 22 timm families: the space builds, and uniform and random plans
apply, run, export and agree with onnxruntime (tests/coverage.py says how agreement is judged)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from edgeopt import SearchSpace
from tests.coverage import check_family
from tests.coverage_families import TIMM, TORCHVISION

timm = pytest.importorskip("timm", reason="timm is a test dependency (pip install -e '.[test]')")

# Families whose builds here have no block with an identity shortcut: plain stacks, concatenations,
# one block per stage that changes shape (resnext, wide_resnet, resnest, res2net as built here),
# a shortcut added to part of the channels (rexnet), re-parameterized branches (mobileone), and
# maxvit's partitioned attention (its adds take the partitioned tensor, not a module's input).
NO_DROPPABLE_BLOCKS = {"torchvision alexnet", "torchvision vgg", "torchvision resnext", "torchvision wide_resnet",
                       "torchvision squeezenet", "torchvision densenet", "torchvision googlenet",
                       "torchvision inception_v3", "torchvision shufflenet_v2", "torchvision maxvit",
                       "timm rexnet_100", "timm mobileone_s0", "timm lcnet_050", "timm resnest14d", "timm res2net"}

FAMILIES = {**{f"torchvision {k}": v for k, v in TORCHVISION.items()}, **{f"timm {k}": v for k, v in TIMM.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compresses_exports_and_agrees_with_onnxruntime(family, tmp_path, coverage_log):
    build, size = FAMILIES[family]
    torch.manual_seed(0)  # the model's random weights, whichever tests ran before in this process
    result = check_family(family, build(), size, tmp_path)
    coverage_log.append(f"{family} at {size}x{size}: from_model {result.from_model_seconds:.1f} s, {result.headline}")
    coverage_log.extend(f"    {check.line()}" for check in result.plans)
    assert result.plans and all(check.ok for check in result.plans), "\n".join(c.line() for c in result.plans)
    assert (result.blocks == 0) == (family in NO_DROPPABLE_BLOCKS), result.headline


def test_shufflenet_shuffle_groups_are_left_dense_with_a_reason():
    model = torchvision.models.shufflenet_v2_x1_0(weights=None, num_classes=5).eval()
    space = SearchSpace.from_model(model, torch.randn(1, 3, 32, 32))
    dense = [g for g in space.groups if not g.prunable]
    assert dense and all("Torch-Pruning" in g.reason for g in dense)
    assert len(space.prunable_groups) >= 10  # the branch-internal groups stay prunable
    for group in dense:
        assert space.keep_choices(group) == (1.0,)
