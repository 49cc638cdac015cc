from __future__ import annotations

from edgeopt import LayerPlan, ModelPlan
from edgeopt.budget import parse_budget
from edgeopt.search.report import pareto_info, plot_pareto_html, plot_pareto_png, trials_frame, write_report
from edgeopt.search.select import Candidate


def _c(trial, acc, ms, violation, tuned=None):
    return Candidate(trial=trial, plan=ModelPlan(layers={"x": LayerPlan(keep_ratio=1 - trial / 8)}),
                     proxy_accuracy=acc, latency_ms=ms, macs=10, effective_macs=10, bytes=10,
                     violations=(violation,), accuracy=tuned)


def test_pareto_info_holds_fronts_budget_and_selection(tmp_path):
    budgets = (parse_budget("8ms"),)
    cands = [_c(0, 90, 10, 0.25), _c(1, 85, 6, -0.25, tuned=87), _c(2, 80, 7, -0.1), _c(3, 70, 4, -0.5, tuned=75)]
    info = pareto_info(cands, budgets=budgets, selected=cands[1], base=(12.0, 91.0))
    assert info.front_before == [(4, 70), (6, 85), (10, 90)]
    assert info.front_after == [(4, 75), (6, 87)]
    assert info.latency_budget_ms == 8.0
    assert info.selected == (6, 87)
    assert sum(1 for *_, ok in info.all_points if not ok) == 1
    plot_pareto_png(info, tmp_path / "p.png", target="pi4")
    plot_pareto_html(info, tmp_path / "p.html", target="pi4")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "plotly" in (tmp_path / "p.html").read_text()[:5000].lower()


def test_trials_frame_has_one_row_per_candidate_with_violations():
    budgets = (parse_budget("8ms"), parse_budget("50%"))
    frame = trials_frame([_c(0, 90, 10, 0.25), _c(1, 85, 6, -0.25)], budgets)
    assert list(frame["trial"]) == [0, 1]
    assert list(frame["feasible"]) == [False, True]
    assert "violation[8ms]" in frame.columns


def _summary(*, target_is_here: bool, base_host: float, selected_host: float) -> dict:
    row = {"accuracy": 70.0, "macs": 2e6, "bytes": 4e5, "latency_ms": 3.0, "latency_source": "lut",
           "host_spread_ms": 0.01}
    return {"model": "m", "data": "d", "target": "pi4: a Pi", "target_is_here": target_is_here,
            "budgets": ["50%"], "binds": True, "trials": 4, "sampler": "tpe", "seed": 0, "finetuned": 1,
            "max_drop": 1.0, "min_speedup": 1.1, "proxy_spread": 10.0,
            "base": row | {"latency_ms": 5.0, "host_ms": base_host},
            "selected": row | {"host_ms": selected_host, "trial": 3}}


def test_report_says_why_the_selected_model_is_slower_on_this_machine_than_the_base(tmp_path):
    path = tmp_path / "report.md"
    write_report(path, summary=_summary(target_is_here=False, base_host=0.72, selected_host=1.07))
    text = path.read_text()
    assert "| selected | 70.00 | 2.0 M | 400.0 KB | 3.00 (lut) | 1.07 ± 0.01 |" in text
    assert "runs slower than the base on this machine (1.07 vs 0.72 ms)" in text
    assert "trials were scored on part" not in text  # no trial stopped early
    write_report(path, summary=_summary(target_is_here=False, base_host=0.72, selected_host=1.07)
                 | {"stopped_early": 3, "proxy_images": 2000, "behind_z": 3.0, "far_over": 0.1})
    assert "3 of 4 trials were scored on part of the split's 2,000 images" in path.read_text()
    # Faster here, or the target is this machine: nothing to explain.
    for kwargs in ({"target_is_here": False, "base_host": 1.07, "selected_host": 0.72},
                   {"target_is_here": True, "base_host": 0.72, "selected_host": 1.07}):
        write_report(path, summary=_summary(**kwargs))
        assert "slower than the base" not in path.read_text()


def test_the_plot_says_when_fine_tuned_points_were_measured_rather_than_estimated():
    from dataclasses import replace

    budgets = (parse_budget("8ms"),)
    estimated = [_c(0, 90, 10, 0.25), _c(1, 85, 6, -0.25, tuned=87)]
    assert pareto_info(estimated, budgets=budgets, selected=None, base=(12.0, 91.0)).latency_kind == "estimated"
    measured = [estimated[0], replace(estimated[1], latency_ms=5.5, latency_measured=True)]
    info = pareto_info(measured, budgets=budgets, selected=measured[1], base=(12.0, 91.0))
    assert "measured" in info.latency_kind and info.selected == (5.5, 87)
