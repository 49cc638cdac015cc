"""onnxruntime's per-node profile charged to the model's layers (edgeopt.evaluators.node_profile)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torchvision

from edgeopt import SearchSpace, apply_plan, export_onnx
from edgeopt.evaluators.node_profile import profile_layers
from edgeopt.layers import trace_layers

KERNELS = ("Conv", "FusedConv", "QLinearConv", "Gemm", "FusedGemm", "QGemm", "MatMul", "QLinearMatMul")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_every_layer_gets_its_own_kernel_and_its_quantizers(arch, calib, tmp_path):
    """fp32 (onnxruntime fuses BatchNorm, activations and residual sums into NCHWc convs, named
    after their last output) and uniform int8 (QLinearConv, with quantizers and layout
    Transposes around it): each layer is charged exactly one kernel, an int8 layer its
    quantizers too, and the rest (pools, float sums, squeeze-excite gates) runs between layers."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    names = [spec.fqn for spec in trace_layers(model, example)]
    space = SearchSpace.from_model(model, example)
    int8 = apply_plan(model, space.uniform(w_bits=8, a_bits=8), example,
                      calib_data=[torch.nn.functional.interpolate(c, size=32) for c in calib], space=space)
    for name, net in (("fp32", model), ("int8", int8)):
        path = export_onnx(net, example, tmp_path / f"{name}.onnx")
        profile = profile_layers(path, names, runs=3, warmup=1)
        kernels = Counter(layer for _, op, _, layer in profile.nodes if op in KERNELS)
        assert all(kernels[fqn] == 1 for fqn in names), (name, {f: kernels[f] for f in names if kernels[f] != 1})
        assert set(profile.layers) == set(names)
        # Every timed node is charged once: to a layer or between them.
        charged = sum(t.ms for t in profile.layers.values()) + sum(profile.between.values())
        assert charged == pytest.approx(profile.total_ms, rel=1e-9)
        # The profiler's own cost per node is taken out, never below nothing (how near that brings
        # the nodes to an unprofiled run is a timing: bench/layer_accounting.py).
        assert profile.overhead_ms >= 0 and all(ms >= 0 for _, _, ms, _ in profile.nodes)
        charged_ops = Counter(op for _, op, _, layer in profile.nodes if layer is not None and op not in KERNELS)
        if name == "int8":
            # The export names each layer's quantizers after it: they are that layer's.
            own = [(node, layer) for node, op, _, layer in profile.nodes
                   if op in ("QuantizeLinear", "DequantizeLinear") and node.split(".input_q")[0] in names]
            assert own and all(node.startswith(f"{layer}.") for node, layer in own)
        else:
            # Float layers are served by layout changes only (NCHWc reorders).
            assert set(charged_ops) <= {"ReorderInput", "ReorderOutput", "Transpose"}, charged_ops
