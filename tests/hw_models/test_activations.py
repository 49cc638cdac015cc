"""What runs on a layer's output before the next layer: the activation and the squeeze-excite gate
that `trace_layers` finds, the latency keys and tables that carry them, the one-layer graphs
that time them on the host, and the pi4 model's price for them (issue 20, point 2)."""

from __future__ import annotations

import collections
import contextlib
import io
import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from edgeopt import EdgeoptError, SearchSpace, apply_plan, estimate_latency, get_target
from edgeopt.hw_models import LatencyTable, LayerKey
from edgeopt.hw_models.lut import PRICED_ACTIVATIONS
from edgeopt.hw_models.pi4 import ACTIVATION_WORK, NCNN_FUSED, PRIORS, Pi4Model
from edgeopt.hw_models.profiler import layer_model
from edgeopt.layers import trace_layers


def _found(model: nn.Module, size: int = 32) -> tuple[collections.Counter, collections.Counter]:
    layers = trace_layers(model.eval(), torch.randn(1, 3, size, size))
    return (collections.Counter(s.activation for s in layers if s.activation),
            collections.Counter(s.gate for s in layers if s.gate))


# -- what the trace finds ------------------------------------------------------------------------
@pytest.mark.parametrize("name, activations, gates", [
    # SiLU after every expand/depthwise conv and the SE's squeeze conv, the gate's sigmoid after
    # the SE's excite conv, and a sigmoid gate on each of the 16 depthwise convs.
    ("efficientnet_b0", {"silu": 49, "sigmoid": 16}, {"sigmoid": 16}),
    ("mobilenet_v3_small", {"hardswish": 19, "relu": 14, "hardsigmoid": 9}, {"hardsigmoid": 9}),
    ("regnet_y_400mf", {"relu": 49, "sigmoid": 16}, {"sigmoid": 16}),
    ("mnasnet1_0", {"relu": 35}, {}),
])
def test_torchvision_activations_and_gates_are_found(name, activations, gates):
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    assert _found(model) == (collections.Counter(activations), collections.Counter(gates))


@pytest.mark.parametrize("name, activations, gates", [
    # timm's BatchNormAct2d runs the activation inside the norm module.
    ("efficientnet_b0", {"silu": 49, "sigmoid": 16}, {"sigmoid": 16}),
    ("mobilenetv3_large_100", {"hardswish": 21, "relu": 19, "hardsigmoid": 8}, {"hardsigmoid": 8}),
    # Most of ghostnet's gates multiply a concatenation (a ghost module's output), not one layer's
    # output: only the two after a strided depthwise conv belong to a layer.
    ("ghostnet_100", {"relu": 42, "hardsigmoid": 7}, {"hardsigmoid": 2}),
])
def test_timm_activations_and_gates_are_found(name, activations, gates):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=10)
    assert _found(model) == (collections.Counter(activations), collections.Counter(gates))


class Swish(nn.Module):
    """A hand-written SiLU (as timm's Swish): two calls, recognized by what it computes."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(x.sigmoid()) if self.inplace else x * x.sigmoid()


class HardSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class Block(nn.Module):
    """conv -> BatchNorm -> activation -> squeeze-excite gate -> 1x1 conv."""

    def __init__(self, act: nn.Module | None = None, gate_act: nn.Module | None = None, *, fn=None,
                 bn: bool = True, tap: str = "") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16) if bn else nn.Identity()
        self.act, self.fn, self.tap = act, fn, tap
        self.fc1, self.fc2, self.gate_act = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1), gate_act
        self.out = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.conv(x)
        normed = self.bn(raw)
        y = self.fn(normed) if self.fn is not None else self.act(normed) if self.act is not None else normed
        if self.gate_act is not None:
            y = y * self.gate_act(self.fc2(torch.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = self.out(y)
        # The layer's output (or its normalized output) also read elsewhere: not the activation's alone.
        return y + {"raw": raw, "norm": normed}[self.tap][:, :8] if self.tap else y


@pytest.mark.parametrize("block, activation, gate", [
    (Block(nn.SiLU(), nn.Sigmoid()), "silu", "sigmoid"),
    (Block(fn=F.silu), "silu", None),  # a functional call in a forward
    (Block(Swish()), "silu", None),  # a module built of other calls
    (Block(Swish(inplace=True), HardSigmoid()), "silu", "hardsigmoid"),
    (Block(nn.Hardswish(), nn.Hardsigmoid()), "hardswish", "hardsigmoid"),
    (Block(nn.ReLU(inplace=True), nn.Sigmoid()), "relu", "sigmoid"),
    (Block(nn.ReLU6()), "relu6", None),
    (Block(nn.GELU(), bn=False), "gelu", None),  # straight after the conv
    (Block(nn.GELU(approximate="tanh")), "gelu_tanh", None),
    (Block(nn.Mish()), "mish", None),
    (Block(None, nn.Sigmoid()), None, "sigmoid"),  # a gate on the normalized output, no activation
    (Block(nn.SiLU(), nn.Sigmoid(), tap="raw"), None, "sigmoid"),  # the conv's output goes elsewhere too
    (Block(nn.SiLU(), tap="norm"), None, None),  # ... or the BatchNorm's
])
def test_the_activation_and_gate_of_a_layer(block, activation, gate):
    spec = {s.fqn: s for s in trace_layers(block.eval(), torch.randn(1, 3, 8, 8))}
    assert (spec["conv"].activation, spec["conv"].gate) == (activation, gate)
    assert spec["out"].activation is None and spec["out"].gate is None
    if gate is not None:  # the gate's own convs: the squeeze conv's ReLU, the excite conv's gate activation
        assert (spec["fc1"].activation, spec["fc2"].activation) == ("relu", gate)


def test_an_applied_plan_keeps_the_activations_and_gates():
    model = Block(nn.SiLU(), nn.Sigmoid()).eval()
    x = torch.randn(1, 3, 16, 16)
    space = SearchSpace.from_model(model, x)
    int8 = apply_plan(model, space.uniform(w_bits=8, a_bits=8), x, calib_data=[torch.randn(4, 3, 16, 16)])
    before = [(s.fqn, s.activation, s.gate) for s in trace_layers(model, x)]
    after = trace_layers(int8, x)
    assert [(s.fqn, s.activation, s.gate) for s in after] == before
    assert all(s.w_bits == 8 and s.a_bits == 8 for s in after)


# -- latency keys and tables ---------------------------------------------------------------------
def test_keys_count_relu_class_activations_as_none():
    spec = {s.fqn: s for s in trace_layers(Block(nn.ReLU6(), nn.Sigmoid()).eval(), torch.randn(1, 3, 8, 8))}
    assert LayerKey.from_spec(spec["conv"]).activation is None  # runs inside the conv
    assert LayerKey.from_spec(spec["conv"]).gate == "sigmoid"
    assert LayerKey.from_spec(spec["fc2"]).activation == "sigmoid"
    key = LayerKey.from_spec(spec["fc2"], w_bits=8, a_bits=8)
    assert (key.activation, key.with_precision(32, 32, None).activation, key.with_channels(2, 8).activation) == \
        ("sigmoid",) * 3


def test_keys_built_positionally_keep_their_meaning():
    # As tests/spaces/test_dynamic.py builds them: 11 fields, the last `dynamic`.
    key = LayerKey("linear", 64, 32, (1, 1), (1, 1), 1, (1, 1), 8, 32, None, True)
    assert key.dynamic and key.activation is None and key.gate is None
    assert key != key.with_output("gelu", None)


def test_activation_and_gate_columns_round_trip(tmp_path):
    plain = LayerKey("depthwise", 32, 32, (3, 3), (1, 1), 32, (16, 16))
    rows = {plain: 0.1, plain.with_output("silu", None): 0.2, plain.with_output("silu", "sigmoid"): 0.3,
            plain.with_precision(8, 8, None).with_output("hardswish", "hardsigmoid"): 0.25}
    path = LatencyTable(rows=rows).to_csv(tmp_path / "t.csv")
    header = [line for line in path.read_text().splitlines() if not line.startswith("#")][0]
    assert header.endswith(",activation,gate")
    assert LatencyTable.from_csv(path).rows == pytest.approx(rows)
    # A table with no activation or gate writes neither column: the format old readers know.
    assert "activation" not in LatencyTable(rows={plain: 0.1}).to_text()


def test_an_activation_a_table_cannot_name_is_refused_with_its_line():
    key = LayerKey("conv", 8, 8, (1, 1), (1, 1), 1, (4, 4)).with_output("silu", None)
    text = LatencyTable(rows={key: 1.0}).to_text()
    for name in ("swish", "relu"):  # a name edgeopt does not know; one the kernel runs itself
        with pytest.raises(EdgeoptError, match=f"t.csv, line 2: activation '{name}'"):
            LatencyTable.from_text(text.replace(",silu", f",{name}"), name="t.csv")


def test_a_table_without_activations_is_read_as_it_was_timed():
    # A table written before activations were keyed (or profiled on a ReLU model) timed each layer
    # alone: a SiLU layer with a gate is looked up as that layer, exactly.
    key = LayerKey("conv", 16, 16, (3, 3), (1, 1), 1, (8, 8))
    host = get_target("host").with_lut(LatencyTable(rows={key: 0.5}))
    times = host.latency.layer_ms([key.with_output("silu", "sigmoid")], host)
    assert (times.ms, times.sources) == ([0.5], ["lut"])


def test_the_shipped_pi4_table_carries_activations():
    table = get_target("pi4").latency.table
    kinds = collections.Counter(key.activation for key in table.rows)
    assert kinds["silu"] > 100 and kinds["hardswish"] > 50 and kinds[None] > 5000
    assert not any(key.gate for key in table.rows)  # pi4 prices gates as the ops they run


# -- the host's one-layer graphs ------------------------------------------------------------------
def _exported_after_conv(act: nn.Module) -> list[str]:
    """The op types torch.onnx writes after a Conv for `act`, as export_onnx exports (opset 17,
    converted to 21)."""
    model = nn.Sequential(nn.Conv2d(8, 8, 1), act).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 8, 4, 4),), buffer, dynamo=False, opset_version=17)
    proto = onnx.version_converter.convert_version(onnx.load_from_string(buffer.getvalue()), 21)
    ops = [n.op_type for n in proto.graph.node if n.op_type != "Constant"]
    return ops[ops.index("Conv") + 1:]


ACTIVATION_MODULES = {
    "leaky_relu": nn.LeakyReLU(), "elu": nn.ELU(), "selu": nn.SELU(), "celu": nn.CELU(), "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "mish": nn.Mish(), "sigmoid": nn.Sigmoid(),
    "hardsigmoid": nn.Hardsigmoid(), "hardswish": nn.Hardswish(), "tanh": nn.Tanh(), "softplus": nn.Softplus(),
    "prelu": nn.PReLU(8),
}


def test_every_activation_a_key_can_name_has_a_module_here():
    assert set(ACTIVATION_MODULES) == set(PRICED_ACTIVATIONS) == set(ACTIVATION_WORK)


@pytest.mark.parametrize("kind", sorted(ACTIVATION_MODULES))
def test_the_one_layer_graph_writes_the_activation_as_the_export_does(kind):
    key = LayerKey("conv", 8, 8, (1, 1), (1, 1), 1, (4, 4)).with_output(kind, None)
    ops = [n.op_type for n in onnx.load_from_string(layer_model(key)).graph.node]
    assert ops[ops.index("Conv") + 1:] == _exported_after_conv(ACTIVATION_MODULES[kind])


def _runtime_ops(model: bytes, tmp_path) -> collections.Counter:
    """The op types onnxruntime runs for a one-layer graph, after its fusions."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def test_an_int8_layer_runs_its_silu_and_gate_in_float(tmp_path):
    # As in an int8 efficientnet_b0: the integer conv, then Sigmoid and Mul on its dequantized
    # output, the float pool of that, and the gate's product.
    key = LayerKey("depthwise", 32, 32, (3, 3), (1, 1), 32, (8, 8), 8, 8).with_output("silu", "sigmoid")
    ops = _runtime_ops(layer_model(key), tmp_path)
    assert ops["QLinearConv"] == 1 and ops["Sigmoid"] == 1 and ops["Mul"] == 2 and ops["GlobalAveragePool"] == 1
    # After a ReLU-class activation (absorbed) the pool reads the integers: onnxruntime's
    # QLinearGlobalAveragePool, as in an int8 mobilenet_v3_small.
    ops = _runtime_ops(layer_model(key.with_output(None, "hardsigmoid")), tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QLinearGlobalAveragePool"] == 1 and ops["Sigmoid"] == 0


# -- what surgery changes changes the estimate -----------------------------------------------------
class SmallNet(nn.Module):
    """An inverted-residual block with SiLU and a squeeze-excite gate (torchvision's), at 32 channels."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import SqueezeExcitation

        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.SiLU())
        self.se = SqueezeExcitation(32, 8, activation=nn.SiLU)
        self.project = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.stem(x))))
        return self.head(y.mean((2, 3)))


def _variants() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    full = SmallNet().eval()
    relu, ungated = SmallNet().eval(), SmallNet().eval()
    relu.load_state_dict(full.state_dict())
    ungated.load_state_dict(full.state_dict())
    relu.dw[2] = nn.ReLU()  # one SiLU replaced
    ungated.se = nn.Identity()  # the gate removed
    return {"full": full, "relu": relu, "ungated": ungated}


def test_pi4_prices_a_replaced_activation_and_a_removed_gate():
    x = torch.randn(1, 3, 32, 32)
    est = {name: estimate_latency(m, x, target="pi4") for name, m in _variants().items()}
    model = get_target("pi4").latency.model()
    silu = model.activation_ms("silu", 32 * 32 * 32)
    # The SiLU's price is what replacing it saves (its layer's other costs are the same).
    assert est["full"].total_ms - est["relu"].total_ms == pytest.approx(silu, rel=1e-4)  # the table keeps 6 digits
    # The gate: its pool, its two convs and its product.
    saved = est["full"].total_ms - est["ungated"].total_ms
    gate_parts = (sum(layer.ms for layer in est["full"].layers if layer.fqn.startswith("se."))
                  + sum(op.ms for op in est["full"].ops if " in se" in op.fqn))
    assert saved == pytest.approx(gate_parts, rel=1e-4) and saved > 0.01


def test_pi4_activation_prices():
    model = Pi4Model({name: value for name, (value, _) in PRIORS.items()})
    for hw, gbps in ((28, 40.0), (56, 6.0)):  # a pass of 401 KB in all stays in L2; one of 1.6 MB does not
        key = LayerKey("conv", 64, 64, (1, 1), (1, 1), 1, (hw, hw))
        n = 64 * hw * hw
        assert model.layer_ms(key.with_output("silu", None)) - model.layer_ms(key) == pytest.approx(
            2e-3 + n * 8 / (gbps * 1e6) + n / 1.5e6)  # op_us + the pass + the work
    # ncnn fuses a sigmoid into the conv: only its work; a hard swish is a fifth of a sigmoid's work.
    assert model.activation_ms("sigmoid", n) == pytest.approx(n / 1.5e6)
    assert model.activation_ms("hardswish", n) - model.activation_ms("silu", n) == pytest.approx(-0.8 * n / 1.5e6)
    assert model.layer_ms(key.with_output(None, "sigmoid")) == model.layer_ms(key)  # gates are ops
    assert set(NCNN_FUSED) < set(ACTIVATION_WORK)


def _island_priced(keys, **kwargs) -> LatencyTable:
    """A stand-in for the host's micro-benchmark (a timing must not gate a test): 10 us per layer,
    3 more for a float activation after it, 5 more for a gate on its output."""
    return LatencyTable(rows={k: 0.010 + 0.003 * (k.activation is not None) + 0.005 * (k.gate is not None)
                              for k in keys}, name="host")


def test_host_prices_a_replaced_activation_and_a_removed_gate(monkeypatch):
    import dataclasses

    from edgeopt.hw_models import profiler

    monkeypatch.setattr(profiler, "profile_keys", _island_priced)
    host = dataclasses.replace(get_target("host"), latency=profiler.OnDemandProfile())  # its own cache
    x = torch.randn(1, 3, 32, 32)
    est = {name: estimate_latency(m, x, target=host) for name, m in _variants().items()}
    by_layer = {name: e.breakdown() for name, e in est.items()}
    # The depthwise layer is looked up with its SiLU and gate, so each one it loses takes their
    # price off it; the layers the change does not touch keep theirs.
    assert by_layer["relu"]["dw.0"] == pytest.approx(by_layer["full"]["dw.0"] - 0.003)
    assert by_layer["ungated"]["dw.0"] == pytest.approx(by_layer["full"]["dw.0"] - 0.005)
    assert by_layer["relu"]["stem.0"] == by_layer["full"]["stem.0"]
    assert est["relu"].total_ms < est["full"].total_ms
    assert est["ungated"].total_ms < est["full"].total_ms - 0.005  # the gate's convs go too


def test_host_micro_benchmarks_the_float_islands_with_the_layer():
    # What profile_keys times for a key: the layer, then its activation and gate in the same graph.
    key = LayerKey("depthwise", 64, 64, (3, 3), (1, 1), 64, (32, 32), 8, 8)
    ops = [collections.Counter(node.op_type for node in onnx.load_from_string(layer_model(k)).graph.node)
           for k in (key, key.with_output("silu", None), key.with_output("silu", "sigmoid"))]
    plain, silu, gated = ops
    assert silu["Sigmoid"] == plain["Sigmoid"] + 1 and silu["Mul"] == plain["Mul"] + 1  # x * sigmoid(x)
    # The gate: the pool of that output and the product with it (its small convolutions are layers
    # of their own).
    assert gated["GlobalAveragePool"] == silu["GlobalAveragePool"] + 1 and gated["Mul"] == silu["Mul"] + 1
