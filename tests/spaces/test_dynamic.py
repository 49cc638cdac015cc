"""Dynamic-range int8: int8 weights, activations quantized at run time from their own range, as
onnxruntime computes it; offered only on the layer kinds where the target's kernels pay."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import pytest
import torch
from onnx import TensorProto, helper

from edgeopt import EdgeoptError, LayerPlan, ModelPlan, SearchSpace, apply_plan
from edgeopt.evaluators.onnx_export import export_onnx
from edgeopt.hw_models.lut import LatencyTable, LayerKey
from edgeopt.hw_models.profiler import layer_model
from edgeopt.hw_models.targets import get_target
from edgeopt.search.optimize import target_knobs
from edgeopt.search.sensitivity import changes
from edgeopt.search.study import plan_params, suggest_plan
from edgeopt.spaces.quantize import dynamic_qparams


def _dynamic_everywhere(space: SearchSpace) -> ModelPlan:
    return ModelPlan(layers={layer.fqn: LayerPlan(w_bits=8, dynamic=True) for layer in space.layers})


def _per_image(path, x: torch.Tensor) -> np.ndarray:
    """onnxruntime's scores one image at a time, as a device runs them (a batch would share one range)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])


def test_a_dynamic_layer_takes_int8_weights_and_float_activations():
    with pytest.raises(EdgeoptError, match="w_bits=8 and a_bits=32"):
        LayerPlan(w_bits=8, a_bits=8, dynamic=True)
    with pytest.raises(EdgeoptError, match="w_bits=8 and a_bits=32"):
        LayerPlan(w_bits=4, dynamic=True)
    with pytest.raises(EdgeoptError, match="true or false"):
        LayerPlan(w_bits=8, dynamic=1)
    plan = ModelPlan(layers={"head": LayerPlan(w_bits=8, dynamic=True)})
    assert ModelPlan.from_json(plan.to_json()) == plan


def test_a_plan_without_dynamic_layers_keeps_its_old_digest():
    plan = ModelPlan(layers={"a": LayerPlan(w_bits=8, a_bits=8), "b": LayerPlan(keep_ratio=0.5)})
    # The digest as computed before the knob existed: the layer dicts without "sparsity" and "dynamic".
    old = {"version": 1, "layers": {k: {f: v for f, v in d.items() if f not in ("sparsity", "dynamic")}
                                    for k, d in plan.to_dict()["layers"].items()}}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert plan.key() == digest
    assert ModelPlan(layers={**plan.layers, "c": LayerPlan(w_bits=8, dynamic=True)}).key() != \
        ModelPlan(layers={**plan.layers, "c": LayerPlan(w_bits=8)}).key()


@pytest.mark.parametrize("values", ["random", "positive", "zeros"])
def test_the_run_time_range_is_onnxruntimes(values):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=generator) * 4
    x = {"random": x, "positive": x.abs() + 1, "zeros": torch.zeros_like(x)}[values]
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 7])],
                              [helper.make_tensor_value_info(n, t, None) for n, t in
                               (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    scale, zero_point = dynamic_qparams(x)
    for i in range(len(x)):  # one range per image
        q, s, z = session.run(None, {"x": x[i:i + 1].numpy()})
        assert float(scale[i]) == float(s) and int(zero_point[i]) == int(z)
        ours = (torch.round(x[i] / scale[i]) + zero_point[i]).clamp(0, 255)
        assert np.array_equal(ours.numpy().astype(np.uint8), q[0])


def test_exported_dynamic_layers_are_onnxruntimes_integer_kernels_and_agree(tiny, example, tmp_path):
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, _dynamic_everywhere(space), example)
    path = export_onnx(small, example, tmp_path / "m.onnx")
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    conv_layers = sum(layer.kind != "linear" for layer in space.layers)
    assert ops.count("ConvInteger") == conv_layers and ops.count("MatMulInteger") == 1
    assert ops.count("DynamicQuantizeLinear") == len(space.layers)
    assert "Conv" not in ops and "Gemm" not in ops and "QuantizeLinear" not in ops
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = small(x).numpy()
        float_scores = tiny(x).numpy()
    got = _per_image(path, x)
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
    # ... and it is quantized: the float model's scores differ by far more than that.
    assert np.abs(float_scores - ref).max() > 100 * np.abs(got - ref).max()


def test_an_image_scores_the_same_alone_and_in_a_batch(tiny, example):
    small = apply_plan(tiny, _dynamic_everywhere(SearchSpace.from_model(tiny, example)), example)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    x[0] *= 50  # an image with a far wider range would widen every other image's scale in a shared range
    with torch.no_grad():
        batch = small(x)
        alone = torch.cat([small(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-6)


def test_fine_tuning_trains_a_dynamic_layer_through_its_rounding(tiny, example):
    small = apply_plan(tiny, ModelPlan(layers={"head": LayerPlan(w_bits=8, dynamic=True)}), example).train()
    small(torch.randn(4, 3, 16, 16)).sum().backward()
    assert small.head.weight.grad is not None and small.head.weight.grad.abs().sum() > 0


def test_offered_where_the_target_measured_it_to_pay(tiny, example):
    space = SearchSpace.from_model(tiny, example)
    host = space.restrict(target_knobs(get_target("host"), size_matters=False))
    pi4 = space.restrict(target_knobs(get_target("pi4"), size_matters=False))
    head, stem = host.layer("head"), host.layer("stem.0")
    assert (8, 32, True) in host.precision_choices(head)
    assert (8, 32, True) not in host.precision_choices(stem)
    assert not any(c[2] for layer in pi4.layers for c in pi4.precision_choices(layer))
    with pytest.raises(EdgeoptError, match="dynamic-range int8 outside the space"):
        host.validate(ModelPlan(layers={"stem.0": LayerPlan(w_bits=8, dynamic=True)}))
    uniform = host.uniform(w_bits=8, dynamic=True)
    assert uniform.layers["head"].dynamic and uniform.layers["stem.0"] == LayerPlan()
    host.validate(uniform)
    # The search asks for it by name on the head only, and a known plan comes back the same.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(plan_params(uniform, host))
    assert suggest_plan(study.ask(), host) == uniform
    assert set(study.trials[0].distributions["q/head"].choices) == {"w32a32", "w8a8", "w8dyn"}
    # The sensitivity table measures it as one change, on the head only.
    assert [key for key, _ in changes(host) if key.startswith("dyn8")] == ["dyn8 head"]


@pytest.mark.parametrize("key", [
    LayerKey("linear", 192, 768, (1, 1), (1, 1), 1, (49, 1), 8, 32, None, True),
    LayerKey("linear", 64, 10, (1, 1), (1, 1), 1, (1, 1), 8, 32, None, True),
    LayerKey("conv", 16, 32, (3, 3), (1, 1), 1, (8, 8), 8, 32, None, True),
])
def test_the_profiler_times_the_dynamic_kernels_and_the_table_keeps_them(key, tmp_path):
    model = onnx.load_from_string(layer_model(key, copies=2))
    ops = {node.op_type for node in model.graph.node}
    assert "DynamicQuantizeLinear" in ops and ("MatMulInteger" if key.kind == "linear" else "ConvInteger") in ops
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert all(np.isfinite(out).all() for out in session.run(None, {"x": np.ones(shape, np.float32)}))
    static = LayerKey(*[getattr(key, f) for f in ("kind", "in_channels", "out_channels", "kernel", "stride",
                                                   "groups", "input_hw", "w_bits", "a_bits", "nm")])
    table = LatencyTable(rows={key: 0.5, static: 0.25}, meta={}, spread={}, name="t")
    back = LatencyTable.from_text(table.to_text())
    assert back.lookup(key) == 0.5 and back.lookup(static) == 0.25
