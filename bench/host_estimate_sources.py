"""Which host latency estimate should a search use: layers timed on demand, or a calibrated table?

`--target host` without `--lut` times each layer shape the first time a plan needs it (its exact
pruned widths, no whole-model correction). `optimize profile` instead times every layer at a few
keep ratios, estimates other widths with a fitted model, and calibrates the sum on whole-model
runs. This script builds such a table for the built-in edgenet (`--keep-ratios`, 12 calibration
plans, as `optimize profile` does), then estimates `--plans` random plans of the host's search
space both ways and measures each plan's exported model here (onnxruntime, one thread, the
lower median of 2 passes). Prints Spearman and the median absolute error of each estimate.

    python bench/host_estimate_sources.py --width 64 --size 3x32x32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeopt import SearchSpace, apply_plan, estimate_latency  # noqa: E402
from edgeopt.evaluators.cpu import int8_needs_reduce_range  # noqa: E402
from edgeopt.evaluators.latency import measure_latency  # noqa: E402
from edgeopt.evaluators.onnx_export import export_onnx  # noqa: E402
from edgeopt.hw_models.profiler import profile_model  # noqa: E402
from edgeopt.hw_models.targets import get_target  # noqa: E402
from edgeopt.search.models import EdgeNet  # noqa: E402
from edgeopt.search.optimize import target_knobs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="edgenet width")
    parser.add_argument("--size", default="3x32x32", help="input CxHxW")
    parser.add_argument("--keep-ratios", default="1,0.5", help="the table's profiled keep ratios")
    parser.add_argument("--plans", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = tuple(int(d) for d in args.size.split("x"))
    example = torch.randn(1, *shape)
    model = EdgeNet(in_channels=shape[0], width=args.width).eval()
    host = get_target("host")
    started = time.time()
    table = profile_model(model, example, keep_ratios=[float(k) for k in args.keep_ratios.split(",")],
                          round_to=host.accelerates.channel_multiple, calibration_plans=12)
    profiled = host.with_lut(table)
    print(json.dumps({"table_rows": len(table), "calibration": table.meta.get("calibration"),
                      "seconds": round(time.time() - started)}), flush=True)
    space = SearchSpace.from_model(model, example).restrict(target_knobs(host, size_matters=False))
    calib = [torch.randn(8, *shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.plans):
            compressed = apply_plan(model, space.sample(i), example, calib_data=calib,
                                    round_to=host.accelerates.channel_multiple,
                                    reduce_range=int8_needs_reduce_range(), space=space)
            path = export_onnx(compressed, example, Path(tmp) / f"plan{i}.onnx")
            measured = min(measure_latency(path, threads=1, repeats=30, min_time_s=0.3).median_ms for _ in range(2))
            rows.append((measured, estimate_latency(compressed, example, target=host).total_ms,
                         estimate_latency(compressed, example, target=profiled).total_ms))
    r = np.array(rows)
    for column, name in ((1, "on demand (exact shapes)"), (2, "calibrated table")):
        error = np.abs(r[:, column] - r[:, 0]) / r[:, 0] * 100
        print(json.dumps({"estimate": name, "spearman": round(float(spearmanr(r[:, 0], r[:, column])[0]), 3),
                          "median_abs_error_pct": round(float(np.median(error)), 1)}), flush=True)
    print(json.dumps({"measured_ms": r[:, 0].round(3).tolist(), "on_demand_ms": r[:, 1].round(3).tolist(),
                      "table_ms": r[:, 2].round(3).tolist()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
