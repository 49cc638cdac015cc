"""Does the host estimate order fp32 and uniform int8 as this CPU runs them? (issue 20, point 2)

efficientnet_b0 (SiLU after most convolutions, squeeze-excite gates with a sigmoid) and
mobilenet_v3_small (Hardswish, Hardsigmoid gates): with random weights, 10 classes, BatchNorm
statistics as built, each is exported in fp32 and with every layer int8 (`apply_plan` of the
uniform w8a8 plan, activations calibrated on 4 random batches, 7-bit weights where
`int8_needs_reduce_range` says this CPU needs them). The two exports are timed in alternating
runs (`paired_latency.paired_ratio`, one onnxruntime thread), and each model gets the host
estimate `estimate_latency(model, x, target="host")` (each layer shape micro-benchmarked on
first use, no table). Prints one JSON line per model and size and writes
bench/results/host_estimate_order.json (with the CPU and whether it has VNNI).

    python bench/host_estimate_order.py            # 32 and 224, about 10 minutes on 2 cores
    python bench/host_estimate_order.py --sizes 32 --models efficientnet_b0
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from paired_latency import paired_ratio  # noqa: E402

from edgeopt import SearchSpace, apply_plan, estimate_latency  # noqa: E402
from edgeopt.evaluators.cpu import cpu_flags, int8_needs_reduce_range  # noqa: E402
from edgeopt.evaluators.onnx_export import export_onnx  # noqa: E402
from edgeopt.hw_models.profiler import device_description  # noqa: E402
from edgeopt.hw_models.targets import get_target  # noqa: E402

VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}


def compare(name: str, size: int, *, runs: int, tmp: Path) -> dict:
    """fp32 vs uniform int8 of one torchvision model at one input size: measured and estimated."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    example = torch.randn(1, 3, size, size)
    calib = [torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    space = SearchSpace.from_model(model, example)
    int8 = apply_plan(model, space.uniform(w_bits=8, a_bits=8), example, calib_data=calib,
                      reduce_range=int8_needs_reduce_range(), space=space)
    fp32_path = export_onnx(model, example, tmp / f"{name}-{size}-fp32.onnx")
    int8_path = export_onnx(int8, example, tmp / f"{name}-{size}-int8.onnx")
    pair = paired_ratio(fp32_path, int8_path, runs=runs)
    host = get_target("host")
    estimate = {kind: estimate_latency(m, example, target=host) for kind, m in (("fp32", model), ("int8", int8))}
    measured_int8_faster = pair["ratio"] < 1
    estimated_int8_faster = estimate["int8"].total_ms < estimate["fp32"].total_ms
    return {"model": name, "size": size, "runs": runs,
            "measured_ms": {"fp32": pair["a_ms"], "int8": pair["b_ms"]},
            "measured_int8_over_fp32": pair["ratio"], "interquartile": pair["interquartile"],
            "estimated_ms": {k: round(e.total_ms, 3) for k, e in estimate.items()},
            "estimated_int8_over_fp32": round(estimate["int8"].total_ms / estimate["fp32"].total_ms, 3),
            "order_right": measured_int8_faster == estimated_int8_faster}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_b0,mobilenet_v3_small")
    parser.add_argument("--sizes", default="32,224")
    parser.add_argument("--runs", default="32:1000,224:150",
                        help="alternating runs per size (SIZE:RUNS,...); other sizes get 300")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "host_estimate_order.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {int(s): int(r) for s, r in (item.split(":") for item in args.runs.split(","))}
    flags = cpu_flags()
    machine = {"device": device_description(), "vnni": sorted(flags & VNNI), "has_vnni": bool(flags & VNNI),
               "reduce_range": int8_needs_reduce_range(), "python": platform.python_version(),
               "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import onnxruntime

    machine["onnxruntime"] = onnxruntime.__version__
    print(json.dumps(machine), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            for name in args.models.split(","):
                started = time.time()
                row = compare(name, size, runs=runs.get(size, 300), tmp=Path(tmp))
                row["seconds"] = round(time.time() - started)
                results.append(row)
                print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
