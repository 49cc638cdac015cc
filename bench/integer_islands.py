"""What do the int8 export's float islands cost on this CPU? (issue 5, host speed)

`export_onnx` keeps some ops in float between DequantizeLinear and QuantizeLinear, so that
onnxruntime computes what the PyTorch model computes: the residual sums and the squeeze-excite
gate (Sigmoid, Mul); before commit 3514677 also the spatial means (ReduceMean), which it now
writes as GlobalAveragePool, fused into QLinearGlobalAveragePool. This script exports the
comparison's hand plan (uniform int8, keep 0.625; cifar10 subset, edgenet width 64) as
`export_onnx` does, rewrites the islands so that onnxruntime fuses them into integer kernels,
and reports:

- the ops onnxruntime runs for each export, and the microseconds its profiler puts in each;
- the paired time ratio (`paired_latency.paired_ratio`, one thread) of the rewritten export to
  the exact one, and of each to the fp32 base;
- how many validation top-1s each export changes against the PyTorch model, and their top-1.

The rewrites (`--rewrites`): "add", Sum -> Add (QLinearAdd, a step off the float sum a few times
in a million: `integer_rounding.py`); "sigmoid", a QuantizeLinear on a fixed 1/255 grid after each
Sigmoid (QLinearSigmoid, then QLinearMul: a quantization step the PyTorch model does not take);
"pool", spatial ReduceMean -> GlobalAveragePool (what the exporter now does itself: nothing left
to rewrite in a current export). Weights use 7-bit range (`int8_needs_reduce_range`) so that this
host's int8 kernels compute what the model computes.

    python bench/integer_islands.py --data /work/shared/data/cifar10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import compare  # noqa: E402
from paired_latency import paired_ratio  # noqa: E402

from edgeopt.evaluators.cpu import int8_needs_reduce_range  # noqa: E402
from edgeopt.evaluators.latency import make_session  # noqa: E402
from edgeopt.evaluators.onnx_export import export_onnx  # noqa: E402


REWRITES = ("add", "pool", "sigmoid")


def integer_islands(source: Path, target: Path, *, rewrites: tuple[str, ...] = REWRITES) -> dict[str, int]:
    """Write `source` with its float islands rewritten for integer fusion (those of `REWRITES`
    named in `rewrites`); count each rewrite."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(source))
    graph = proto.graph
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    counts = {"Sum -> Add": 0, "ReduceMean -> GlobalAveragePool": 0, "Sigmoid output quantized": 0}
    nodes = []
    for node in graph.node:
        if "add" in rewrites and node.op_type == "Sum" and len(node.input) == 2:
            node.op_type = "Add"
            counts["Sum -> Add"] += 1
        elif "pool" in rewrites and node.op_type == "ReduceMean" and len(node.input) == 2 and sorted(consts.get(node.input[1], [])) == [2, 3]:
            keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
            pooled = node.output[0] if keep else f"{node.output[0]}_pooled"
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=f"{node.name}_gap"))
            if not keep:
                nodes.append(helper.make_node("Flatten", [pooled], [node.output[0]], axis=1, name=f"{node.name}_flat"))
            counts["ReduceMean -> GlobalAveragePool"] += 1
            continue
        nodes.append(node)
        if "sigmoid" in rewrites and node.op_type == "Sigmoid":
            out, raw = node.output[0], f"{node.output[0]}_float"
            node.output[0] = raw
            scale, zero = f"{out}_scale", f"{out}_zero_point"
            graph.initializer.extend([numpy_helper.from_array(np.array(1 / 255, np.float32), scale),
                                      numpy_helper.from_array(np.array(0, np.uint8), zero)])
            nodes.append(helper.make_node("QuantizeLinear", [raw, scale, zero], [f"{out}_q"]))
            nodes.append(helper.make_node("DequantizeLinear", [f"{out}_q", scale, zero], [out]))
            counts["Sigmoid output quantized"] += 1
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))
    return counts


def fused_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (after its fusions)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return {op: ops.count(op) for op in sorted(set(ops))}


def profile_nodes(path: Path, *, runs: int) -> tuple[dict[str, tuple[str, float]], float, dict[str, int]]:
    """onnxruntime's profile of `path` (one thread, `runs` runs): per node of the graph it runs,
    (op type, median microseconds of its kernel); the median whole run; and each node's `group`
    attribute (1 where it has none), to tell depthwise convolutions apart."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        x = np.random.default_rng(0).random((1, *session.get_inputs()[0].shape[1:]), dtype=np.float32)
        for _ in range(runs):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
        groups = {node.name: next((a.i for a in node.attribute if a.name == "group"), 1)
                  for node in onnx.load(options.optimized_model_filepath).graph.node}
    per_node: dict[str, tuple[str, list[int]]] = {}
    whole = []
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            per_node.setdefault(node, (event["args"]["op_name"], []))[1].append(event["dur"])
        elif event.get("name") == "model_run":
            whole.append(event["dur"])
    medians = {node: (op, float(np.median(durations))) for node, (op, durations) in per_node.items()}
    return medians, float(np.median(whole)), groups


def kernel_times(path: Path, *, runs: int = 1000) -> dict[str, float]:
    """Microseconds per inference that onnxruntime's profiler puts in each op type's kernels (one
    thread; the median of each node over `runs`, summed by op type), and in the whole run. The
    profiler adds its own few microseconds per node, so compare op types, not totals, across
    graphs with different node counts."""
    nodes, whole, _ = profile_nodes(path, runs=runs)
    by_op: dict[str, float] = {}
    for op, us in nodes.values():
        by_op[op] = by_op.get(op, 0.0) + us
    return {"whole run": whole} | dict(sorted(by_op.items(), key=lambda item: -item[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/cifar10")
    parser.add_argument("--keep", type=float, default=0.625, help="the hand plan's uniform keep ratio")
    parser.add_argument("--runs", type=int, default=4000, help="alternating runs per timed pair")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the timing uses one)")
    parser.add_argument("--rewrites", default=",".join(REWRITES),
                        help=f"which islands to rewrite, comma-separated, of {', '.join(REWRITES)}")
    parser.add_argument("--out", type=Path, default=compare.RESULTS / "runs" / "islands")
    args = parser.parse_args()
    data, model = compare.side_setup(args.data, threads=args.threads)
    context = dataclasses.replace(compare.side_context(model, data), reduce_range=int8_needs_reduce_range())
    compressed = context.compress(context.space.uniform(w_bits=8, a_bits=8, keep_ratio=args.keep)).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {"fp32 base": args.out / "base.onnx", "exact": args.out / "exact.onnx",
             "integer islands": args.out / "islands.onnx"}
    export_onnx(model, context.example_input, paths["fp32 base"])
    export_onnx(compressed, context.example_input, paths["exact"])
    print(json.dumps({"rewrites": integer_islands(paths["exact"], paths["integer islands"],
                                                               rewrites=tuple(args.rewrites.split(",")))}), flush=True)
    for name in ("exact", "integer islands"):
        print(json.dumps({"export": name, "onnxruntime runs": fused_ops(paths[name])}), flush=True)
    for name, path in paths.items():
        print(json.dumps({"export": name, "profiled us per inference": kernel_times(path)}), flush=True)

    images = torch.stack([data.val[i][0] for i in range(len(data.val))])
    labels = np.array([int(data.val[i][1]) for i in range(len(data.val))])
    with torch.no_grad():
        reference = compressed(images).argmax(1).numpy()
    print(json.dumps({"model": "PyTorch", "val_top1": round(100 * float((reference == labels).mean()), 1)}), flush=True)
    for name in ("exact", "integer islands"):
        session = make_session(paths[name], threads=args.threads)
        scores = np.concatenate([session.run(None, {"input": images[i:i + 100].numpy()})[0]
                                 for i in range(0, len(images), 100)])
        top1 = scores.argmax(1)
        print(json.dumps({"model": name, "val_top1": round(100 * float((top1 == labels).mean()), 1),
                          "top1_differs_from_pytorch": int((top1 != reference).sum()), "of": len(labels)}), flush=True)

    for a, b in (("exact", "integer islands"), ("fp32 base", "exact"), ("fp32 base", "integer islands")):
        print(json.dumps({"pair": f"{b} / {a}"} | paired_ratio(paths[a], paths[b], runs=args.runs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
