from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeopt import estimate_latency
from edgeopt.hw_models.lut import LatencyTable, LayerKey, micro_copies
from edgeopt.hw_models.profiler import (empty_model, layer_model, model_keys, profile_keys,
                                        profile_model, pruned)
from edgeopt.layers import trace_layers
from edgeopt.plan import KEEP_RATIOS, NM
from edgeopt.spaces.prune import kept_channels


@pytest.mark.parametrize("channels", [3, 16, 24, 64, 100, 512])
@pytest.mark.parametrize("round_to", [1, 8, 16])
def test_pruned_counts_channels_as_apply_plan_does(channels, round_to):
    for keep in KEEP_RATIOS:
        assert pruned(channels, keep, 1, round_to) == kept_channels(channels, keep, round_to=round_to)
    assert pruned(96, 0.5, 4) == kept_channels(96, 0.5, channel_groups=4)


def test_model_keys_cover_keep_ratios_and_precisions(tiny, example):
    layers = trace_layers(tiny, example)
    keys = model_keys(layers, keep_ratios=(1.0, 0.5), precisions=((32, 32), (8, 8)))
    assert len(keys) == len(set(keys))
    stem = [k for k in keys if k.input_hw == (16, 16) and k.in_channels == 3]
    # The image input is never pruned; the stem's 16 outputs are measured at 16 and 8.
    assert {(k.in_channels, k.out_channels) for k in stem} == {(3, 16), (3, 8)}
    assert {(k.w_bits, k.a_bits) for k in keys} == {(32, 32), (8, 8)}
    dw = [k for k in keys if k.kind == "depthwise"]
    assert dw and all(k.in_channels == k.out_channels == k.groups for k in dw)
    # Unpruned, every traced layer is in the set.
    for spec in layers:
        assert LayerKey.from_spec(spec, w_bits=8, a_bits=8, nm=None) in keys


def _optimized_ops(model_bytes: bytes, tmp_path) -> collections.Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


KEYS = [
    LayerKey("conv", 8, 16, (3, 3), (2, 2), 1, (9, 9)),
    LayerKey("conv", 8, 16, (1, 1), (1, 1), 1, (5, 5), 8, 8),
    LayerKey("depthwise", 16, 16, (3, 3), (1, 1), 16, (6, 6), 8, 8),
    LayerKey("grouped", 16, 32, (3, 3), (1, 1), 4, (6, 6), 16, 16),
    LayerKey("conv", 8, 16, (3, 3), (1, 1), 1, (6, 6), 4, 8, NM(n=2, m=4)),
    LayerKey("conv", 8, 16, (3, 3), (1, 1), 1, (6, 6), 8, 32),
    LayerKey("linear", 32, 10, (1, 1), (1, 1), 1, (1, 1), 8, 8),
    LayerKey("linear", 32, 10, (1, 1), (1, 1), 1, (7, 1)),
]


@pytest.mark.parametrize("key", KEYS, ids=lambda k: f"{k.kind}-w{k.w_bits}a{k.a_bits}")
@pytest.mark.parametrize("copies", [1, 3])
def test_layer_models_run_with_the_expected_output_shapes(key, copies):
    session = ort.InferenceSession(layer_model(key, copies=copies), providers=["CPUExecutionProvider"])
    arg = session.get_inputs()[0]
    outputs = session.run(None, {arg.name: np.random.randn(*arg.shape).astype(np.float32)})
    assert len(outputs) == copies
    if key.kind == "linear":
        expected = (1, 10) if key.input_hw[0] == 1 else (1, key.input_hw[0], 10)
    else:
        expected = (1, key.out_channels, *key.output_hw)
    assert all(out.shape == expected for out in outputs)


def test_integer_layers_run_as_int8_kernels(tmp_path):
    ops = _optimized_ops(layer_model(LayerKey("conv", 16, 16, (3, 3), (1, 1), 1, (8, 8), 8, 8), copies=2), tmp_path)
    assert ops["QLinearConv"] == 2
    ops = _optimized_ops(layer_model(LayerKey("linear", 64, 32, (1, 1), (1, 1), 1, (1, 1), 8, 8)), tmp_path)
    assert ops["QGemm"] == 1 or ops["QLinearMatMul"] == 1
    ops = _optimized_ops(layer_model(LayerKey("conv", 16, 16, (3, 3), (1, 1), 1, (8, 8))), tmp_path)
    assert ops["QLinearConv"] == 0


def test_copies_push_small_layers_past_the_core_cache(monkeypatch):
    import edgeopt.evaluators.cpu as cpu

    small = LayerKey("conv", 16, 16, (3, 3), (1, 1), 1, (8, 8))  # 9 KB of weights
    mid = LayerKey("conv", 256, 256, (3, 3), (1, 1), 1, (8, 8))  # 2.36 MB
    huge = LayerKey("conv", 1024, 1024, (3, 3), (1, 1), 1, (8, 8))  # 37.7 MB
    monkeypatch.setattr(cpu, "l2_cache_bytes", lambda: 2 * 1024 * 1024)  # 8.4 MB cycled
    assert [micro_copies(k) for k in (small, mid, huge)] == [32, 4, 1]
    monkeypatch.setattr(cpu, "l2_cache_bytes", lambda: 256 * 1024)  # small L2: at least 2 MB
    assert [micro_copies(k) for k in (small, mid, huge)] == [32, 1, 1]
    monkeypatch.setattr(cpu, "l2_cache_bytes", lambda: None)
    assert micro_copies(mid) == 1


def test_empty_model_runs():
    session = ort.InferenceSession(empty_model(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 1), np.float32)})[0].shape == (1, 1)


@pytest.mark.slow
def test_profile_measures_every_key_and_round_trips(tmp_path):
    keys = KEYS[:3]
    table = profile_keys(keys, repeats=3, passes=1)
    assert set(table.rows) == set(keys)
    assert all(v > 0 for v in table.rows.values())
    assert table.meta["threads"] == "1" and float(table.meta["overhead_ms"]) > 0
    assert "measured" in table.meta["origin"]
    again = LatencyTable.from_csv(table.to_csv(tmp_path / "t.csv"))
    assert again.rows == pytest.approx(table.rows, rel=1e-5)


@pytest.mark.slow
def test_a_profiled_model_is_estimated_from_its_table(tiny, example, tmp_path):
    table = profile_model(tiny, example, keep_ratios=(1.0,), precisions=((32, 32),), repeats=3, passes=1)
    path = table.to_csv(tmp_path / "tiny.csv")
    estimate = estimate_latency(tiny, example, target="host", lut=path)
    assert estimate.source == "lut"
    # Layers of the same shape share a row, and each counts once per layer.
    from edgeopt.hw_models.lut import LayerKey
    from edgeopt.layers import trace_layers

    expected = sum(table.rows[LayerKey.from_spec(spec)] for spec in trace_layers(tiny, example[:1]))
    assert estimate.total_ms == pytest.approx(expected + table.overhead_ms, rel=1e-4)


@pytest.mark.slow
def test_profile_model_calibrates_on_whole_model_runs(tiny, example):
    table = profile_model(tiny, example, keep_ratios=(1.0,), round_to=8, repeats=3, passes=1, calibration_plans=2)
    calibration = table.calibration
    # Uniform fp32 and int8 plans at keep 1 and 0.5, plus the 2 random plans.
    assert calibration is not None and calibration.points == 6
    assert table.meta["round_to"] == "8" and table.meta["input_shape"] == "1x3x16x16"
    assert profile_model(tiny, example, keep_ratios=(1.0,), repeats=3, passes=1).calibration is None


@pytest.mark.slow
def test_host_without_a_table_profiles_on_first_use(tiny, example):
    estimate = estimate_latency(tiny, example, target="host")
    assert estimate.source == "lut"
    assert len(estimate.layers) == len(trace_layers(tiny, example))
    assert all(layer.ms > 0 for layer in estimate.layers)
    # Second time round every shape is known: the same numbers, nothing re-measured.
    assert estimate_latency(tiny, example, target="host").total_ms == estimate.total_ms
    bigger = estimate_latency(tiny, torch.randn(1, 3, 32, 32), target="host")
    assert bigger.source == "lut"


def test_the_host_target_travels_to_a_worker_process(tmp_path):
    # Local workers get the search's spec through torch.save; the on-demand profile held a lock.
    import torch

    from edgeopt.hw_models.lut import LayerKey
    from edgeopt.hw_models.targets import get_target

    host = get_target("host")
    key = LayerKey("conv", 8, 8, (3, 3), (1, 1), 1, (8, 8))
    host.latency.layer_ms([key], host)  # something profiled already travels with it
    torch.save({"target": host}, tmp_path / "spec.pt")
    copy = torch.load(tmp_path / "spec.pt", weights_only=False)["target"]
    assert copy.latency.layer_ms([key], copy).ms == host.latency.layer_ms([key], host).ms
