"""The depth knob: which residual blocks a plan may drop, and a dropped block through apply_plan,
costs, pruning, quantization and export."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision
from torch import nn

from edgeopt import EdgeoptError, ModelPlan, SearchSpace, apply_plan, export_onnx
from edgeopt.evaluators.cost import model_cost
from edgeopt.evaluators.cpu import int8_needs_reduce_range
from edgeopt.spaces.depth import residual_blocks
from edgeopt.input_size import input_for


@pytest.mark.parametrize(("build", "size", "expected"), [
    (lambda: torchvision.models.resnet18(num_classes=10), 64,
     ("layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1")),  # layer2.0 .. 4.0 downsample
    (lambda: torchvision.models.mobilenet_v2(num_classes=10), 64,
     ("features.3", "features.5", "features.6", "features.8", "features.9", "features.10", "features.12",
      "features.13", "features.15", "features.16")),  # use_res_connect
    (lambda: timm.create_model("resnet18", num_classes=10), 64,
     ("layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1")),
    (lambda: torchvision.models.vit_b_16(num_classes=10), 224,
     tuple(f"encoder.layers.encoder_layer_{i}" for i in range(12))),  # attention, then MLP, added
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)), 16, ()),
], ids=["torchvision resnet18", "mobilenet_v2", "timm resnet18", "vit_b_16", "no shortcut"])
def test_blocks_with_an_identity_shortcut_are_found(build, size, expected):
    assert residual_blocks(build().eval(), torch.randn(1, 3, size, size)) == expected


def _resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm, so that a dropped block would be missed
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def test_a_dropped_block_leaves_its_shortcut_and_its_costs():
    model, x = _resnet(), torch.randn(4, 3, 64, 64)
    space = SearchSpace.from_model(model, x[:1])
    plan = ModelPlan(layers=space.uniform().layers, dropped={"layer1.1", "layer3.1"})
    small = apply_plan(model, plan, x[:1], space=space)
    assert isinstance(small.layer1[1], nn.Identity) and isinstance(small.layer3[1], nn.Identity)
    by_hand = copy.deepcopy(model)
    by_hand.layer1[1], by_hand.layer3[1] = nn.Identity(), nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(small(x), by_hand(x), atol=1e-4, rtol=1e-4)
    block_macs = sum(layer.macs for layer in space.layers if layer.fqn.startswith(("layer1.1.", "layer3.1.")))
    whole = apply_plan(model, space.uniform(), x[:1], space=space)  # BatchNorm folded alike
    assert model_cost(whole, x).macs - model_cost(small, x).macs == block_macs


def test_dropping_composes_with_pruning_precision_resolution_and_export(tmp_path):
    model, x = _resnet(), torch.randn(8, 3, 64, 64)
    space = SearchSpace.from_model(model, x[:1])
    base = space.uniform(w_bits=8, a_bits=8, keep_ratio=0.625, input_scale=0.75)
    plan = space.settled(ModelPlan(layers=base.layers, input_scale=0.75, dropped={"layer1.0", "layer4.1"}))
    space.validate(plan)
    reduce = int8_needs_reduce_range()
    small = apply_plan(model, plan, x[:1], space=space, calib_data=[x], reduce_range=reduce)
    path = export_onnx(small, x[:1], tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": input_for(small, x).numpy()})[0]
    with torch.no_grad():
        ref = small(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5  # every quantized layer is integer
    assert model_cost(small, x).macs < model_cost(apply_plan(model, base, x[:1], space=space, calibrate_model=False),
                                                  x).macs


def test_plans_that_differ_only_inside_a_dropped_block_are_one():
    model, x = _resnet(), torch.randn(1, 3, 64, 64)
    space = SearchSpace.from_model(model, x)
    a = ModelPlan(layers=space.uniform().layers, dropped={"layer2.1"})
    inner = {f: lp for f, lp in space.uniform(w_bits=8, a_bits=8).layers.items() if f.startswith("layer2.1.")}
    c = ModelPlan(layers={**a.layers, **inner}, dropped={"layer2.1"})
    assert c != a and space.settled(c) == space.settled(a)
    assert ModelPlan.from_json(c.to_json()) == c and json.loads(c.to_json())["dropped"] == ["layer2.1"]
    with pytest.raises(EdgeoptError, match=r"blocks \['layer2.0'\] cannot be dropped"):
        space.validate(ModelPlan(layers=a.layers, dropped={"layer2.0"}))
