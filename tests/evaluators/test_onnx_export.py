from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

from edgeopt import NM, LayerPlan, ModelPlan, SearchSpace, apply_plan, export_onnx
from edgeopt.evaluators.cpu import int8_needs_reduce_range
from edgeopt.search.models import EdgeNet


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]


def _runtime_nodes(path, tmp_path):
    """The nodes of the graph onnxruntime runs, after its fusions (not its layout changes,
    which depend on the CPU)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "opt.onnx")).graph.node


def _assert_agrees(small, path):
    """The exported model's top-1 and scores (to float rounding) are the PyTorch model's."""
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        ref = small(x).numpy()
    got = _run(path, x)
    assert (ref.argmax(1) == got.argmax(1)).all()
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def _initializer_types(path):
    return {init.name: init.data_type for init in onnx.load(str(path)).graph.initializer}


def test_storage_types_follow_bits(tiny, example, calib, tmp_path):
    space = SearchSpace.from_model(tiny, example)
    plan = space.uniform(w_bits=8, a_bits=8)
    layers = dict(plan.layers)
    layers["stem.0"] = LayerPlan(w_bits=4, a_bits=8)
    layers["expand.0"] = LayerPlan(w_bits=16, a_bits=16)
    layers["branch_a"] = LayerPlan(w_bits=2)
    small = apply_plan(tiny, ModelPlan(layers=layers), example, calib_data=calib)
    path = export_onnx(small, example, tmp_path / "m.onnx")
    types = _initializer_types(path)
    T = onnx.TensorProto
    assert types["stem.0.weight_quantized"] == T.INT4
    assert types["branch_a.weight_quantized"] == T.INT4
    assert types["res1.0.weight_quantized"] == T.INT8
    assert types["res1.0.bias_quantized"] == T.INT32
    assert types["expand.0.weight_fp16"] == T.FLOAT16
    assert not any(name.endswith(".weight") for name in types)  # no float copy left behind
    with torch.no_grad():
        ref = small(example).numpy()
    np.testing.assert_allclose(_run(path, example), ref, atol=0.05 * np.abs(ref).max())


def test_export_leaves_the_model_as_it_was(tiny, example, calib, tmp_path):
    """The export replaces layers and sets modes on a copy: none of the model's tensors, modules
    or modes may change."""
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, space.uniform(w_bits=8, a_bits=8, keep_ratio=0.75), example, calib_data=calib).train()
    before = {name: tensor.clone() for name, tensor in small.state_dict().items()}
    modules = dict(small.named_modules())
    export_onnx(small, example, tmp_path / "m.onnx")
    assert dict(small.named_modules()) == modules and all(m.training for m in small.modules())
    after = small.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_integer_layers_run_as_int8_kernels(tiny, example, calib, tmp_path):
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, space.uniform(w_bits=8, a_bits=8), example, calib_data=calib,
                       reduce_range=int8_needs_reduce_range())
    path = export_onnx(small, example, tmp_path / "m.onnx")
    # A Relu on an integer layer's absorbed output is the identity; none is left to run in float
    # where the activation also feeds the residual add or the squeeze-excite.
    written = onnx.load(str(path)).graph.node
    written_by = {out: n.op_type for n in written for out in n.output}
    assert [n.name for n in written if n.op_type == "Relu" and written_by.get(n.input[0]) == "DequantizeLinear"] == []
    with torch.no_grad():
        ref = small(example).numpy()
    np.testing.assert_allclose(_run(path, example), ref, atol=1e-5 * np.abs(ref).max())
    nodes = _runtime_nodes(path, tmp_path)
    ops = [n.op_type for n in nodes]
    assert ops.count("QLinearConv") >= 6
    # TinyNet adds its residual in its own forward, where no module returns the sum to quantize:
    # that add stays a float Sum (onnxruntime's QLinearAdd would rescale it its own way).
    assert "QLinearAdd" not in ops and ops.count("Sum") == 1
    # The squeeze-excite's spatial mean pools the integers instead of running in float between a
    # dequantizer and a quantizer; the head's mean reads a concat, which is not quantized, and stays.
    assert ops.count("QLinearGlobalAveragePool") == 1 and ops.count("ReduceMean") == 1
    # A ReLU between two integer layers is absorbed by the first one's output quantizer, so the
    # runtime feeds one integer kernel's uint8 output straight into the next.
    made_by = {out: n.op_type for n in nodes for out in n.output}
    chained = [n.name for n in nodes if n.op_type == "QLinearConv" and made_by.get(n.input[0]) == "QLinearConv"]
    assert len(chained) >= 3, chained


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("seed", [0, 3])
def test_onnx_agrees_with_pytorch_on_top1(arch, seed, tmp_path):
    # Random-init networks have near-tied scores (mobilenet_v2: a spread of 0.1), so any
    # rounding difference between the two flips some top-1s; with the float emulation these
    # seeds gave 62/64 (mobilenet_v2, seed 3). The integer layers now compute what the runtime's
    # kernels compute, so the scores agree to float rounding of the last layer.
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    example = torch.randn(2, 3, 32, 32)
    space = SearchSpace.from_model(model, example)
    plan = space.uniform(w_bits=8, a_bits=8, keep_ratio=0.75, nm=NM(n=2, m=4))
    calib = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    small = apply_plan(model, plan, example, calib_data=calib, reduce_range=int8_needs_reduce_range())
    _assert_agrees(small, export_onnx(small, example, tmp_path / f"{arch}.onnx"))


def test_spatial_means_pool_integers_and_agree(tmp_path):
    # edgenet's squeeze-excite means (keepdim) and its head's mean (flattened, then the
    # classifier's quantizer) all read an integer layer's output: each runs as
    # QLinearGlobalAveragePool, and the scores still agree with the PyTorch model's.
    torch.manual_seed(0)
    model = EdgeNet(3, 10, width=16).eval()
    example = torch.randn(2, 3, 32, 32)
    plan = SearchSpace.from_model(model, example).uniform(w_bits=8, a_bits=8)
    calib = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    small = apply_plan(model, plan, example, calib_data=calib, reduce_range=int8_needs_reduce_range())
    path = export_onnx(small, example, tmp_path / "edgenet.onnx")
    ops = [n.op_type for n in _runtime_nodes(path, tmp_path)]
    assert ops.count("QLinearGlobalAveragePool") == 3 and "ReduceMean" not in ops
    _assert_agrees(small, path)


def test_preprocessing_is_stored_in_the_onnx_metadata(tiny, example, tmp_path):
    import json

    prep = {"input_size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "class_names": ["a", "b"]}
    path = export_onnx(tiny, example, tmp_path / "m.onnx", preprocessing=prep)
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["edgeopt.preprocessing"]) == prep


def test_a_float_layer_between_int8_layers_stays_float_in_onnxruntime(tiny, example, calib, tmp_path):
    space = SearchSpace.from_model(tiny, example)
    layers = dict(space.uniform(w_bits=8, a_bits=8).layers)
    layers["res1.0"] = LayerPlan()  # fp32, reading the int8 stem's output and feeding int8 res1.3
    small = apply_plan(tiny, ModelPlan(layers=layers), example, calib_data=calib,
                       reduce_range=int8_needs_reduce_range())
    path = export_onnx(small, example, tmp_path / "mixed.onnx")
    runtime = _runtime_nodes(path, tmp_path)
    integer_convs = sum(1 for name, lp in layers.items() if lp.w_bits == 8 and name != "head")
    # onnxruntime would otherwise quantize res1.0's weights to per-tensor int8 and run it as one.
    assert sum(n.op_type == "QLinearConv" for n in runtime) == integer_convs
    assert any(n.op_type in ("Conv", "FusedConv") for n in runtime)
    x = torch.randn(64, *example.shape[1:])
    with torch.no_grad():
        ref = small(x).numpy()
    got = _run(path, x)
    # Float rounding of the fp32 layer may move a value across the next quantizer's rounding
    # boundary, nothing more: the scores agree to a quantization step, not to int8 per-tensor error.
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.95
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


class _Tokens(torch.nn.Module):
    """Linear layers on tokens (batch, tokens, features), as in a transformer: ONNX MatMul + Add."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 64, 8, stride=8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((tokens + self.mlp(tokens)).mean(1))


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_linear_layers_on_tokens_run_as_evaluated_in_the_sessions_edgeopt_makes(bits, tmp_path):
    """onnxruntime fuses a weight-only layer's DequantizeLinear and MatMul into MatMulNBits, which by
    default quantizes its float input to int8 (edgeopt.deploy.run.SESSION_CONFIG): the measuring,
    deploying and cascade sessions keep it in float, and give the PyTorch model's scores."""
    from edgeopt.deploy import run as bundle_run
    from edgeopt.deploy.cascade import Cascade
    from edgeopt.evaluators.latency import make_session

    torch.manual_seed(0)
    model = _Tokens().eval()
    x = torch.randn(1, 3, 32, 32)
    space = SearchSpace.from_model(model, x)
    plan = ModelPlan(layers={fqn: LayerPlan(w_bits=bits) for fqn in ("mlp.0", "mlp.2")})
    small = apply_plan(model, plan, x, space=space)
    path = export_onnx(small, x, tmp_path / "m.onnx", preprocessing={"input_size": [32, 32]})
    inputs = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = small(inputs).numpy()
    key, value = next(iter(bundle_run.SESSION_CONFIG.items()))
    (tmp_path / "cascade.json").write_text('{"threshold": 0.5, "small": {"file": "m.onnx"}, "large": {"file": "m.onnx"}}')
    sessions = [make_session(path), bundle_run.load_session(path, 1)[0], Cascade.load(tmp_path).small]
    for session in sessions:
        assert session.get_session_options().get_session_config_entry(key) == value
        got = session.run(None, {"input": inputs.numpy()})[0]
        np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
    assert "MatMulNBits" in {node.op_type for node in _runtime_nodes(path, tmp_path)}  # the fusion this is about
