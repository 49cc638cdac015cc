"""Where an exported model's time goes on this machine: onnxruntime's profiler, per layer.

onnxruntime rewrites the graph before it runs it (it fuses a QDQ Conv into QLinearConv, a float
Conv with its BatchNorm and Relu into an NCHWc Conv, and adds layout Transposes and Reorders), so
the nodes it times are not the exported ones. Each timed node is charged to a layer:

- a node named after an exported layer node (onnxruntime keeps the name with a `_token_N` tail)
  or after a tensor a layer produces (its fused NCHWc Convs are named after their last output,
  `<tensor>_nchwc`), or one of the layer's own quantizers (the export names them `<layer>.`...);
- a node with none of these names (layout Transposes and Reorders, quantizers onnxruntime adds)
  to the layer it serves: the one it feeds, else the one it reads, through such nodes only;
- anything else (adds, pools, activations no layer absorbed) runs between layers and is kept
  under its op type.

The profiler's own cost per node is measured against the same model's unprofiled runs and
taken out of every node equally (a node faster than that keeps nothing), so that a model of many
small nodes is not charged the profiler's time.
onnxruntime is imported lazily.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeopt.deploy.run import session_options
from edgeopt.errors import EdgeoptError
from edgeopt.evaluators.latency import _feed, summarize, time_session

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# What onnxruntime runs a layer's own arithmetic as, once it has fused and quantized the graph:
# these nodes are the layer's kernel time, the rest of what serves it is not.
KERNEL_OPS = LAYER_OPS + ("QLinearConv", "QLinearMatMul", "FusedConv", "FusedGemm", "MatMulInteger", "ConvInteger",
                          "NhwcFusedConv")
# Ops that carry a layer's value on unchanged in its channels: a fused node named after their
# output is that layer's.
CARRIES = ("BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Mul", "Add", "Sum",
           "DequantizeLinear", "QuantizeLinear", "Identity", "Max", "Transpose", "Reshape", "Flatten")
# Nodes that only move or re-encode a tensor: charged to the layer they serve.
SERVING = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Transpose", "ReorderInput",
           "ReorderOutput", "Reshape", "Cast")
_TAIL = re.compile(r"(_token_\d+|_nchwc|_quant|_Q|_DQ)+$")


@dataclass(frozen=True, kw_only=True)
class LayerTime:
    kernel_ms: float  # the layer's own (fused) kernel
    serving_ms: float  # quantizers and layout changes that serve it
    spread_ms: float = 0.0  # of kernel + serving, between the fastest and slowest session

    @property
    def ms(self) -> float:
        return self.kernel_ms + self.serving_ms


@dataclass(frozen=True, kw_only=True)
class NodeProfile:
    """Mean time per inference, per layer and between layers, over `runs` profiled runs."""

    layers: dict[str, LayerTime]
    between: dict[str, float]  # op type -> ms of the nodes no layer owns
    total_ms: float  # every timed node, the profiler's own cost taken out (at most whole_ms)
    whole_ms: float  # the same model's median run in a session without the profiler
    overhead_ms: float  # the profiler's cost per node, taken out of each node's time
    runs: int
    threads: int
    nodes: list[tuple[str, str, float, str | None]] = field(default_factory=list)  # (node, op, ms, layer)


def _layer_of_weight(name: str, layers: set[str]) -> str | None:
    """The layer whose weight tensor this is: `<fqn>.weight` as exported, or the QDQ writer's
    `<fqn>.weight...`."""
    for fqn in layers:
        if name == f"{fqn}.weight" or name.startswith(f"{fqn}.weight"):
            return fqn
    return None


def _exported_names(proto, layers: set[str]) -> tuple[dict[str, str], dict[str, str]]:
    """From the exported graph: node name -> layer, and tensor name -> the layer whose value it
    carries (its output, through BatchNorm, activations and quantizers)."""
    made_by = {out: node for node in proto.graph.node for out in node.output}
    node_layer: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type in LAYER_OPS and len(node.input) > 1:
            weight = node.input[1]
            producer = made_by.get(weight)
            if producer is not None and producer.op_type == "DequantizeLinear":
                weight = producer.input[0]
            fqn = _layer_of_weight(weight, layers)
            if fqn is not None:
                node_layer[node.name] = fqn
    order = {node.name: i for i, node in enumerate(proto.graph.node)}

    def carried(tensor: str, depth: int = 0) -> tuple[str, int, int] | None:
        """(layer, sums passed, graph position of the layer) whose value `tensor` carries."""
        node = made_by.get(tensor)
        if node is None or depth > 12:
            return None
        if node.name in node_layer:
            return node_layer[node.name], 0, order[node.name]
        if node.op_type not in CARRIES or not node.input:
            return None
        if node.op_type in ("Add", "Sum", "Mul", "Max") and len(node.input) > 1:
            # A residual sum fused into a conv carries that conv's value: the input that reaches
            # a layer without passing another sum (the shortcut passes one), the latest of those.
            found = [f for f in (carried(i, depth + 1) for i in node.input) if f is not None]
            if not found:
                return None
            fqn, sums, position = min(found, key=lambda f: (f[1], -f[2]))
            return fqn, sums + 1, position
        return carried(node.input[0], depth + 1)

    tensor_layer = {}
    for node in proto.graph.node:
        for out in node.output:
            found = carried(out)
            if found is not None:
                tensor_layer[out] = found[0]
    return node_layer, tensor_layer


def _own_layer(name: str, node_layer: dict[str, str], tensor_layer: dict[str, str], layers: set[str]) -> str | None:
    stem = _TAIL.sub("", name)
    for key in (name, stem):
        if key in node_layer:
            return node_layer[key]
        if key in tensor_layer:
            return tensor_layer[key]
    prefixed = [fqn for fqn in layers if name.startswith(f"{fqn}.")]
    return max(prefixed, key=len) if prefixed else None


def _profiled_session(path: Path, options, feed_seed: int, *, runs: int, warmup: int, threads: int
                      ) -> tuple[dict[str, float], dict[str, str], float, float]:
    """One fresh session's mean ms per node (the profiler's own cost taken out), each node's op,
    the unprofiled median run and the overhead per node."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EdgeoptError(f"onnxruntime could not load {path} ({type(exc).__name__}: {str(exc)[:300]})") from None
    feed = _feed(session, 1, seed=feed_seed)
    for _ in range(warmup + runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    # The profiler costs time per node (tens of microseconds here), which would make a model of
    # many small nodes, an int8 one with its quantizers, look slower than it runs. The same
    # model's runs without it say how much: spread equally over the nodes, it is taken out.
    unprofiled = ort.InferenceSession(str(path), session_options(ort, threads), providers=["CPUExecutionProvider"])
    whole_ms = summarize(time_session(unprofiled, feed, repeats=max(runs, 20), warmup=warmup, min_time_s=0.1),
                         threads=threads).median_ms
    # The profile holds the warm-up runs too: keep each node's last `runs` timings.
    durations: dict[str, list[float]] = defaultdict(list)
    op_of: dict[str, str] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            durations[name].append(event["dur"] / 1000.0)
            op_of[name] = event.get("args", {}).get("op_name", "")
    mean_ms = {name: sum(times[-runs:]) / min(runs, len(times)) for name, times in durations.items()}
    overhead = max(0.0, (sum(mean_ms.values()) - whole_ms) / max(len(mean_ms), 1))
    # A node faster than the overhead keeps nothing, so the nodes may add up to less than a run.
    return {name: max(0.0, ms - overhead) for name, ms in mean_ms.items()}, op_of, whole_ms, overhead


def profile_layers(path: str | Path, layers, *, threads: int = 1, runs: int = 20, warmup: int = 5,
                   sessions: int = 3) -> NodeProfile:
    """Time `path` (an ONNX model exported by `export_onnx`) node by node with onnxruntime's
    profiler and charge each node to one of `layers` (layer names, as in the plan) or to the ops
    between them. One session's per-node times move by tens of percent from the next here (the
    same effect as whole-model times: `ReferenceClock`), so each node's time is the median over
    `sessions` fresh sessions and inputs, and each layer carries its spread across them."""
    import onnx
    import onnxruntime as ort

    layers = set(layers)
    path = Path(path)
    exported = onnx.load(str(path))
    node_layer, tensor_layer = _exported_names(exported, layers)
    per_session = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(sessions):
            options = session_options(ort, threads)  # as the deployed model runs
            if i == 0:
                # Its warning that an NCHWc model is for this machine only is silenced with the rest.
                options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / f"profile{i}")
            per_session.append(_profiled_session(path, options, i, runs=runs, warmup=warmup, threads=threads))
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False)
    op_of = per_session[0][1]
    names = [name for name in per_session[0][0] if all(name in s[0] for s in per_session)]
    session_ms = {name: [s[0][name] for s in per_session] for name in names}
    mean_ms = {name: float(np.median(values)) for name, values in session_ms.items()}
    whole_ms = float(np.median([s[2] for s in per_session]))
    overhead = float(np.median([s[3] for s in per_session]))

    owner = {node.name: _own_layer(node.name, node_layer, tensor_layer, layers) for node in optimized.graph.node}
    producers = {out: node for node in optimized.graph.node for out in node.output}
    readers: dict[str, list] = defaultdict(list)
    for node in optimized.graph.node:
        for name in node.input:
            readers[name].append(node)

    def served(node, forward: bool, seen: set) -> str | None:
        """The layer a serving node serves: the first owned node it feeds (or reads), through
        serving nodes only."""
        if node.name in seen:
            return None
        seen.add(node.name)
        nexts = ([r for out in node.output for r in readers.get(out, [])] if forward
                 else [producers[i] for i in node.input if i in producers])
        for other in nexts:
            if owner.get(other.name):
                return owner[other.name]
        for other in nexts:
            if other.op_type in SERVING:
                found = served(other, forward, seen)
                if found:
                    return found
        return None

    by_name = {node.name: node for node in optimized.graph.node}
    kernel: dict[str, float] = defaultdict(float)
    serving: dict[str, float] = defaultdict(float)
    between: dict[str, float] = defaultdict(float)
    nodes = []
    for name, ms in mean_ms.items():
        op = op_of[name]
        # Worked out above for every node of the optimized graph; a profiled name outside it, here.
        fqn = owner[name] if name in owner else _own_layer(name, node_layer, tensor_layer, layers)
        is_kernel = fqn is not None and op in KERNEL_OPS
        if fqn is None and op in SERVING and name in by_name:
            fqn = served(by_name[name], True, set()) or served(by_name[name], False, set())
        if fqn is None:
            between[op] += ms
        elif is_kernel:
            kernel[fqn] += ms
        else:
            serving[fqn] += ms
        nodes.append((name, op, ms, fqn))
    owned = set(kernel) | set(serving)
    by_session: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(per_session))
    for name, _, _, fqn in nodes:
        if fqn is not None:
            for i, ms in enumerate(session_ms[name]):
                by_session[fqn][i] += ms
    return NodeProfile(layers={fqn: LayerTime(kernel_ms=kernel.get(fqn, 0.0), serving_ms=serving.get(fqn, 0.0),
                                              spread_ms=max(by_session[fqn]) - min(by_session[fqn]))
                               for fqn in sorted(owned)},
                       between=dict(between), total_ms=sum(mean_ms.values()), whole_ms=whole_ms,
                       overhead_ms=overhead, runs=runs, threads=threads, nodes=nodes)
