"""Model surgery: which blocks are open to it, what each replacement does to the model, its costs
and latency, and that it composes with pruning, int8 and export."""

from __future__ import annotations

import dataclasses

import onnxruntime as ort
import optuna
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from edgeopt import EdgeoptError, ModelPlan, SearchSpace, Surgery, apply_plan, estimate_latency, export_onnx
from edgeopt.evaluators.cost import model_cost
from edgeopt.evaluators.cpu import int8_needs_reduce_range
from edgeopt.search.optimize import target_knobs
from edgeopt.search.sensitivity import changes
from edgeopt.search.study import plan_params, suggest_plan
from edgeopt.hw_models.lut import LayerKey
from edgeopt.hw_models.targets import LayerTimes, get_target
from edgeopt.layers import trace_layers
from edgeopt.spaces.surgery import activation_kind, shrink_kernel, surgery_blocks
from edgeopt.spaces.space import Knobs

LITE = Surgery(activation="relu", gate=False, kernel=3)


def _efficientnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.efficientnet_b0(num_classes=10).eval()


def test_a_surgery_is_frozen_data_with_a_json_round_trip():
    plan = ModelPlan(surgery={"features.1.0.block": LITE, "features.2.0.block": Surgery(gate=False),
                              "features.3.0.block": Surgery()})
    assert list(plan.surgery) == ["features.1.0.block", "features.2.0.block"]  # the no-op block is not kept
    assert ModelPlan.from_json(plan.to_json()) == plan
    assert plan != ModelPlan(surgery={"features.1.0.block": LITE})
    assert ModelPlan().key() == ModelPlan(surgery={"b": Surgery()}).key()  # no surgery: the old digest
    assert LITE.describe() == "activations -> relu, gate removed, kernels 3x3"
    for bad, message in ((dict(activation="swish"), "activation"), (dict(kernel=5), "kernel"),
                         (dict(gate="no"), "gate")):
        with pytest.raises(EdgeoptError, match=message):
            Surgery(**bad)
    with pytest.raises(EdgeoptError, match="Unknown surgery fields"):
        ModelPlan.from_dict({"layers": {}, "surgery": {"b": {"act": "relu"}}})


@pytest.mark.parametrize(("module", "kind"), [
    (nn.SiLU(), "silu"), (nn.SiLU(inplace=True), "silu"), (nn.Hardswish(), "hardswish"), (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu"), (nn.Mish(), "mish"), (timm.layers.activations.Swish(), "silu"),
    (timm.layers.activations.HardSwish(), "hardswish"), (timm.layers.activations.GELU(), "gelu"),
    (nn.ReLU(), None), (nn.ReLU6(), None), (nn.Sigmoid(), None), (nn.Hardsigmoid(), None), (nn.Identity(), None),
    (nn.Conv2d(1, 1, 1), None),
])
def test_replaceable_activations_are_recognized_by_what_they_compute(module, kind):
    assert activation_kind(module) == kind


class _Gates(nn.Module):
    """A squeeze-excite gate with a shared activation, a spatial attention (no pooling: not a
    squeeze-excite gate) and a functional SiLU (no module to replace)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.SiLU()
        self.se = torchvision.ops.SqueezeExcitation(8, 4)
        self.spatial = nn.Conv2d(8, 1, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))
        x = self.se(x)
        x = x * torch.sigmoid(self.spatial(x))
        x = F.silu(self.dw(x))
        return self.head(self.act(x).mean((2, 3)))


def test_sites_are_found_by_behaviour_and_grouped_in_blocks():
    model = _Gates().eval()
    space = SearchSpace.from_model(model, torch.randn(1, 3, 16, 16))
    sites = {(b.name, b.activations, b.gates, b.kernels) for b in space.surgery_blocks}
    # Each site alone at the top of the model is a block of its own.
    assert sites == {("act", ("act",), (), ()), ("se", (), ("se",), ()), ("dw", (), (), ("dw",))}

    blocks = {b.name: b for b in SearchSpace.from_model(_efficientnet(), torch.randn(1, 3, 32, 32)).surgery_blocks}
    mbconv = blocks["features.2.0.block"]  # expand, depthwise (with SiLU) and the gate's own SiLU
    assert mbconv.activations == ("features.2.0.block.0.2", "features.2.0.block.1.2", "features.2.0.block.2.activation")
    assert mbconv.gates == ("features.2.0.block.2",) and mbconv.kernels == ()
    assert blocks["features.3.0.block"].kernels == ("features.3.0.block.1.0",)  # a 5x5 depthwise stage
    assert blocks["features"].activations == ("features.0.2", "features.8.2")  # the stem's and the head's
    assert sum(len(b.gates) for b in blocks.values()) == 16 and sum(len(b.kernels) for b in blocks.values()) == 9


@pytest.mark.parametrize(("build", "gates", "activations"), [
    (lambda: timm.create_model("efficientnet_b0", num_classes=10), 16, 49),  # BatchNormAct2d holds the SiLU
    (lambda: timm.create_model("mobilenetv3_large_100", num_classes=10), 8, 21),  # its 21 nn.Hardswish
    (lambda: torchvision.models.regnet_y_400mf(num_classes=10), 16, 0),
    (lambda: torchvision.models.resnet18(num_classes=10), 0, 0),
], ids=["timm efficientnet_b0", "timm mobilenetv3_large_100", "regnet_y_400mf", "resnet18"])
def test_families_open_to_surgery(build, gates, activations):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, 64, 64)
    blocks = surgery_blocks(model, x, SearchSpace.from_model(model, x).layers)
    assert sum(len(b.gates) for b in blocks) == gates
    assert sum(len(b.activations) for b in blocks) == activations


def test_a_shrunk_kernel_keeps_its_centre_and_its_output_size():
    conv = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8)
    small = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8)
    small.load_state_dict(conv.state_dict())
    shrink_kernel(small)
    x = torch.randn(2, 8, 15, 15)
    assert small(x).shape == conv(x).shape and small.kernel_size == (3, 3) and small.padding == (1, 1)
    assert torch.equal(small.weight, conv.weight[:, :, 1:4, 1:4])
    centre_only = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8)
    with torch.no_grad():
        centre_only.weight.zero_()
        centre_only.weight[:, :, 1:4, 1:4] = conv.weight[:, :, 1:4, 1:4]
        centre_only.bias.copy_(conv.bias)
    torch.testing.assert_close(small(x), centre_only(x))


def test_each_replacement_changes_the_model_its_costs_and_its_latency():
    model = _efficientnet()
    x = torch.randn(1, 3, 32, 32)
    space = SearchSpace.from_model(model, x)
    base = model_cost(apply_plan(model, ModelPlan(), x, space=space), x)  # BatchNorm folded, as in the others
    block = "features.3.0.block"  # a 5x5 depthwise block with a gate
    plans = {kind: ModelPlan(surgery={block: Surgery(**{kind: value})})
             for kind, value in (("activation", "relu"), ("gate", False), ("kernel", 3))}
    models = {kind: apply_plan(model, plan, x, space=space) for kind, plan in plans.items()}
    mb = lambda m: m.features[3][0].block  # noqa: E731
    assert isinstance(mb(models["activation"])[0][2], nn.ReLU) and isinstance(mb(models["activation"])[1][2], nn.ReLU)
    assert isinstance(mb(models["activation"])[3], nn.Sequential)  # the projection is untouched
    assert isinstance(mb(models["gate"])[2], nn.Identity)
    assert mb(models["kernel"])[1][0].kernel_size == (3, 3)
    se = model.features[3][0].block[2]
    se_macs = se.fc1.in_channels * se.fc1.out_channels + se.fc2.in_channels * se.fc2.out_channels
    traced = {fqn: {layer.fqn for layer in trace_layers(m, x)} for fqn, m in (("base", model), *models.items())}
    assert traced["base"] - traced["gate"] == {f"{block}.2.fc1", f"{block}.2.fc2"}
    assert traced["kernel"] == traced["activation"] == traced["base"]
    assert base.macs - model_cost(models["gate"], x).macs >= se_macs  # with its pool and its product
    dw = model.features[3][0].block[1][0]
    positions = (x.shape[-1] // 4 // 2) ** 2  # the block's depthwise layer runs at stride 2 from 8x8
    assert base.macs - model_cost(models["kernel"], x).macs == dw.out_channels * (25 - 9) * positions
    assert model_cost(models["activation"], x).macs == base.macs
    base_ms = estimate_latency(model, x, target="pi4").total_ms
    for kind in ("gate", "kernel"):
        assert estimate_latency(models[kind], x, target="pi4").total_ms < base_ms, kind
    # The host times each layer key as it is asked for (a measurement, so no ordering is asserted
    # here): what it is asked for must carry each replacement.
    asked = {name: _host_keys(m, x) for name, m in (("base", model), *models.items())}
    assert asked["base"][f"{block}.1.0"].gate == "sigmoid" and asked["gate"][f"{block}.1.0"].gate is None
    assert set(asked["base"]) - set(asked["gate"]) == {f"{block}.2.fc1", f"{block}.2.fc2"}
    assert asked["base"][f"{block}.1.0"].kernel == (5, 5) and asked["kernel"][f"{block}.1.0"].kernel == (3, 3)
    assert asked["base"][f"{block}.0.0"].activation == "silu" and asked["activation"][f"{block}.0.0"].activation is None


def _host_keys(model: nn.Module, x: torch.Tensor) -> dict[str, LayerKey]:
    """The layer keys `estimate_latency` asks the host's latency model for, by layer name."""
    class Recorder:
        def layer_ms(self, keys, target):
            self.keys = keys
            return LayerTimes(ms=[0.0] * len(keys), sources=["lut"] * len(keys))

    recorder = Recorder()
    estimate = estimate_latency(model, x, target=dataclasses.replace(get_target("host"), latency=recorder))
    return dict(zip((layer.fqn for layer in estimate.layers), recorder.keys))


def test_lite_int8_composes_with_pruning_and_agrees_with_onnxruntime(tmp_path):
    model = _efficientnet()
    x = torch.randn(1, 3, 32, 32)
    calib = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    space = SearchSpace.from_model(model, x)
    plan = space.uniform(w_bits=8, a_bits=8, keep_ratio=0.75, surgery=LITE)
    assert set(plan.surgery) == {b.name for b in space.surgery_blocks}
    small = apply_plan(model, plan, x, calib_data=calib, space=space, reduce_range=int8_needs_reduce_range())
    assert not any(isinstance(m, (nn.SiLU, torchvision.ops.SqueezeExcitation)) for m in small.modules())
    path = export_onnx(small, x, tmp_path / "lite.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = small(inputs).numpy()
    got = session.run(None, {"input": inputs.numpy()})[0]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 15 / 16
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert "Sigmoid" not in ops  # no SiLU and no gate left: the integer kernels chain


def test_the_search_suggests_surgery_per_block_and_validates_it():
    model = _efficientnet()
    x = torch.randn(1, 3, 32, 32)
    space = SearchSpace.from_model(model, x)
    host = space.restrict(target_knobs(get_target("host"), size_matters=False))
    jetson = space.restrict(target_knobs(get_target("jetson-orin-nano"), size_matters=False))
    block = host.surgery_blocks[1]
    assert host.surgery_choices(block) == {"activation": (None, "relu"), "gate": (True, False)}
    assert "activation" not in jetson.surgery_choices(block)  # TensorRT fuses any activation
    assert not space.restrict(Knobs(surgery=())).surgery_blocks
    assert all(set(space.restrict(Knobs(surgery="gate")).surgery_choices(b)) == {"gate"}
               for b in space.restrict(Knobs(surgery="gate")).surgery_blocks)
    with pytest.raises(EdgeoptError, match="must name some of"):
        Knobs(surgery=("activations",))
    plan = host.uniform(w_bits=8, a_bits=8, surgery=LITE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(plan_params(plan, host))
    assert suggest_plan(study.ask(), host) == plan
    assert set(study.trials[0].distributions[f"gate/{block.name}"].choices) == {"keep", "remove"}
    keys = [key for key, _ in changes(host)]
    assert f"gate=False {block.name}" in keys and f"activation=relu {block.name}" in keys
    assert "kernel=3 features.3.0.block" in keys
    with pytest.raises(EdgeoptError, match="'relu6' not offered"):
        host.validate(ModelPlan(surgery={block.name: Surgery(activation="relu6")}))
    with pytest.raises(EdgeoptError, match="takes no surgery"):
        host.validate(ModelPlan(surgery={"classifier": LITE}))
    # A gate removed takes its layers out of the plan's concern: plans differing only there are one.
    gate_layers = [f for f in plan.layers if f.startswith(block.gates[0] + ".")]
    assert gate_layers and all(plan.layers[f] == host.uniform().layers[f] for f in gate_layers)


def test_a_replaced_activation_trains_where_a_module_after_it_writes_in_place():
    # mobilenet_v3's classifier: Linear, Hardswish, Dropout(inplace=True), Linear. ReLU's gradient
    # reads its output, which the in-place dropout would have overwritten.
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    space = SearchSpace.from_model(model.eval(), x[:1])
    assert any(b.name == "classifier" for b in space.surgery_blocks)
    small = apply_plan(model, space.uniform(surgery=Surgery(activation="relu")), x[:1], space=space).train()
    assert isinstance(small.classifier[1], nn.ReLU)
    small(x).sum().backward()
    assert small.classifier[0].weight.grad is not None
