"""Every common architecture family: the space builds, and random plans apply, run and export."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
import torchvision

from edgeopt import SearchSpace, apply_plan, export_onnx

ARCHITECTURES = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                 "regnet_x_400mf", "densenet121", "shufflenet_v2_x1_0", "convnext_tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_random_plans_apply_run_and_export(arch, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=7).eval()
    example = torch.randn(1, 3, 32, 32)
    calib = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    space = SearchSpace.from_model(model, example)
    assert len(space.layers) > 10
    assert space.prunable_groups, "every family has something prunable"
    pruned_any = False
    for seed in range(5):
        plan = space.sample(seed=seed)
        small = apply_plan(model, plan, example, calib_data=calib, space=space if seed % 2 else None)
        with torch.no_grad():
            out = small(example)
        assert out.shape == (1, 7) and torch.isfinite(out).all()
        pruned_any |= sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
        path = export_onnx(small, example, tmp_path / f"{seed}.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (onnx_out,) = session.run(None, {"input": example.numpy()})
        assert onnx_out.shape == (1, 7)
    assert pruned_any


def test_shufflenet_shuffle_groups_are_left_dense_with_a_reason():
    model = torchvision.models.shufflenet_v2_x1_0(weights=None, num_classes=5).eval()
    space = SearchSpace.from_model(model, torch.randn(1, 3, 32, 32))
    dense = [g for g in space.groups if not g.prunable]
    assert dense and all("Torch-Pruning" in g.reason for g in dense)
    assert len(space.prunable_groups) >= 10  # the branch-internal groups stay prunable
    for group in dense:
        assert space.keep_choices(group) == (1.0,)
