"""How steady is a host latency here: each model measured whole, alone, in a fresh session
(`measure_latency`, what a search trial did before), against the same model read on the
reference clock (`ReferenceClock`, what a trial does now: run in turn with the base model).

A search compares trials timed minutes apart; the figure that matters is how much one model's
reading moves from one measurement to the next (coefficient of variation over `--repeats`), and
whether the clock's reading sits where the alone reading's median does (its bias).

    python bench/clock.py [--repeats 10]

The models are ResNet-20 (bench/results/models/resnet20.pt) and the final models of the prove
run committed beside it (its manifest; the figures of BENCHMARKS.md were taken on those of the
first run: hand k0.875 int8, hand k0.625 fp32, standard k0.875, edgeopt shrink 50%). Results go to bench/results/clock.json with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from edgeopt.evaluators.cpu import int8_needs_reduce_range  # noqa: E402
from edgeopt.evaluators.latency import ReferenceClock, measure_latency  # noqa: E402
from edgeopt.evaluators.onnx_export import export_onnx  # noqa: E402
from prove_base import load_base  # noqa: E402

MODELS = ROOT / "bench" / "results" / "models" / "prove" / "resnet20-host-vnni"


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "vnni", "amx")) or "vnni" in f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "clock.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = export_onnx(load_base("resnet20").eval(), torch.zeros(1, 3, 32, 32), Path(tmp) / "base.onnx")
        committed = sorted(json.loads((MODELS / "manifest.json").read_text()))
        paths = {"base": base} | {Path(file).stem: MODELS / file for file in committed}
        start = time.perf_counter()
        clock = ReferenceClock(base)
        calibrate_s = time.perf_counter() - start
        rows = {}
        for name, path in paths.items():
            alone, read, seconds = [], [], []
            for _ in range(args.repeats):  # interleaved, so both see the same stretch of the machine
                alone.append(measure_latency(path).median_ms)
                start = time.perf_counter()
                read.append(clock.measure(path).median_ms)
                seconds.append(time.perf_counter() - start)
            alone, read = np.array(alone), np.array(read)
            rows[name] = {
                "alone_ms": alone.round(4).tolist(), "clock_ms": read.round(4).tolist(),
                "alone_cv": round(float(alone.std() / alone.mean()), 4),
                "clock_cv": round(float(read.std() / read.mean()), 4),
                "clock_over_alone_median": round(float(np.median(read) / np.median(alone)), 3),
                "clock_seconds_median": round(float(np.median(seconds)), 3),
            }
            print(f"{name:20s} alone {np.median(alone):.3f} ms cv {rows[name]['alone_cv']:.3f} | clock "
                  f"{np.median(read):.3f} ms cv {rows[name]['clock_cv']:.3f} | clock/alone "
                  f"{rows[name]['clock_over_alone_median']:.3f} | {rows[name]['clock_seconds_median']:.2f} s",
                  flush=True)
    result = {"command": "python bench/clock.py --repeats %d" % args.repeats, "machine": platform.processor() or
              platform.machine(), "cpu_flags": _cpu_flags(), "int8_needs_reduce_range": int8_needs_reduce_range(),
              "reference_ms": round(clock.reference_ms, 4), "calibrate_seconds": round(calibrate_s, 2),
              "models": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
