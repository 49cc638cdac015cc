"""Does the pi4 latency model rank real Raspberry Pi 4 networks? (issue: pi4 ranks NAS-Bench-201)

HW-NAS-Bench measured every NAS-Bench-201 network on a Raspberry Pi 4 (1 image, 3x32x32, fp32;
runtime, threads and clock not stated: ../shared/data/README.md). This script builds networks
of that space in PyTorch from their `arch_str` (bench/nb201.py), estimates each with
`estimate_latency(model, x, target="pi4")` and compares the ranking with the measured one
(Kendall tau), against MACs alone (`model_cost(...).macs`, thop) as the baseline.

Two disjoint samples, both drawn with fixed seeds: the tuning sample (1,500 networks, the ones
looked at while the pi4 model's shape was chosen) and the check set (2,000 of the others,
never looked at before the shape was fixed). The pi4 model's constants are not fitted to any of
them: they come from its calibration on the published ncnn figures, whose leave-one-out error
this script recomputes.

    python bench/nb201_rank.py                      # about 10 minutes on one core
    python bench/nb201_rank.py --tune 300 --check 300   # a quick look

Writes bench/results/nb201_rank.json and prints a markdown summary. Reads ../shared/data (a
benchmark may; the test uses the 60 networks copied into tests/hw_models/data/).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import nnls
from scipy.stats import kendalltau
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import nb201  # noqa: E402

from edgeopt import estimate_latency  # noqa: E402
from edgeopt.evaluators.cost import model_cost  # noqa: E402
from edgeopt.hw_models import pi4 as pi4_model  # noqa: E402
from edgeopt.hw_models.profiler import device_description  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "nb201_raspi4_latencies.csv"
PUBLISHED = ROOT.parent / "shared" / "data" / "pi4_published_latencies.csv"
TUNE_SEED, CHECK_SEED = 123, 2021
CATEGORIES = ("cell conv3x3", "cell conv1x1", "cell avg pool", "ReLU", "add", "rest")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def samples(n_total: int, tune: int, check: int) -> tuple[np.ndarray, np.ndarray]:
    """The tuning sample (the first `tune` of a fixed draw of 1,500) and a disjoint check set."""
    drawn = np.random.default_rng(TUNE_SEED).choice(n_total, max(tune, 1500), replace=False)
    rest = np.setdiff1d(np.arange(n_total), drawn)
    return drawn[:tune], np.random.default_rng(CHECK_SEED).choice(rest, check, replace=False)


def category(entry: str, kind: str, kernel: tuple | None = None) -> str:
    """Which part of a NAS-Bench-201 network an estimate entry (a layer's name, or an op's
    "call in module") belongs to, for the breakdown."""
    name, _, where = entry.partition(" in ")
    if kind == "conv" and ".layers." in name:
        return "cell conv1x1" if kernel == (1, 1) else "cell conv3x3"
    if kind == "pool" and ".layers." in where:
        return "cell avg pool"
    if name.startswith("relu"):
        return "ReLU"
    if "add" in name:
        return "add"
    return "rest"


def measure_one(arch: str, x: torch.Tensor) -> dict:
    from edgeopt.layers import trace_layers

    model = nb201.build(arch)
    est = estimate_latency(model, x, target="pi4")
    kernels = {name: m.kernel_size for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    parts = dict.fromkeys(CATEGORIES, 0.0)
    for entry in (*est.layers, *est.ops):
        parts[category(entry.fqn, entry.kind, kernels.get(entry.fqn))] += entry.ms
    return {"estimate_ms": est.total_ms, "macs": model_cost(model, x).macs,
            "conv_macs": sum(layer.macs for layer in trace_layers(model, x)), "parts": parts,
            "live": nb201.live_ops(arch), "connected": nb201.output_reachable(arch)}


def tau(a, b) -> float:
    return float(kendalltau(a, b)[0])


def ranking(rows: list[dict]) -> dict:
    y = [r["measured_ms"] for r in rows]
    connected = [r for r in rows if r["connected"]]
    yc = [r["measured_ms"] for r in connected]
    return {
        "networks": len(rows),
        "tau_pi4": tau([r["estimate_ms"] for r in rows], y),
        "tau_macs": tau([r["macs"] for r in rows], y),
        "tau_conv_macs": tau([r["conv_macs"] for r in rows], y),
        "connected_networks": len(connected),
        "tau_pi4_connected": tau([r["estimate_ms"] for r in connected], yc),
        "tau_macs_connected": tau([r["macs"] for r in connected], yc),
    }


def worst_pairs(rows: list[dict], top: int) -> list[dict]:
    """The discordant pairs that disagree most (|log ratio| measured + estimated)."""
    e = np.log([r["estimate_ms"] for r in rows])
    y = np.log([r["measured_ms"] for r in rows])
    de, dy = e[:, None] - e[None, :], y[:, None] - y[None, :]
    severity = np.where(np.triu(np.sign(de) * np.sign(dy) < 0, 1), np.abs(de) + np.abs(dy), 0.0)
    pairs = []
    for flat in np.argsort(severity, axis=None)[::-1][:top]:
        i, j = np.unravel_index(flat, severity.shape)
        slow, fast = (i, j) if dy[i, j] > 0 else (j, i)  # measured slower first
        pairs.append({"measured_slower": rows[slow]["arch_str"], "measured_faster": rows[fast]["arch_str"],
                      "measured_ms": [rows[slow]["measured_ms"], rows[fast]["measured_ms"]],
                      "estimate_ms": [rows[slow]["estimate_ms"], rows[fast]["estimate_ms"]]})
    return pairs


def misranks(rows: list[dict], top: int = 10) -> dict:
    """The worst discordant pairs, and what the discordances have in common."""
    e = np.log([r["estimate_ms"] for r in rows])
    y = np.log([r["measured_ms"] for r in rows])
    de, dy = e[:, None] - e[None, :], y[:, None] - y[None, :]
    upper = np.triu(np.ones_like(de, dtype=bool), 1)
    discordant = (np.sign(de) * np.sign(dy) < 0) & upper
    n_disc = int(discordant.sum())
    disconnected = np.array([not r["connected"] for r in rows])
    with_disconnected = int((discordant & (disconnected[:, None] | disconnected[None, :])).sum())
    # Which live ops a discordant pair differs in: mean count difference, measured-slower minus
    # measured-faster (per cell), over the discordant pairs.
    ops = list(rows[0]["live"])
    counts = np.array([[r["live"][o] for o in ops] for r in rows], dtype=float)
    ii, jj = np.nonzero(discordant)
    sign = np.sign(dy[ii, jj])[:, None]
    diff = (counts[ii] - counts[jj]) * sign
    return {"discordant_pairs": n_disc, "pairs": int(upper.sum()),
            "discordant_with_a_disconnected_network": with_disconnected,
            "mean_live_op_difference_slower_minus_faster": dict(zip(ops, diff.mean(axis=0).round(3).tolist())),
            "worst_pairs": worst_pairs(rows, top),
            "worst_pairs_connected": worst_pairs([r for r in rows if r["connected"]], top)}


def op_bias(rows: list[dict]) -> dict:
    """log(measured / estimate) regressed on the live ops per cell: where the estimate prices an
    op type too low (positive) or too high (negative) relative to the rest, on this device."""
    connected = [r for r in rows if r["connected"]]
    ops = list(connected[0]["live"])
    a = np.array([[1.0] + [r["live"][o] for o in ops] for r in connected])
    b = np.log([r["measured_ms"] / r["estimate_ms"] for r in connected])
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    # Measured ms against the estimate's parts: equal weights would mean the estimate's mix is right.
    parts = np.array([[r["parts"][c] for c in CATEGORIES] for r in connected])
    weights, _ = nnls(parts, np.array([r["measured_ms"] for r in connected]))
    return {"log_ratio_per_live_op": dict(zip(["intercept"] + ops, coef.round(4).tolist())),
            "measured_per_estimated_ms": dict(zip(CATEGORIES, weights.round(3).tolist())),
            "estimate_share": dict(zip(CATEGORIES, (parts.sum(axis=0) / parts.sum()).round(3).tolist()))}


def leave_one_out(published_csv: Path) -> dict:
    rows = pi4_model.calibration_rows(pi4_model.read_published(published_csv))
    points = {(r.model, r.precision): (pi4_model.model_points(r.torchvision, r.precision), r.latency_ms)
              for r in tqdm(rows, desc="published models", mininterval=5)}
    full = pi4_model.fit(list(points.values()))
    in_sample = [abs(full.model_ms(k) / ms - 1) * 100 for k, ms in points.values()]
    loo = {}
    for held in tqdm(sorted({m for m, _ in points}), desc="leave-one-out refits", mininterval=5):
        refit = pi4_model.fit([p for (m, _), p in points.items() if m != held])
        for (m, prec), (keys, ms) in points.items():
            if m == held:
                loo[f"{m} {prec}"] = (refit.model_ms(keys) / ms - 1) * 100
    return {"figures": len(points), "in_sample_median_abs_error_pct": float(np.median(in_sample)),
            "loo_median_abs_error_pct": float(np.median(np.abs(list(loo.values())))),
            "loo_error_pct": loo}


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # Only what the figures depend on: the package and these two scripts.
    dirty = git("status", "--porcelain", "--", "edgeopt", "bench/nb201.py", "bench/nb201_rank.py")
    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes to edgeopt or the benchmark)"
                                                  if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--published", default=str(PUBLISHED))
    parser.add_argument("--tune", type=int, default=1500, help="networks of the tuning sample (at most 1500)")
    parser.add_argument("--check", type=int, default=2000, help="networks of the disjoint check set")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "nb201_rank.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    table = pd.read_csv(args.data, comment="#")
    tune_idx, check_idx = samples(len(table), min(args.tune, 1500), args.check)
    x = torch.zeros(1, 3, 32, 32)
    results = {}
    for name, idx in (("tuning sample", tune_idx), ("check set", check_idx)):
        rows = []
        for i in tqdm(idx, desc=name, mininterval=10):
            row = table.iloc[int(i)]
            rows.append({"arch_index": int(row.arch_index), "arch_str": row.arch_str,
                         "measured_ms": float(row.raspi4_latency_ms)} | measure_one(row.arch_str, x))
        results[name] = rows
    report = {
        "command": " ".join(["python"] + sys.argv), "commit": commit(), "machine": device_description(),
        "python": platform.python_version(), "torch": torch.__version__,
        "data": "HW-NAS-Bench raspi4_latency (via HELP), 1x3x32x32, fp32; runtime/threads/clock not stated",
        "seeds": {"tuning": TUNE_SEED, "check": CHECK_SEED},
        "ranking": {name: ranking(rows) for name, rows in results.items()},
        "misranks": {name: misranks(rows) for name, rows in results.items()},
        "op_bias": {name: op_bias(rows) for name, rows in results.items()},
        "published_loo": leave_one_out(Path(args.published)),
        "constants": pi4_model.Pi4Latency.shipped("pi4.csv").table.meta.get("constants", ""),
        "networks": {name: [{k: r[k] for k in ("arch_index", "measured_ms", "estimate_ms", "macs")}
                            for r in rows] for name, rows in results.items()},
    }
    report["wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_summary(report)
    print(f"\nwrote {out}; wall time {report['wall_s'] / 60:.1f} min")
    return 0


def print_summary(report: dict) -> None:
    print(f"\n`{report['command']}` at {report['commit']}, {report['machine']}, torch {report['torch']}\n")
    print("| sample | networks | Kendall tau, pi4 estimate | tau, MACs (thop) | tau, conv/linear MACs "
          "| connected only: pi4 / MACs |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in report["ranking"].items():
        print(f"| {name} | {r['networks']} | {r['tau_pi4']:.3f} | {r['tau_macs']:.3f} | {r['tau_conv_macs']:.3f} | "
              f"{r['tau_pi4_connected']:.3f} / {r['tau_macs_connected']:.3f} ({r['connected_networks']}) |")
    loo = report["published_loo"]
    print(f"\n17 published ncnn figures: in-sample median |error| {loo['in_sample_median_abs_error_pct']:.1f}%, "
          f"leave-one-out {loo['loo_median_abs_error_pct']:.1f}%")
    for name in report["misranks"]:
        m, b = report["misranks"][name], report["op_bias"][name]
        print(f"\n{name}: {m['discordant_pairs']} of {m['pairs']} pairs discordant "
              f"({m['discordant_with_a_disconnected_network']} involve a network whose cell output is "
              "unreachable)")
        print("  live ops per cell, measured-slower minus measured-faster, over discordant pairs: "
              + ", ".join(f"{k} {v:+.2f}" for k, v in m["mean_live_op_difference_slower_minus_faster"].items()))
        print("  log(measured/estimate) per live op per cell (+: priced too low): "
              + ", ".join(f"{k} {v:+.3f}" for k, v in b["log_ratio_per_live_op"].items()))
        print("  measured ms per estimated ms, by part (equal = right mix): "
              + ", ".join(f"{k} {v:.2f}" for k, v in b["measured_per_estimated_ms"].items()))
        print("  estimate's share by part: " + ", ".join(f"{k} {v:.0%}" for k, v in b["estimate_share"].items()))
        if name == "check set":
            for which in ("worst_pairs", "worst_pairs_connected"):
                print(f"\n{which.replace('_', ' ')}:\n")
                print("| measured slower | measured faster | measured ms | estimated ms |")
                print("|---|---|---|---|")
                for p in m[which]:
                    print(f"| `{p['measured_slower']}` | `{p['measured_faster']}` | {p['measured_ms'][0]:.2f} / "
                          f"{p['measured_ms'][1]:.2f} | {p['estimate_ms'][0]:.2f} / {p['estimate_ms'][1]:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
