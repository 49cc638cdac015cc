from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeopt import EdgeoptError
from edgeopt.hw_models.lut import (REQUIRED_COLUMNS, Calibration, LatencyTable, LayerKey,
                                   calibration_terms, weight_mb_of)
from edgeopt.layers import trace_layers
from edgeopt.plan import NM

HEADER = ",".join(REQUIRED_COLUMNS)


def _row(kind="conv", cin=16, cout=32, k=3, s=1, g=1, h=8, w=8, wb=32, ab=32, nm="", ms=0.5):
    return f"{kind},{cin},{cout},{k},{k},{s},{s},{g},{h},{w},{wb},{ab},{nm},{ms}"


def test_key_from_spec_matches_traced_macs(tiny, example):
    layers = trace_layers(tiny, example)
    for spec in layers:
        key = LayerKey.from_spec(spec)
        assert key.macs == spec.macs, spec.fqn
        assert key.weight_elements * 1 + (spec.params - key.weight_elements) == spec.params


def test_key_of_a_linear_layer_on_tokens_counts_the_tokens():
    model = nn.Sequential(nn.Linear(8, 4))
    spec = trace_layers(model, torch.randn(1, 5, 8))[0]
    key = LayerKey.from_spec(spec)
    assert key.input_hw == (5, 1)
    assert key.macs == spec.macs == 5 * 8 * 4


def test_csv_round_trip_keeps_rows_metadata_and_nm():
    text = "\n".join(["# origin: test", "# overhead_ms: 0.02", HEADER + ",spread_ms",
                      _row(ms=0.5) + ",0.01", _row(wb=8, ab=8, nm="2:4", ms=0.25) + ",",
                      _row(kind="depthwise", cin=16, cout=16, g=16, ms=0.125) + ",0.002"])
    table = LatencyTable.from_text(text)
    again = LatencyTable.from_text(table.to_text())
    assert again.rows == table.rows
    assert again.meta == {"origin": "test", "overhead_ms": "0.02"}
    assert again.overhead_ms == pytest.approx(0.02)
    key = LayerKey("conv", 16, 32, (3, 3), (1, 1), 1, (8, 8), 8, 8, NM(n=2, m=4))
    assert again.lookup(key) == pytest.approx(0.25)
    assert again.spread[LayerKey("conv", 16, 32, (3, 3), (1, 1), 1, (8, 8))] == pytest.approx(0.01)


def test_duplicate_rows_count_once_at_their_median():
    table = LatencyTable.from_text("\n".join([HEADER, _row(ms=1.0), _row(ms=3.0), _row(ms=2.0)]))
    assert len(table) == 1
    assert table.lookup(LayerKey("conv", 16, 32, (3, 3), (1, 1), 1, (8, 8))) == 2.0


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    (HEADER, "no rows"),
    ("op_kind,in_channels,latency_ms\nconv,3,1.0", "lacks the column(s) out_channels"),
    (HEADER + "\n" + _row(cin="x"), "line 2: in_channels='x' is not a whole number"),
    (HEADER + "\n" + _row(ms="fast"), "latency_ms='fast' is not a number"),
    (HEADER + "\n" + _row(ms=-1), "must be a positive number"),
    (HEADER + "\n" + _row(ms="nan"), "must be a positive number"),
    (HEADER + "\n" + _row(kind="pool"), "op_kind 'pool'"),
    (HEADER + "\n" + _row(nm="3:4"), "nm 3:4 is not one of"),
    (HEADER + "\n" + _row(nm="2-4"), "is not empty or N:M"),
    (HEADER + "\n" + _row(wb=5), "w_bits=5"),
    (HEADER + "\n" + _row(kind="depthwise", g=1), "depthwise row needs groups"),
    (HEADER + "\n" + _row(cin=10, g=4, kind="grouped"), "does not divide"),
    (HEADER + "\n" + _row() + "\nconv,16,32,3", "line 3: 4 fields where the header has 14"),
    ("\x00\x01binary", "binary"),
])
def test_bad_tables_say_what_is_wrong(text, message):
    with pytest.raises(EdgeoptError) as info:
        LatencyTable.from_text(text, name="t.csv")
    assert message in str(info.value)


def test_missing_and_binary_files_are_edgeopt_errors(tmp_path):
    with pytest.raises(EdgeoptError, match="No latency table"):
        LatencyTable.from_csv(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(EdgeoptError, match="UTF-8|binary"):
        LatencyTable.from_csv(bad)


def test_bad_calibration_metadata_is_reported():
    text = "# calibration: float_scale=abc\n" + HEADER + "\n" + _row()
    table = LatencyTable.from_text(text, name="t.csv")
    with pytest.raises(EdgeoptError, match="calibration"):
        _ = table.calibration


def _roofline(key: LayerKey) -> float:
    _, per_mac, per_wbyte, per_abyte, *_ = key.features(1)
    return 0.01 + 2e-7 * per_mac + 1e-6 * per_wbyte + 3e-7 * per_abyte


def _synthetic_table() -> LatencyTable:
    rows = {}
    for cin in (16, 32, 64):
        for cout in (16, 48, 96):
            for hw in (8, 16):
                for k in (1, 3):
                    key = LayerKey("conv", cin, cout, (k, k), (1, 1), 1, (hw, hw))
                    rows[key] = _roofline(key)
    return LatencyTable(rows=rows)


def test_fitted_roofline_recovers_the_model_for_unseen_shapes():
    table = _synthetic_table()
    fitted = table.fitted(1)
    unseen = LayerKey("conv", 40, 72, (3, 3), (1, 1), 1, (12, 12))
    assert unseen not in table.rows
    assert fitted.predict(unseen) == pytest.approx(_roofline(unseen), rel=0.02)
    # A family anchor (same kernel, stride, input size) keeps interpolation honest.
    other = LayerKey("conv", 24, 24, (1, 1), (1, 1), 1, (16, 16))
    assert fitted.predict(other) == pytest.approx(_roofline(other), rel=0.02)


def test_anchors_carry_what_the_roofline_misses():
    # One family is 3x slower than the roofline says (a slow kernel): its pruned shapes are too.
    table = _synthetic_table()
    slow = {k: v * 3 for k, v in table.rows.items() if k.kernel == (3, 3) and k.input_hw == (8, 8)}
    table = LatencyTable(rows=table.rows | slow)
    unseen = LayerKey("conv", 40, 72, (3, 3), (1, 1), 1, (8, 8))
    assert table.fitted(1).predict(unseen) == pytest.approx(3 * _roofline(unseen), rel=0.1)


def test_calibration_terms_mark_precision_switches():
    keys = [LayerKey("conv", 3, 16, (3, 3), (1, 1), 1, (8, 8)),
            LayerKey("conv", 16, 16, (3, 3), (1, 1), 1, (8, 8), 8, 8),
            LayerKey("conv", 16, 16, (3, 3), (1, 1), 1, (8, 8), 8, 8),
            LayerKey("conv", 16, 16, (3, 3), (1, 1), 1, (8, 8))]
    terms = calibration_terms(keys, [1.0, 2.0, 3.0, 4.0])
    assert [t[0] for t in terms] == [1.0, 0.0, 0.0, 4.0]  # float ms
    assert [t[1] for t in terms] == [0.0, 2.0, 3.0, 0.0]  # integer ms
    switch_mb = 16 * 8 * 8 * 4 / 1e6
    assert [t[4] for t in terms] == [0.0, switch_mb, 0.0, switch_mb]
    assert terms[1][2] == pytest.approx(weight_mb_of(keys[1]))


def test_calibration_text_round_trip_and_apply():
    cal = Calibration(float_scale=1.5, int_scale=2.0, weight_ms_per_mb=0.1, layer_ms=0.01,
                      switch_ms_per_mb=0.0, points=7, error_pct=3.5)
    again = Calibration.from_text(cal.to_text())
    assert again == cal
    key = LayerKey("linear", 1000, 1000, (1, 1), (1, 1), 1, (1, 1))
    assert cal.apply([key], [1.0]) == [pytest.approx(1.5 + 0.1 * 4.0 + 0.01)]
    with pytest.raises(EdgeoptError, match="positive scales"):
        Calibration.from_text("float_scale=0")
    with pytest.raises(EdgeoptError, match="unknown fields"):
        Calibration.from_text("speed=3")
