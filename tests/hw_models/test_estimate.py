from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from edgeopt import NM, EdgeoptError, SearchSpace, apply_plan, estimate_latency, get_target
from edgeopt.hw_models import (Calibration, LatencyTable, LayerKey, TableLatency, calibrate_table,
                               estimate_layers)
from edgeopt.hw_models.lut import REQUIRED_COLUMNS, calibration_terms
from edgeopt.layers import trace_layers


def _write_table(path, layers, ms_of, *, overhead=0.0, w_bits=32, a_bits=32):
    lines = [f"# overhead_ms: {overhead}", ",".join(REQUIRED_COLUMNS)]
    for spec in layers:
        key = LayerKey.from_spec(spec, w_bits=w_bits, a_bits=a_bits, nm=None)
        row = key.row() | {"latency_ms": ms_of(spec)}
        lines.append(",".join(str(row[c]) for c in REQUIRED_COLUMNS))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_profile_table_is_read_exactly(tiny, example, tmp_path):
    layers = trace_layers(tiny, example)
    path = _write_table(tmp_path / "t.csv", layers, lambda s: s.macs / 1e6, overhead=0.05)
    estimate = estimate_latency(tiny, example, target="host", lut=path)
    assert estimate.source == "lut"
    assert all(layer.source == "lut" for layer in estimate.layers)
    assert estimate.breakdown() == pytest.approx({s.fqn: s.macs / 1e6 for s in layers})
    assert estimate.total_ms == pytest.approx(sum(s.macs for s in layers) / 1e6 + 0.05)
    assert estimate.target == "host"


def test_tables_are_read_once_per_file_version(tiny, example, tmp_path):
    path = _write_table(tmp_path / "t.csv", trace_layers(tiny, example), lambda s: 1.0)
    assert TableLatency.load(path) is TableLatency.load(path)


def test_without_int8_rows_int8_gets_no_speedup(tiny, example, calib, tmp_path):
    # A table that never measured int8 must not invent a speed-up for it.
    layers = trace_layers(tiny, example)
    path = _write_table(tmp_path / "t.csv", layers, lambda s: 0.1 + s.macs / 1e6)
    space = SearchSpace.from_model(tiny, example)
    int8 = apply_plan(tiny, space.uniform(w_bits=8, a_bits=8), example, calib_data=calib)
    fp32 = estimate_latency(tiny, example, target="pi4", lut=path)
    estimate = estimate_latency(int8, example, target="pi4", lut=path)
    assert estimate.source == "model"
    assert estimate.total_ms == pytest.approx(fp32.total_ms, rel=1e-6)


def test_missing_shapes_fall_back_to_the_fitted_model_never_an_error(tiny, example, tmp_path):
    layers = trace_layers(tiny, example)
    path = _write_table(tmp_path / "t.csv", layers, lambda s: 0.01 + s.macs / 1e6)
    bigger = trace_layers(tiny, torch.randn(1, 3, 24, 24))  # every shape is new
    estimate = estimate_layers(bigger, target="host", lut=path)
    assert estimate.source == "model"
    assert all(layer.ms > 0 for layer in estimate.layers)
    # More pixels, more time: the fitted model extrapolates in the right direction.
    assert estimate.total_ms > estimate_layers(layers, target="host", lut=path).total_ms


def test_pi4_bits_below_8_and_nm_do_not_lower_the_estimate(tiny, example, calib):
    space = SearchSpace.from_model(tiny, example)
    w8 = apply_plan(tiny, space.uniform(w_bits=8, a_bits=8), example, calib_data=calib)
    w4 = apply_plan(tiny, space.uniform(w_bits=4, a_bits=8), example, calib_data=calib)
    w8_24 = apply_plan(tiny, space.uniform(w_bits=8, a_bits=8, nm=NM(n=2, m=4)), example, calib_data=calib)
    fp16 = apply_plan(tiny, space.uniform(w_bits=16, a_bits=16), example, calib_data=calib)
    e = {name: estimate_latency(m, example, target="pi4").total_ms
         for name, m in (("fp32", tiny), ("w8", w8), ("w4", w4), ("w8_24", w8_24), ("fp16", fp16))}
    assert e["w4"] == e["w8"] == e["w8_24"]
    assert e["fp16"] == e["fp32"]
    assert e["w8"] < e["fp32"]  # int8 pays on the A72


def test_pi4_estimate_of_resnet18_is_from_the_shipped_table_and_int8_pays():
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.zeros(1, 3, 224, 224)
    layers = trace_layers(model, x)
    fp32 = estimate_layers(layers, target="pi4")
    int8 = estimate_layers([dataclasses.replace(s, w_bits=8, a_bits=8) for s in layers], target="pi4")
    assert fp32.source == "lut" and int8.source == "lut"
    assert 1.3 < fp32.total_ms / int8.total_ms < 2.5  # the published int8 gain on a Pi 4 is 1.8x
    assert 50 < fp32.total_ms < 500  # published: 176 ms with ncnn, 4 threads


def _layer(cin: int, cout: int, hw: int, **bits) -> list:
    model = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1))
    spec = trace_layers(model, torch.randn(1, cin, hw, hw))[0]
    return [dataclasses.replace(spec, **bits)]


def test_jetson_2to4_pays_only_on_layers_large_enough():
    big_dense = estimate_layers(_layer(256, 256, 56, w_bits=8, a_bits=8), target="jetson-orin-nano")
    big_sparse = estimate_layers(_layer(256, 256, 56, w_bits=8, a_bits=8, nm=NM(n=2, m=4)),
                                 target="jetson-orin-nano")
    assert big_sparse.source == "model"
    assert big_sparse.total_ms < 0.8 * big_dense.total_ms
    small_dense = estimate_layers(_layer(8, 8, 4, w_bits=8, a_bits=8), target="jetson-orin-nano")
    small_sparse = estimate_layers(_layer(8, 8, 4, w_bits=8, a_bits=8, nm=NM(n=2, m=4)),
                                   target="jetson-orin-nano")
    assert small_sparse.total_ms == small_dense.total_ms
    # fp16 and int8 tensor math pay on a compute-bound layer.
    fp32 = estimate_layers(_layer(256, 256, 56), target="jetson-orin-nano").total_ms
    fp16 = estimate_layers(_layer(256, 256, 56, w_bits=16, a_bits=16), target="jetson-orin-nano").total_ms
    assert big_dense.total_ms < fp16 < fp32


def test_channel_multiple_makes_odd_channel_counts_no_cheaper_on_jetson():
    at_64 = estimate_layers(_layer(64, 64, 28, w_bits=16, a_bits=16), target="jetson-orin-nano").total_ms
    at_57 = estimate_layers(_layer(57, 57, 28, w_bits=16, a_bits=16), target="jetson-orin-nano").total_ms
    assert at_57 >= at_64 * 0.99


def test_unknown_target_is_an_edgeopt_error(tiny, example):
    with pytest.raises(EdgeoptError, match="Unknown target"):
        estimate_latency(tiny, example, target="pdp11")


def _synthetic_specs():
    """Models of different widths and precisions: the samples a calibration sees."""
    out = []
    for width in (8, 16, 32):
        model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1),
                              nn.Conv2d(width, 2 * width, 1), nn.Conv2d(2 * width, width, 3, padding=1))
        layers = trace_layers(model, torch.randn(1, 3, 16, 16))
        for pattern in ("ffff", "iiii", "fifi", "ffii"):
            out.append([dataclasses.replace(s, w_bits=8, a_bits=8) if p == "i" else s
                        for s, p in zip(layers, pattern)])
    return out


def test_calibration_recovers_the_corrections_that_made_the_samples():
    samples_layers = _synthetic_specs()
    rows = {}
    for layers in samples_layers:
        for spec in layers:
            key = LayerKey.from_spec(spec)
            rows[key] = 0.01 + spec.macs / 2e6
    table = LatencyTable(rows=rows, meta={"overhead_ms": "0.02"})
    truth = Calibration(float_scale=1.3, int_scale=1.1, weight_ms_per_mb=0.5, layer_ms=0.004,
                        switch_ms_per_mb=2.0)
    samples = []
    for layers in samples_layers:
        keys = [LayerKey.from_spec(s) for s in layers]
        ms = [rows[k] for k in keys]
        samples.append((layers, sum(truth.apply(keys, ms)) + 0.02))
    calibrated = calibrate_table(table, samples, target=get_target("host"))
    cal = calibrated.calibration
    assert cal.float_scale == pytest.approx(1.3, rel=0.05)
    assert cal.int_scale == pytest.approx(1.1, rel=0.05)
    assert cal.switch_ms_per_mb == pytest.approx(2.0, rel=0.1)
    assert cal.points == len(samples) and cal.error_pct < 1.0
    # The calibrated table now reproduces the samples.
    layers, measured = samples[5]
    assert estimate_layers(layers, target="host", lut=calibrated).total_ms == pytest.approx(measured, rel=0.01)
    # And the correction survives a CSV round trip.
    again = LatencyTable.from_text(calibrated.to_text())
    assert again.calibration == cal


def test_calibration_needs_enough_samples(tiny, example):
    layers = trace_layers(tiny, example)
    table = LatencyTable(rows={LayerKey.from_spec(s): 1.0 for s in layers})
    with pytest.raises(EdgeoptError, match="at least 3"):
        calibrate_table(table, [(layers, 5.0)], target=get_target("host"))


def test_calibration_terms_follow_execution_order(tiny, example):
    keys = [LayerKey.from_spec(s) for s in trace_layers(tiny, example)]
    terms = calibration_terms(keys, [1.0] * len(keys))
    assert len(terms) == len(keys) and all(t[4] == 0 for t in terms)  # all float: no switch
