"""What a search leaves behind: trials.csv, the Pareto plots and report.md.

Compute, then render: `pareto_info` returns plain data (tested); the plot functions only draw it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from edgeopt.budget import Budget
from edgeopt.search.select import Candidate, pareto_front


def trials_frame(candidates: list[Candidate], budgets: tuple[Budget, ...]) -> pd.DataFrame:
    rows = []
    for c in candidates:
        row = {
            "trial": c.trial, "plan_key": c.plan.key(), "input_scale": c.plan.input_scale,
            "proxy_accuracy": c.proxy_accuracy, "proxy_images": c.proxy_images,
            "screened_accuracy": c.screened_accuracy, "finetuned_proxy_accuracy": c.tuned_proxy_accuracy,
            "finetuned_accuracy": c.accuracy,
            "latency_ms": c.latency_ms, "latency_measured": c.latency_measured, "macs": c.macs,
            "effective_macs": c.effective_macs, "bytes": c.bytes, "feasible": c.feasible,
        }
        for budget, violation in zip(budgets, c.violations):
            row[f"violation[{budget.text}]"] = violation
        rows.append(row)
    columns = ["trial", "plan_key", "input_scale", "proxy_accuracy", "proxy_images", "screened_accuracy",
               "finetuned_proxy_accuracy", "finetuned_accuracy", "latency_ms",
               "latency_measured", "macs", "effective_macs", "bytes", "feasible"]
    return pd.DataFrame(rows, columns=columns + [f"violation[{b.text}]" for b in budgets])


@dataclass(frozen=True, kw_only=True)
class ParetoInfo:
    """Points to draw: every trial, the front before and after fine-tuning, budget, selection."""

    all_points: list[tuple[float, float, bool]]  # (latency_ms, proxy accuracy, feasible)
    front_before: list[tuple[float, float]]
    front_after: list[tuple[float, float]]  # (latency_ms, validation accuracy after fine-tuning)
    latency_budget_ms: float | None
    selected: tuple[float, float] | None
    base: tuple[float, float]  # (latency_ms, accuracy) of the uncompressed model
    latency_kind: str = "estimated"  # how the latencies drawn were obtained, for the axis label
    cascade_curve: list[tuple[float, float]] | None = None  # (expected ms, val accuracy) over thresholds
    cascade_point: tuple[float, float] | None = None  # the chosen threshold's


def pareto_info(candidates: list[Candidate], *, budgets: tuple[Budget, ...], selected: Candidate | None,
                base: tuple[float, float], cascade_curve=None, cascade_point=None) -> ParetoInfo:
    tuned = [c for c in candidates if c.accuracy is not None]
    latency = [b.value for b in budgets if b.metric == "latency_ms"]
    return ParetoInfo(
        all_points=[(c.latency_ms, c.proxy_accuracy, c.feasible) for c in candidates],
        front_before=[(c.latency_ms, c.proxy_accuracy) for c in pareto_front(candidates)],
        front_after=[(c.latency_ms, c.accuracy) for c in pareto_front(tuned, accuracy=lambda c: c.accuracy)],
        latency_budget_ms=min(latency) if latency else None,
        selected=(selected.latency_ms, selected.best_accuracy) if selected else None,
        base=base,
        latency_kind=("estimated; fine-tuned points and base measured here"
                      if any(c.latency_measured for c in tuned) else "estimated"),
        cascade_curve=cascade_curve, cascade_point=cascade_point,
    )


def plot_pareto_png(info: ParetoInfo, path: Path, *, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    feasible = [(x, y) for x, y, ok in info.all_points if ok]
    infeasible = [(x, y) for x, y, ok in info.all_points if not ok]
    if infeasible:
        ax.scatter(*zip(*infeasible), s=12, c="#bbbbbb", label="trials over budget")
    if feasible:
        ax.scatter(*zip(*feasible), s=14, c="#4c72b0", alpha=0.6, label="trials within budget")
    if info.front_before:
        ax.plot(*zip(*info.front_before), "-o", c="#4c72b0", ms=4, label="Pareto front (proxy)")
    if info.front_after:
        ax.plot(*zip(*info.front_after), "-s", c="#dd8452", ms=5, label="after fine-tuning (val)")
    if info.latency_budget_ms is not None:
        ax.axvline(info.latency_budget_ms, ls="--", c="#c44e52", label="latency budget")
    if info.cascade_curve:
        ax.plot(*zip(*sorted(info.cascade_curve)), ":", c="#55a868", label="cascade over thresholds (val, expected ms)")
        ax.scatter(*info.cascade_point, marker="P", c="#55a868", s=90, zorder=5, label="cascade/")
    ax.scatter([info.base[0]], [info.base[1]], marker="D", c="black", s=40, label="base model")
    if info.selected:
        ax.scatter([info.selected[0]], [info.selected[1]], marker="*", c="#c44e52", s=220,
                   zorder=5, label="selected")
    ax.set_xlabel(f"latency on {target} (ms, {info.latency_kind})")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pareto_html(info: ParetoInfo, path: Path, *, target: str) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for ok, name, color in ((True, "trials within budget", "#4c72b0"), (False, "trials over budget", "#bbbbbb")):
        pts = [(x, y) for x, y, f in info.all_points if f == ok]
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers",
                                     name=name, marker={"color": color, "size": 6}))
    for pts, name, color in ((info.front_before, "Pareto front (proxy)", "#4c72b0"),
                             (info.front_after, "after fine-tuning (val)", "#dd8452")):
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                     name=name, line={"color": color}))
    if info.cascade_curve:
        pts = sorted(info.cascade_curve)
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines", line={"dash": "dot",
                                 "color": "#55a868"}, name="cascade over thresholds (val, expected ms)"))
        fig.add_trace(go.Scatter(x=[info.cascade_point[0]], y=[info.cascade_point[1]], mode="markers", name="cascade/",
                                 marker={"symbol": "cross", "color": "#55a868", "size": 12}))
    fig.add_trace(go.Scatter(x=[info.base[0]], y=[info.base[1]], mode="markers", name="base model",
                             marker={"symbol": "diamond", "color": "black", "size": 10}))
    if info.selected:
        fig.add_trace(go.Scatter(x=[info.selected[0]], y=[info.selected[1]], mode="markers", name="selected",
                                 marker={"symbol": "star", "color": "#c44e52", "size": 18}))
    if info.latency_budget_ms is not None:
        fig.add_vline(x=info.latency_budget_ms, line_dash="dash", line_color="#c44e52")
    fig.update_layout(xaxis_title=f"latency on {target} (ms, {info.latency_kind})",
                      yaxis_title="top-1 accuracy (%)", template="plotly_white")
    fig.write_html(str(path), include_plotlyjs=True)


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


PROXY_TEXT = {
    "heldout": "top-1 of each candidate on the proxy split (held out from training)",
    "sensitivity": "per-layer sensitivity: each knob's drop measured once on the proxy split, "
                   "a candidate scored from the share of predictions its changes leave alone",
}


def _stopped_early(s: dict) -> str:
    if not s.get("stopped_early"):
        return ""
    return (f"; {s['stopped_early']} of {s['trials']} trials were scored on part of the split's "
            f"{s['proxy_images']:,} images (column proxy_images of trials.csv): they trailed a trial within "
            f"budget that costs no more by over {s['behind_z']:g} standard errors, or were over a budget by "
            f"more than {s['far_over']:.0%}")


def write_report(path: Path, *, summary: dict, layer_section: list[str] = ()) -> None:
    """report.md: what was run, base vs selected, how the selection was made, and (from
    `edgeopt.search.accounting`) what each layer's compression paid."""
    s = summary
    lines = [
        "# edgeopt report", "",
        f"- model: {s['model']}", f"- data: {s['data']}",
        f"- preprocessing the exported model expects (also in its ONNX metadata, key "
        f"`edgeopt.preprocessing`): {s.get('preprocessing_text', 'not recorded')}",
        f"- search space: {(s.get('space') or ['not recorded'])[0]}",
        f"- target: {s['target']}",
        f"- budget: {', '.join(s['budgets'])} ({'binds' if s['binds'] else 'does not bind'} on the base model)",
        f"- trials: {s['trials']} ({s['sampler']}, seed {s['seed']}); screened: {s.get('screened', 0)}; "
        f"fine-tuned: {s['finetuned']}",
        f"- accuracy proxy: {PROXY_TEXT.get(s.get('proxy', 'heldout'), s.get('proxy'))}{_stopped_early(s)}",
        "",
        "| | accuracy (%) | MACs | size | latency on target (ms) | measured host latency (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for label in ("base", "selected"):
        row = s.get(label)
        if row is None:
            lines.append(f"| {label} | no candidate met the budget | | | | |")
            continue
        host = f"{row['host_ms']:.2f} ± {row['host_spread_ms']:.2f}" if row.get("host_ms") is not None else "n/a"
        of = f" ({row['accuracy_of']})" if row.get("accuracy_of") else ""
        lines.append(f"| {label} | {row['accuracy']:.2f}{of} | {row['macs'] / 1e6:.1f} M | {_fmt_bytes(row['bytes'])} "
                     f"| {row['latency_ms']:.2f} ({row['latency_source']}) | {host} |")
    lines += ["", "Accuracy is validation top-1 on data the search, the fine-tuning and the selection never saw "
              "(the selection compares top-1 on the proxy split); the base model's is measured the same way. "
              "Host latency: onnxruntime, median ± interquartile range.", ""]
    c = s.get("cascade")
    if c:
        worst = ("" if c.get("budget_ms") is None else
                 f"; the worst case, an input sent on, takes {c['worst_case_ms']:.3f} ms (both models), "
                 f"{'within' if c['worst_case_meets_budget'] else 'over'} the {c['budget_ms']:g} ms budget, "
                 "which the cascade meets on its expected latency")
        lines += ["## Cascade", "",
                  f"cascade/ runs small.onnx (trial {c['small']['trial']}, {c['small']['latency_ms']:.3f} ms) on every "
                  f"input and large.onnx (trial {c['large']['trial']}, {c['large']['latency_ms']:.3f} ms) where the "
                  f"small one's highest softmax probability is below {c['threshold']:g}: {c['accuracy']:.2f}% "
                  f"validation top-1 with {100 * c['share_sent_on']:.1f}% of the images sent on, "
                  f"{c['expected_latency_ms']:.3f} ms expected ({c['latency_source']}){worst}. The pair and the "
                  "threshold were chosen on the proxy split. `edgeopt.Cascade.load('cascade')` runs it with "
                  "onnxruntime and numpy only.", ""]
    gone = (s.get("selected") or {}).get("dropped_blocks")
    if gone:
        lines += [f"The selected model drops {len(gone)} residual block{'s' if len(gone) > 1 else ''}, each left as "
                  f"its shortcut: {', '.join(gone)} (plan.json, `dropped`).", ""]
    surgery = (s.get("selected") or {}).get("surgery")
    if surgery:
        lines += [f"The selected model takes model surgery in {len(surgery)} block{'s' if len(surgery) > 1 else ''} "
                  "(plan.json, `surgery`; fine-tuned with distillation from your model like every other change):", ""]
        lines += [f"- {block}: {what}" for block, what in surgery.items()] + [""]
    chosen_size = (s.get("selected") or {}).get("input_size")
    if chosen_size and chosen_size != list((s.get("preprocessing") or {}).get("input_size", chosen_size)):
        h, w = chosen_size
        lines += [f"The selected model runs at a smaller input: {h}x{w} (input scale "
                  f"{s['selected']['input_scale']:g} of the data's). In PyTorch it resizes a full-size input "
                  f"itself; the exported model.onnx takes {h}x{w}: resize the data's images to it (bilinear, "
                  "antialiased, as PIL's resize does; run.py does it, and the ONNX metadata's `input_size`, "
                  "`data_size` and `input_resize` say so).", ""]
    if s.get("selected") or any(c.get("saved") for c in s.get("closest") or []):
        lines += ["selected/ is the bundle for the device: model.onnx, run.py (onnxruntime, numpy and Pillow "
                  "only: classifies images or a camera frame and measures latency) and README.md (install, "
                  "run, threads, profiling the device).", ""]
    if s.get("selected") and s["selected"].get("host_outputs_exact") is False:
        lines += ["The selected model keeps full-range 8-bit weights, as the target runs them. "
                  "onnxruntime on this machine (x86 without VNNI) sums int8 products in saturating "
                  "16-bit pairs, so here its host latency is a timing only and its outputs can differ "
                  "from the PyTorch model's. For a model to deploy on such a machine, optimize for "
                  "`--target host`, which gives 8-bit weights 7 bits of range.", ""]
    if s.get("deploy_note"):
        # The latency column is for the target's runtime; the bundle in selected/ may run another.
        lines += [s["deploy_note"] + " selected/README.md says how.", ""]
    base, chosen = s.get("base") or {}, s.get("selected") or {}
    if (s.get("target_is_here") is False and base.get("host_ms") is not None
            and chosen.get("host_ms") is not None and chosen["host_ms"] > base["host_ms"]):
        # A user reads the host column as "is it faster?"; say why it can be slower here.
        lines += [f"The selected model runs slower than the base on this machine ({chosen['host_ms']:.2f} vs "
                  f"{base['host_ms']:.2f} ms): the search made it fast on the target, whose runtime is "
                  "not this machine's. On an x86 CPU without VNNI, int8 depthwise layers run no faster "
                  "than float ones, and every switch between float and int8 costs time (BENCHMARKS.md). "
                  "For a model to run fast here, optimize for `--target host`.", ""]
    lines += list(layer_section)
    if s.get("kendall_tau") is not None:
        lines.append(f"Kendall tau between proxy and fine-tuned accuracy over the fine-tuned "
                     f"candidates: {s['kendall_tau']:.2f}.")
        lines.append("")
    lines += ["## Selection rule", "",
              f"Among candidates that meet every budget, the most accurate; among those within "
              f"{s['max_drop']} points of it and at least {s['min_speedup']}x faster on the target, the "
              "fastest (if none, the most accurate). Accuracy here is top-1 on the proxy split, after "
              "fine-tuning where a candidate was fine-tuned (validation top-1 is reported, never "
              "selected on).", "",
              "Considered for fine-tuning: the most accurate Pareto candidate, the hand plan (the "
              "starting plan that meets every budget and prunes least), then faster Pareto candidates "
              f"within {s['proxy_spread']} proxy points of the most accurate. "
              + (f"Each of these {s['screened']} got {s['screen_epochs']:g} epochs of fine-tuning first and was "
                 "scored on the proxy split; fully fine-tuned: the one the rule above picks on those "
                 "scores, the hand plan, then the best scored." if s.get("screened") else "")
              + (f" Also fine-tuned, as a cascade's small member only (never selected alone): trial "
                 f"{s['small_member']['trial']}, the best screened of the fastest candidates, with "
                 f"{s['small_member']['epochs']:g} epochs." if s.get("small_member") else ""), ""]
    if len(s.get("space") or []) > 1:
        lines += ["## What the search could not compress", "",
                  "Layers left out of the search space and prune groups kept dense, with the reason:", ""]
        lines += [f"- {line}" for line in s["space"][1:]]
        lines.append("")
    if s.get("closest"):
        lines += ["## No candidate met the budget", "", "Closest candidates (relative excess per budget):", ""]
        for c in s["closest"]:
            saved = " (saved in selected/)" if c.get("saved") else ""
            lines.append(f"- trial {c['trial']}{saved}: accuracy {c['accuracy']:.2f} ({c.get('accuracy_of', '')}), "
                         f"latency {c['latency_ms']:.2f} ms ({'measured' if c.get('latency_measured') else 'estimated'}), "
                         f"MACs {c['macs'] / 1e6:.1f} M, size {_fmt_bytes(c['bytes'])}, excess {c['excess']}")
        lines.append("")
    path.write_text("\n".join(lines))
