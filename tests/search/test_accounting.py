"""Per-layer accounting: what each layer's compression saved, and why it did not pay where it
did not (edgeopt.search.accounting)."""

from __future__ import annotations

import csv

from edgeopt.evaluators.node_profile import LayerTime, NodeProfile
from edgeopt.hw_models.estimate import LatencyEstimate, LayerLatency
from edgeopt.layers import LayerSpec
from edgeopt.plan import LayerPlan, ModelPlan
from edgeopt.search.accounting import account_layers, report_lines, write_layers_csv


def spec(fqn: str, out_channels: int = 16, macs: int = 1000) -> LayerSpec:
    return LayerSpec(fqn=fqn, kind="conv", in_channels=16, out_channels=out_channels, kernel=(3, 3), stride=(1, 1),
                     groups=1, input_hw=(8, 8), positions=64, macs=macs, params=16 * out_channels * 9)


def estimate(ms: dict[str, float]) -> LatencyEstimate:
    return LatencyEstimate(total_ms=sum(ms.values()), source="lut", target="host",
                           layers=tuple(LayerLatency(fqn=f, kind="conv", ms=t, source="lut") for f, t in ms.items()))


def profile(times: dict[str, tuple[float, float]]) -> NodeProfile:
    layers = {f: LayerTime(kernel_ms=k, serving_ms=s) for f, (k, s) in times.items()}
    total = sum(k + s for k, s in times.values()) + 0.01
    return NodeProfile(layers=layers, between={"Add": 0.01}, total_ms=total, whole_ms=total, overhead_ms=0.0,
                       runs=3, threads=1)


PLAN = ModelPlan(layers={
    "slow_int8": LayerPlan(w_bits=8, a_bits=8),  # its int8 kernel is no faster than fp32
    "island": LayerPlan(w_bits=8, a_bits=8),  # faster kernel, but its quantizers eat the gain
    "paid": LayerPlan(w_bits=8, a_bits=8),
    "odd_width": LayerPlan(keep_ratio=0.75),  # pruned to 12 channels: not a multiple of 8
    "untouched": LayerPlan(),
}, dropped=frozenset({"block"}))
BASE = [spec("slow_int8"), spec("island"), spec("paid"), spec("odd_width"), spec("untouched"), spec("block.conv")]
NOW = [spec("slow_int8"), spec("island"), spec("paid"), spec("odd_width", out_channels=12, macs=750),
       spec("untouched")]


def rows(measured_clock: bool = True):
    base_ms = {s.fqn: 1.0 for s in BASE}
    return account_layers(
        plan=PLAN, base_layers=BASE, layers=NOW, modules={},
        base_estimate=estimate(base_ms), estimate=estimate({"slow_int8": 1.0, "island": 0.6, "paid": 0.5,
                                                            "odd_width": 1.0, "untouched": 1.0}),
        base_profile=profile({f: (1.0, 0.0) for f in base_ms}),
        profile=profile({"slow_int8": (1.1, 0.2), "island": (0.6, 0.5), "paid": (0.4, 0.1), "odd_width": (1.0, 0.0),
                         "untouched": (1.0, 0.0)}),
        measured_clock=measured_clock, target="host", simd=8)


def test_each_layer_says_what_it_saved_and_why_a_compression_did_not_pay():
    by = {r.layer: r for r in rows()}
    assert by["slow_int8"].flag.startswith("int8 kernel no faster than fp32 here (1.100 vs 1.000 ms)")
    assert by["island"].flag.startswith("float island") and "(0.500 ms)" in by["island"].flag
    assert by["paid"].flag == "" and by["paid"].saved_ms == 0.5 and by["paid"].serving_ms == 0.1
    assert by["odd_width"].flag == "channels (12) not a multiple of the SIMD width (8)"
    assert by["odd_width"].base_macs - by["odd_width"].macs == 250
    assert by["untouched"].flag == "" and by["untouched"].knobs == "unchanged"
    # A dropped block's layer costs nothing any more, and is not a compression that failed.
    dropped = by["block.conv"]
    assert dropped.knobs.startswith("dropped") and (dropped.macs, dropped.bytes, dropped.measured_ms) == (0, 0, 0.0)
    assert dropped.saved_ms == 1.0 and dropped.flag == ""


def test_a_target_not_measured_here_is_judged_on_its_estimate():
    by = {r.layer: r for r in rows(measured_clock=False)}
    # On the estimate, "island" saves 0.4 ms and pays; "slow_int8" saves nothing there.
    assert by["island"].flag == ""
    assert by["slow_int8"].flag == "int8 no faster than fp32 on host (estimated)"


def test_layers_csv_and_the_report_section_carry_the_rows(tmp_path):
    table = rows()
    write_layers_csv(table, tmp_path / "layers.csv")
    with open(tmp_path / "layers.csv") as handle:
        written = list(csv.DictReader(handle))
    assert [r["layer"] for r in written] == [r.layer for r in table]
    assert float(written[2]["saved_ms"]) == 0.5 and written[0]["flag"] == table[0].flag
    lines = "\n".join(report_lines(table, target="host", measured_clock=True, between=(0.01, 0.02), overhead_ms=0.004))
    assert "4.0 us per node" in lines
    assert "## Per layer: what paid" in lines and "3 of 5 compressed layers did not pay" in lines
    assert "| odd_width | keep 0.75 | 250 |" in lines


def test_a_saving_within_the_sessions_spread_is_not_counted_as_paid():
    from edgeopt.search.accounting import why_not_paid

    args = dict(plan=PLAN, fqn="paid", spec=spec("paid"), base_ms=1.0, ms=0.5, kernel_ms=0.4, base_kernel_ms=1.0,
                serving_ms=0.1, measured=True, target="host", simd=8)
    assert why_not_paid(**args, noise_ms=0.3) == ""
    assert why_not_paid(**args, noise_ms=0.6).startswith("not shown faster here (within the measurement's spread")
    # Slower by more than the spread: the measurement shows why.
    slower = dict(args, ms=1.5, kernel_ms=1.2)
    assert why_not_paid(**slower, noise_ms=0.3).startswith("int8 kernel no faster than fp32 here")
