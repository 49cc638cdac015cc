"""What does int8 buy on this CPU, per architecture? (the host target's "pays off" claim)

For each architecture (random weights, 10 classes; speed does not depend on the values), the
model as exported in fp32 and with every layer int8 (w8a8, `apply_plan` of the uniform plan,
weights of 7-bit range where `int8_needs_reduce_range` says this CPU needs it, activations
calibrated on 4 random batches) are timed in pairs (`paired_latency.paired_ratio`: alternating
runs, one onnxruntime thread). Also lists the ops onnxruntime still runs in float in the int8
graph (the float islands between integer kernels), and the convolutions' kernel time split into
depthwise and dense ones (onnxruntime's profiler, one thread, median per node over the runs of a
pass, the lowest of 3 passes that alternate fp32 and int8). Prints one JSON line per
architecture.

    python bench/host_int8_speedup.py --size 224 --runs 200
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
import torchvision

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from integer_islands import fused_ops, profile_nodes  # noqa: E402
from paired_latency import paired_ratio  # noqa: E402

from edgeopt import SearchSpace, apply_plan  # noqa: E402
from edgeopt.evaluators.cpu import int8_needs_reduce_range  # noqa: E402
from edgeopt.evaluators.onnx_export import export_onnx  # noqa: E402
from edgeopt.search.models import EdgeNet  # noqa: E402

# Ops that are integer kernels (NhwcMaxPool is onnxruntime's uint8 max pool), quantizers or pure
# data movement; anything else in an int8 graph runs in float.
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "QLinearGlobalAveragePool", "QLinearAdd",
               "QLinearMul", "QLinearSigmoid", "QLinearConcat", "QLinearAveragePool", "QLinearLeakyRelu",
               "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "NhwcMaxPool", "Reshape",
               "Flatten", "Transpose", "Concat"}


def conv_kernel_us(path: Path, *, runs: int) -> dict[str, float]:
    """Microseconds per inference in depthwise and in dense convolutions (onnxruntime's
    profiler, one thread; the median of each node over `runs`, summed)."""
    nodes, _, groups = profile_nodes(path, runs=runs)
    out = {"depthwise": 0.0, "dense": 0.0}
    for node, (op, us) in nodes.items():
        if "Conv" in op:
            out["depthwise" if groups.get(node, 1) > 1 else "dense"] += us
    return out


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("edgenet"):
        return EdgeNet(in_channels=3, width=int(name.removeprefix("edgenet")))
    return torchvision.models.get_model(name, weights=None, num_classes=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,mnasnet1_0,squeezenet1_1,edgenet64")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--runs", type=int, default=200, help="alternating runs per pair")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reduce_range = int8_needs_reduce_range()
    example = torch.randn(1, 3, args.size, args.size)
    calib = [torch.randn(8, 3, args.size, args.size) for _ in range(4)]
    print(json.dumps({"size": args.size, "runs": args.runs, "reduce_range": reduce_range}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            started = time.time()
            model = build(name).eval()
            space = SearchSpace.from_model(model, example)
            int8 = apply_plan(model, space.uniform(w_bits=8, a_bits=8), example, calib_data=calib,
                              reduce_range=reduce_range, space=space)
            fp32_path, int8_path = Path(tmp) / f"{name}-fp32.onnx", Path(tmp) / f"{name}-int8.onnx"
            export_onnx(model, example, fp32_path)
            export_onnx(int8, example, int8_path)
            pair = paired_ratio(fp32_path, int8_path, runs=args.runs)
            convs = {"fp32": {"depthwise": np.inf, "dense": np.inf}, "int8": {"depthwise": np.inf, "dense": np.inf}}
            for _ in range(3):
                for kind, path in (("fp32", fp32_path), ("int8", int8_path)):
                    for part, us in conv_kernel_us(path, runs=max(10, args.runs // 4)).items():
                        convs[kind][part] = min(convs[kind][part], us)
            float_ops = {op: n for op, n in fused_ops(int8_path).items() if op not in INTEGER_OPS}
            print(json.dumps({"model": name, "fp32_ms": pair["a_ms"], "int8_ms": pair["b_ms"],
                              "speedup": round(1 / pair["ratio"], 2),
                              "int8_time_ratio": pair["ratio"], "interquartile": pair["interquartile"],
                              "float_ops_in_int8_graph": float_ops,
                              "conv_kernel_us": {kind: {part: round(us) for part, us in parts.items()}
                                                 for kind, parts in convs.items()},
                              "seconds": round(time.time() - started)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
