from __future__ import annotations

import numpy as np
import pytest

from edgeopt import EdgeoptError, export_onnx, measure_latency
from edgeopt.evaluators.latency import ReferenceClock, calibration_samples, measure_model_latency, summarize
from edgeopt.hw_models.lut import LayerKey
from edgeopt.hw_models.profiler import layer_model


def test_summarize_drops_interference_and_reports_the_rest():
    fast = [1.0, 1.02, 0.98, 1.01, 0.99, 1.03, 1.0, 0.97, 1.01, 1.02]
    slow = [1.6, 1.7, 1.55]  # another process shared the core for these
    m = summarize(fast + slow, threads=1)
    assert m.runs == 13 and m.outliers == 3 and m.kept == 10
    assert m.median_ms == pytest.approx(np.median(fast))
    assert m.raw_median_ms == pytest.approx(np.median(fast + slow))
    q25, q75 = np.percentile(fast, [25, 75])
    assert m.spread_ms == pytest.approx(q75 - q25)
    assert m.min_ms == 0.97 and m.min_ms <= m.p10_ms <= m.median_ms


def test_summarize_keeps_ordinary_jitter():
    samples = list(np.linspace(1.0, 1.2, 50))
    m = summarize(samples, threads=2)
    assert m.outliers == 0 and m.threads == 2
    with pytest.raises(EdgeoptError):
        summarize([], threads=1)


def test_measure_latency_statistics_are_consistent(tiny, example, tmp_path):
    path = export_onnx(tiny, example, tmp_path / "tiny.onnx")
    m = measure_latency(path, repeats=20, min_time_s=0.05)
    assert m.runs >= 20 and 0 <= m.outliers < m.runs
    # The kept runs are those within 30% of the 10th percentile of all runs, so their median
    # lies below that bound (not necessarily above p10: under heavy load most runs are dropped).
    assert 0 < m.min_ms <= m.p10_ms and m.min_ms <= m.median_ms <= m.p10_ms * 1.3 + 0.005
    assert m.kept >= 0.1 * m.runs
    assert m.spread_ms >= 0 and m.threads == 1


def test_measure_latency_accepts_serialized_models():
    key = LayerKey("conv", 8, 8, (3, 3), (1, 1), 1, (8, 8))
    m = measure_latency(layer_model(key), repeats=5, min_time_s=0.01)
    assert m.median_ms > 0 and m.runs >= 5


def test_a_thousand_times_the_work_measures_slower():
    tiny = measure_latency(layer_model(LayerKey("conv", 4, 4, (1, 1), (1, 1), 1, (4, 4))),
                           repeats=20, min_time_s=0.05)
    big = measure_latency(layer_model(LayerKey("conv", 128, 128, (3, 3), (1, 1), 1, (56, 56))),
                          repeats=5, min_time_s=0.05)
    assert big.median_ms > 20 * tiny.median_ms  # ~460 MMACs against 64 MACs


def test_the_reference_clock_reads_models_against_its_reference():
    small = layer_model(LayerKey("conv", 4, 4, (1, 1), (1, 1), 1, (4, 4)))
    big = layer_model(LayerKey("conv", 64, 64, (3, 3), (1, 1), 1, (56, 56)))  # ~115 MMACs
    clock = ReferenceClock(small, min_pairs=5, min_time_s=0.01)
    assert clock.reference_ms > 0
    itself = clock.measure(small)
    assert itself.runs >= 3 * 5 and itself.spread_ms >= 0
    # The reference against itself reads near its own time; a model of a million times the work
    # far above it, on the scale the reference was given.
    assert 0.5 * clock.reference_ms < itself.median_ms < 2 * clock.reference_ms
    scaled = ReferenceClock(small, reference_ms=1.0, min_pairs=5, min_time_s=0.01)
    assert scaled.reference_ms == 1.0 and scaled.measure(big).median_ms > 20


def test_measure_latency_errors_say_what_to_do(tmp_path):
    with pytest.raises(EdgeoptError, match="No ONNX file"):
        measure_latency(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EdgeoptError, match="could not load"):
        measure_latency(bad)
    with pytest.raises(EdgeoptError, match="repeats"):
        measure_latency(bad, repeats=0)
    with pytest.raises(EdgeoptError, match="threads"):
        measure_latency(layer_model(LayerKey("conv", 4, 4, (1, 1), (1, 1), 1, (4, 4))), threads=0)


@pytest.mark.slow
def test_measured_model_latency_is_the_measured_source(tiny, example):
    estimate = measure_model_latency(tiny, example, repeats=10, min_time_s=0.05)
    assert estimate.source == "measured" and estimate.total_ms > 0
    assert estimate.spread_ms is not None and estimate.spread_ms >= 0


@pytest.mark.slow
def test_calibration_samples_measure_each_plan(tiny, example):
    samples = calibration_samples(tiny, example, precisions=((32, 32), (8, 8)), keep_ratios=(1.0,),
                                  random_plans=1, passes=1)
    assert len(samples) == 3
    precisions = [{(s.w_bits, s.a_bits) for s in layers} for layers, _ in samples]
    assert precisions[0] == {(32, 32)} and precisions[1] == {(8, 8)}
    assert all(ms > 0 for _, ms in samples)
