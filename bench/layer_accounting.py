"""What the per-layer accounting (edgeopt.search.accounting) says on real architectures: the
uniform int8 plan of each model against its fp32 base, on host, layer by layer.

    python bench/layer_accounting.py [--size 64] [--models efficientnet_b0,mobilenet_v3_small,resnet18]

Random weights (BatchNorm statistics settled on random batches, so activations do not vanish);
the plan is what a user tries first. For each model: how many int8 layers did not pay on this
machine's clock and why (onnxruntime's profiler, quantizers and layout nodes charged to the layer
they serve), the share of the measured time the profile charges to layers, and the whole-model
times. Results go to bench/results/layer_accounting.json with the CPU's flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.clock import _cpu_flags  # noqa: E402
from edgeopt import SearchSpace, apply_plan, export_onnx  # noqa: E402
from edgeopt.evaluators.cost import model_cost  # noqa: E402
from edgeopt.evaluators.cpu import int8_needs_reduce_range  # noqa: E402
from edgeopt.evaluators.latency import measure_latency  # noqa: E402
from edgeopt.evaluators.node_profile import profile_layers  # noqa: E402
from edgeopt.hw_models.estimate import estimate_latency  # noqa: E402
from edgeopt.hw_models.targets import get_target  # noqa: E402
from edgeopt.layers import trace_layers  # noqa: E402
from edgeopt.search.accounting import account_layers  # noqa: E402
from edgeopt.spaces.quantize import compressed_layers  # noqa: E402


@torch.no_grad()
def settled(model: torch.nn.Module, size: int) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        model(torch.randn(16, 3, size, size, generator=generator))
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--models", default="efficientnet_b0,mobilenet_v3_small,resnet18")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "layer_accounting.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    host = get_target("host")
    example = torch.randn(1, 3, args.size, args.size)
    results = {"command": f"python bench/layer_accounting.py --size {args.size} --models {args.models}",
               "cpu_flags": _cpu_flags(), "int8_needs_reduce_range": int8_needs_reduce_range(), "models": {}}
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = settled(getattr(torchvision.models, name)(num_classes=10), args.size)
        space = SearchSpace.from_model(base, example)
        plan = space.uniform(w_bits=8, a_bits=8)
        calib = [torch.randn(16, 3, args.size, args.size)]
        int8 = apply_plan(base, plan, example, calib_data=calib, round_to=host.channel_multiple,
                          reduce_range=int8_needs_reduce_range(), space=space)
        layers = trace_layers(base, example)
        names = [spec.fqn for spec in layers]
        with tempfile.TemporaryDirectory() as tmp:
            paths = {label: export_onnx(net, example, Path(tmp) / f"{label}.onnx")
                     for label, net in (("fp32", base), ("int8", int8))}
            profiles = {label: profile_layers(path, names, runs=30) for label, path in paths.items()}
            whole = {label: measure_latency(path).median_ms for label, path in paths.items()}
        rows = account_layers(plan=plan, base_layers=layers, layers=trace_layers(int8, example),
                              modules=compressed_layers(int8), base_estimate=estimate_latency(base, example, target=host),
                              estimate=estimate_latency(int8, example, target=host), base_profile=profiles["fp32"],
                              profile=profiles["int8"], measured_clock=True, target="host",
                              simd=host.channel_multiple)
        reasons = Counter(r.flag.split(" (")[0].split(":")[0] for r in rows if r.flag)
        by_kind = Counter((r.kind, bool(r.flag)) for r in rows)
        entry = {
            "input": args.size, "layers": len(rows), "macs": model_cost(base, example).macs,
            "whole_model_ms": {k: round(v, 3) for k, v in whole.items()},
            "profiled_ms": {k: round(p.total_ms, 3) for k, p in profiles.items()},
            "share_charged_to_layers": {k: round(sum(t.ms for t in p.layers.values()) / p.total_ms, 3)
                                        for k, p in profiles.items()},
            "int8_layers_not_paying": sum(1 for r in rows if r.flag), "reasons": dict(reasons),
            "not_paying_by_kind": {kind: by_kind[(kind, True)] for kind, _ in by_kind if by_kind[(kind, True)]},
            "layers_by_kind": {kind: by_kind[(kind, True)] + by_kind[(kind, False)] for kind, _ in by_kind},
            "serving_ms_int8": round(sum(r.serving_ms or 0.0 for r in rows), 3),
            "worst": [{"layer": r.layer, "kind": r.kind, "base_ms": round(r.base_measured_ms, 4),
                       "int8_ms": round(r.measured_ms, 4), "flag": r.flag}
                      for r in sorted(rows, key=lambda r: r.saved_ms or 0.0)[:3]],
        }
        results["models"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "worst"}), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
