"""What runs between the layers (edgeopt.hw_models.graph) and how the pi4 model prices it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeopt import estimate_latency, get_target
from edgeopt.hw_models.graph import trace_graph
from edgeopt.hw_models.lut import OpKey
from edgeopt.hw_models.lut import LayerKey
from edgeopt.hw_models.pi4 import CACHE_BYTES, PRIORS, Pi4Model
from edgeopt.layers import trace_layers


class Branches(nn.Module):
    """conv-BN-ReLU (all one layer), a residual add, a 3x3 average pool, a branch times zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.unused = nn.Conv2d(8, 8, 1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        y = x + self.b(x)
        y = self.pool(y) + self.unused(x).mul(0.0)
        return self.head(torch.flatten(y.mean((2, 3)), 1))


def test_the_trace_keeps_trace_layers_and_finds_the_ops_between_them():
    model, x = Branches().eval(), torch.randn(1, 3, 16, 16)
    graph = trace_graph(model, x)
    assert [s.fqn for s in graph.layers] == [s.fqn for s in trace_layers(model, x)]
    assert graph.dead == {"unused"}  # only multiplied by zero
    kinds = sorted((op.kind, op.taps) for op in graph.ops)
    # BN and ReLU fuse into conv a; the add, the 3x3 pool and the global mean remain; adding the
    # zero product and flattening are free.
    assert kinds == [("elementwise", 1), ("pool", 9), ("pool", 256)]
    add = next(op for op in graph.ops if op.kind == "elementwise")
    assert (add.in_elements, add.out_elements) == (2 * 8 * 256, 8 * 256)


def test_an_activation_after_a_shared_output_is_not_fused():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y) + y  # y is read twice: the ReLU cannot run inside the conv

    graph = trace_graph(Shared().eval(), torch.randn(1, 3, 8, 8))
    assert sorted(op.name.split(" ")[0] for op in graph.ops) == ["add", "relu"]


def test_pi4_prices_the_ops_and_drops_the_dead_layer():
    model, x = Branches().eval(), torch.randn(1, 3, 16, 16)
    estimate = estimate_latency(model, x, target="pi4")
    by_name = {layer.fqn: layer for layer in estimate.layers}
    assert not by_name["unused"].runs and by_name["unused"].ms == 0
    assert len(estimate.ops) == 3 and all(op.ms > 0 for op in estimate.ops)
    assert estimate.total_ms == pytest.approx(sum(l.ms for l in estimate.layers) + estimate.ops_ms
                                              + estimate.overhead_ms)
    # Without op pricing (a table passed by hand) the same model costs its layers only.
    table = get_target("pi4").latency.table
    layers_only = estimate_latency(model, x, target="pi4", lut=table)
    assert layers_only.ops == () and all(layer.runs for layer in layers_only.layers)


def _model(**overrides: float) -> Pi4Model:
    params = {name: value for name, (value, _) in PRIORS.items()} | overrides
    return Pi4Model(params)


def test_winograd_tiles_make_an_8x8_map_cost_what_a_12x12_one_does():
    # Only compute: no overhead, memory at an enormous bandwidth.
    m = _model(layer_us=0.0, weight_gbps=1e9, act_gbps=1e9, cache_gbps=1e9)
    key = lambda hw, k: LayerKey("conv", 16, 16, (k, k), (1, 1), 1, (hw, hw))  # noqa: E731
    assert m.layer_ms(key(8, 3)) == pytest.approx(m.layer_ms(key(12, 3)))
    assert m.layer_ms(key(12, 3)) < m.layer_ms(key(13, 3))
    assert m.layer_ms(key(8, 1)) == pytest.approx(m.layer_ms(key(12, 1)) * 64 / 144)  # a 1x1 has no tiles


def test_activations_in_l2_move_at_cache_speed():
    m = _model(op_us=0.0, cache_gbps=40.0, act_gbps=5.0)
    elements = CACHE_BYTES // 8  # read and written: exactly the cache's share
    small = OpKey("elementwise", elements, elements)
    big = OpKey("elementwise", elements + 8, elements + 8)
    assert m.op_ms(small) == pytest.approx(CACHE_BYTES / 40e6)
    assert m.op_ms(big) == pytest.approx((CACHE_BYTES + 64) / 5e6)
    pool = OpKey("pool", elements, elements, taps=9)
    assert m.op_ms(pool) == pytest.approx(m.op_ms(small) + 9 * elements / (PRIORS["gtaps_pool"][0] * 1e6))
