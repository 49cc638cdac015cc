"""The device profiler: micro-benchmark every distinct layer shape of a model with onnxruntime.

Each layer shape becomes a one-layer ONNX graph written the way `export_onnx` writes that layer
(float weights; int8 or int4 weights behind DequantizeLinear; 8-bit activations as
QuantizeLinear/DequantizeLinear, with an int32 bias and a requantized output for an integer
layer, which onnxruntime fuses into QLinearConv; 16 bits as Casts), followed by the activation
and squeeze-excite gate the layer's key names (SiLU as Sigmoid and Mul, in float on the
dequantized output of an integer layer), so the table times the kernels the whole model will run
and the float islands an int8 model runs between them. Graphs are built directly with
`onnx.helper`: no PyTorch export per shape, and nothing from `edgeopt.spaces`.

Timing: a fixed thread count, warm-up, the median of repeats with interference dropped
(`edgeopt.evaluators.latency`), and every shape measured in `passes` interleaved passes so that
a burst of load from another process cannot bias one shape; the lowest pass median is kept. The
cost of an empty inference is measured too and subtracted from each layer; it is stored once as
the table's `overhead_ms`. A small layer is timed as up to 32 copies with their own weights
(four times the core's L2 in all, `lut.footprint_mb`), run in turn, so that its weights do not
sit in the core's cache from the previous run as they would not inside a model. What a layer
alone still misses (weights further away, glue between float and int8 layers) is fitted from
whole-model runs by `calibrate_table`.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from edgeopt.errors import EdgeoptError
from edgeopt.hw_models.lut import LatencyTable, LayerKey, micro_copies, storage_bits
from edgeopt.plan import FLOAT_BITS

if TYPE_CHECKING:  # only profile_model traces a model; the host target's timing needs no torch
    import torch
    from torch import nn

    from edgeopt.layers import LayerSpec

# (w_bits, a_bits): what `optimize profile` measures by default, and the names the CLI accepts.
PRECISIONS = {"fp32": (32, 32), "int8": (8, 8), "w8a32": (8, 32), "w32a8": (32, 8),
              "fp16": (16, 16), "w4a8": (4, 8)}
DEFAULT_PRECISIONS: tuple[tuple[int, int], ...] = ((32, 32), (8, 8))
DEFAULT_KEEP_RATIOS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
_OPSET = 21


def pruned(channels: int, keep: float, groups: int = 1, round_to: int = 1) -> int:
    """Channels left after pruning at `keep`, counted as `edgeopt.spaces.prune.kept_channels`
    counts them (which this package may not import): rounded to `round_to`, never zero."""
    per_group = channels // groups
    kept = max(1, round(per_group * keep))
    if kept >= per_group:
        return channels
    if round_to > 1 and groups == 1:
        kept = min(per_group, max(round_to, int(round(kept / round_to)) * round_to))
    return kept * groups


def model_keys(layers: Sequence[LayerSpec], *, keep_ratios: Iterable[float] = DEFAULT_KEEP_RATIOS,
               precisions: Iterable[tuple[int, int]] = DEFAULT_PRECISIONS, round_to: int = 1) -> list[LayerKey]:
    """Every distinct layer shape of a traced model at each keep ratio of its input and output
    channels (rounded to `round_to`, as a target that prefers that multiple prunes) and each
    precision. Image inputs (4 channels or fewer) are never pruned."""
    keys: dict[LayerKey, None] = {}
    keeps = sorted(set(keep_ratios) | {1.0}, reverse=True)
    for spec in layers:
        base = LayerKey.from_spec(spec, w_bits=32, a_bits=32, nm=None)
        shapes = []
        if spec.kind == "depthwise":
            shapes = [(pruned(spec.in_channels, k, 1, round_to),) * 2 for k in keeps]
        else:
            g = spec.groups
            ins = ([spec.in_channels] if spec.in_channels <= 4
                   else [pruned(spec.in_channels, k, g, round_to) for k in keeps])
            outs = [pruned(spec.out_channels, k, g, round_to) for k in keeps]
            shapes = [(i, o) for i in dict.fromkeys(ins) for o in dict.fromkeys(outs)]
        for w_bits, a_bits in precisions:
            for cin, cout in shapes:
                keys[base.with_channels(cin, cout).with_precision(w_bits, a_bits, None)] = None
    return list(keys)


# -- one-layer ONNX graphs -----------------------------------------------------------------------
def _input_shape(key: LayerKey) -> list[int]:
    if key.kind == "linear":
        tokens = key.input_hw[0]
        return [1, key.in_channels] if tokens == 1 else [1, tokens, key.in_channels]
    return [1, key.in_channels, *key.input_hw]


def layer_model(key: LayerKey, *, copies: int = 1, seed: int = 0) -> bytes:
    """A serialized ONNX model running one layer as `export_onnx` writes it at key's precision,
    with the activation and gate that follow it (`_after_layer`).

    With `copies` > 1 the graph holds that many copies of the layer, each with its own weights,
    all reading the one input: running them in turn pushes each copy's weights out of the
    per-core cache before it runs again, as the rest of a model does between two inferences.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits: list = []
    nodes: list = []

    def const(name: str, array: np.ndarray, elem_type: int | None = None) -> str:
        if elem_type is None:
            inits.append(numpy_helper.from_array(array, name))
        else:
            inits.append(helper.make_tensor(name, elem_type, array.shape, array.flatten().tolist()))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    cout, cin_g = key.out_channels, key.in_channels // key.groups
    tokens = key.kind == "linear" and key.input_hw[0] > 1
    if key.kind == "linear":
        # A linear layer on tokens runs as MatMul with the transposed weight, then an Add.
        w_shape, axis = ((key.in_channels, cout), 1) if tokens else ((cout, key.in_channels), 0)
    else:
        w_shape, axis = (cout, cin_g, *key.kernel), 0
    integer = key.w_bits not in FLOAT_BITS and key.a_bits == 8
    outputs = []
    for c in range(copies):
        p = f"c{c}_"
        if key.dynamic:
            # As export_onnx writes a dynamic-range layer: the input quantized at run time, int8
            # weights straight into ConvInteger / MatMulInteger, then Cast, Mul and the float bias.
            nodes.append(helper.make_node("DynamicQuantizeLinear", ["x"], [p + "xq", p + "xs", p + "xz"]))
            ints = rng.integers(-63, 64, size=w_shape).astype(np.int8)
            if key.kind == "linear" and not tokens:
                ints = np.ascontiguousarray(ints.T)  # MatMulInteger takes [in, out]
            w_name, w_zero = const(p + "wq", ints), const(p + "wz", np.array(0, np.int8))
            if key.kind == "linear":
                acc = node("MatMulInteger", [p + "xq", w_name, p + "xz", w_zero], p + "acc")
                channel_shape = (cout,)
            else:
                (kh, kw) = key.kernel
                acc = node("ConvInteger", [p + "xq", w_name, p + "xz", w_zero], p + "acc",
                           kernel_shape=list(key.kernel), strides=list(key.stride), group=key.groups,
                           pads=[(kh - 1) // 2, (kw - 1) // 2, (kh - 1) // 2, (kw - 1) // 2])
                channel_shape = (1, cout, 1, 1)
            scale = node("Mul", [p + "xs", const(p + "ws", np.full(channel_shape, 0.01, np.float32))], p + "s")
            scaled = node("Mul", [node("Cast", [acc], p + "accf", to=TensorProto.FLOAT), scale], p + "scaled")
            y = node("Add", [scaled, const(p + "b", np.zeros(channel_shape, np.float32))], p + "y")
            y = _after_layer(key, y, node, const, p, integer=False)
            outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
            continue
        # Weights.
        w_scale = None
        if key.w_bits in FLOAT_BITS:
            weight = rng.standard_normal(w_shape).astype(np.float32) * 0.05
            if key.w_bits == 32:
                w_name = const(p + "w", weight)
            else:
                w_name = node("Cast", [const(p + "w16", weight.astype(np.float16))], p + "w", to=TensorProto.FLOAT)
        else:
            int4 = storage_bits(key.w_bits) == 4
            qmax = 7 if int4 else 63
            ints = rng.integers(-qmax, qmax + 1, size=w_shape).astype(np.int8)
            w_scale = np.full(cout, 0.01, dtype=np.float32)
            elem = TensorProto.INT4 if int4 else None
            w_name = node("DequantizeLinear", [const(p + "wq", ints, elem), const(p + "ws", w_scale),
                                               const(p + "wz", np.zeros(cout, np.int8), elem)],
                          p + "w", axis=axis)
        # Activations (each copy quantizes its own input, with its own scale so that onnxruntime
        # does not merge the copies' quantizers into one).
        x = "x"
        x_scale = 0.05 + 1e-4 * c
        if key.a_bits == 8:  # uint8 activations, as export_onnx writes them (u8s8 kernels)
            s, z = const(p + "xs", np.array(x_scale, np.float32)), const(p + "xz", np.array(128, np.uint8))
            x = node("DequantizeLinear", [node("QuantizeLinear", ["x", s, z], p + "xq"), s, z], p + "xdq")
        elif key.a_bits == 16:
            x = node("Cast", [node("Cast", ["x"], p + "x16", to=TensorProto.FLOAT16)], p + "x32",
                     to=TensorProto.FLOAT)
        if integer:
            b_scale = (x_scale * w_scale).astype(np.float32)
            bias = node("DequantizeLinear", [const(p + "bq", np.zeros(cout, np.int32)), const(p + "bs", b_scale),
                                             const(p + "bz", np.zeros(cout, np.int32))], p + "b", axis=0)
        else:
            bias = const(p + "b", np.zeros(cout, np.float32))
        # The layer.
        if key.kind == "linear":
            if tokens:
                y = node("Add", [node("MatMul", [x, w_name], p + "mm"), bias], p + "y")
            else:
                y = node("Gemm", [x, w_name, bias], p + "y", transB=1)
        else:
            (kh, kw) = key.kernel
            pads = [(kh - 1) // 2, (kw - 1) // 2, (kh - 1) // 2, (kw - 1) // 2]
            y = node("Conv", [x, w_name, bias], p + "y", kernel_shape=list(key.kernel),
                     strides=list(key.stride), pads=pads, group=key.groups)
        if integer:
            s, z = const(p + "ys", np.array(0.05, np.float32)), const(p + "yz", np.array(128, np.uint8))
            y = node("DequantizeLinear", [node("QuantizeLinear", [y, s, z], p + "yq"), s, z], p + "ydq")
        y = _after_layer(key, y, node, const, p, integer=integer)
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))

    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, _input_shape(key))],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 10
    return model.SerializeToString()


def _activation(kind: str, x: str, node: Callable, const: Callable, p: str, channels: tuple[int, ...]) -> str:
    """The nodes torch.onnx writes for activation `kind` on tensor x (opset 17, as `export_onnx`
    exports before converting to 21); returns the output's name. `channels`: the shape of a
    per-channel parameter (PReLU's slopes) against x."""
    n = iter(range(100))

    def c(value: float) -> str:
        return const(f"{p}act_c{next(n)}", np.array(value, np.float32))

    def op(name: str, inputs: list[str], **attrs) -> str:
        return node(name, inputs, f"{p}act_{next(n)}", **attrs)

    single = {"hardswish": "HardSwish", "sigmoid": "Sigmoid", "tanh": "Tanh", "selu": "Selu", "softplus": "Softplus"}
    if kind in single:
        return op(single[kind], [x])
    if kind == "silu":
        return op("Mul", [x, op("Sigmoid", [x])])
    if kind == "hardsigmoid":
        return op("HardSigmoid", [x], alpha=1 / 6)
    if kind == "mish":
        return op("Mul", [x, op("Tanh", [op("Softplus", [x])])])
    if kind == "gelu":
        return op("Mul", [op("Mul", [x, op("Add", [op("Erf", [op("Div", [x, c(2 ** 0.5)])]), c(1.0)])]), c(0.5)])
    if kind == "gelu_tanh":
        cube = op("Mul", [op("Mul", [x, x]), x])
        inner = op("Mul", [op("Add", [x, op("Mul", [cube, c(0.044715)])]), c((2 / np.pi) ** 0.5)])
        return op("Mul", [op("Mul", [x, op("Add", [op("Tanh", [inner]), c(1.0)])]), c(0.5)])
    if kind in ("elu", "celu"):
        return op(kind.capitalize(), [x], alpha=1.0)
    if kind == "leaky_relu":
        return op("LeakyRelu", [x], alpha=0.01)
    if kind == "prelu":
        return op("PRelu", [x, const(f"{p}act_slope", np.full(channels, 0.25, np.float32))])
    raise EdgeoptError(f"No ONNX form for activation {kind!r}.")


def _after_layer(key: LayerKey, y: str, node: Callable, const: Callable, p: str, *, integer: bool) -> str:
    """The activation and squeeze-excite gate after a layer, as `export_onnx` writes them: in
    float (after an integer layer, on its dequantized output; the next layer's input quantizer,
    timed with that layer, quantizes the result again). A gate is the global pool of that
    output and the product with it; its two small convolutions and their activations are layers
    of their own (the squeeze conv reads the pool quantized in an int8 model, which lets
    onnxruntime pool in uint8 where no float activation comes between)."""
    if key.activation is not None:
        channels = (key.out_channels,) if key.kind == "linear" else (key.out_channels, 1, 1)
        y = _activation(key.activation, y, node, const, p, channels)
    if key.gate is not None:
        pooled = node("GlobalAveragePool", [y], p + "pool")
        if integer:
            s, z = const(p + "ps", np.array(0.05, np.float32)), const(p + "pz", np.array(128, np.uint8))
            pooled = node("DequantizeLinear", [node("QuantizeLinear", [pooled, s, z], p + "pq"), s, z], p + "pdq")
        y = node("Mul", [y, pooled], p + "gated")
    return y


def empty_model() -> bytes:
    """One trivial op on one number: what an inference costs before any layer runs."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "empty",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 10
    return model.SerializeToString()


# -- measuring --------------------------------------------------------------------------------------
def _time(model: bytes, shape: list[int], *, threads: int, repeats: int, min_time_s: float) -> tuple[float, float]:
    from edgeopt.evaluators.latency import make_session, summarize, time_session

    session = make_session(model, threads=threads)
    feed = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    m = summarize(time_session(session, feed, repeats=repeats, warmup=3, min_time_s=min_time_s,
                               max_time_s=2.0), threads=threads)
    return m.median_ms, m.spread_ms


def device_description() -> str:
    """The CPU (or board) as /proc/cpuinfo names it, the core count and the OS."""
    name = platform.processor() or platform.machine()
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        text = ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    # x86 says "model name"; a Raspberry Pi says "Model" (the board) and ARM cores "CPU part".
    name = fields.get("Model") or fields.get("model name") or fields.get("Hardware") or name
    return f"{name}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}"


def profile_keys(keys: Sequence[LayerKey], *, threads: int = 1, repeats: int = 20,
                 min_time_s: float = 0.08, passes: int = 2,
                 progress: Callable[[int, int], None] | None = None) -> LatencyTable:
    """Measure each layer shape with onnxruntime here; returns a table (origin: measured)."""
    import onnxruntime as ort

    if not keys:
        raise EdgeoptError("Nothing to profile: no layer shapes were given.")
    if passes < 1:
        raise EdgeoptError(f"passes must be at least 1, got {passes}.")
    keys = list(dict.fromkeys(keys))
    empty = empty_model()
    overheads = []
    best: dict[LayerKey, tuple[float, float]] = {}
    total = len(keys) * passes
    done = 0
    for _ in range(passes):
        overheads.append(_time(empty, [1, 1], threads=threads, repeats=200, min_time_s=0.1)[0])
        for key in keys:
            copies = micro_copies(key)
            median, spread = _time(layer_model(key, copies=copies), _input_shape(key), threads=threads,
                                   repeats=repeats, min_time_s=min_time_s)
            per_layer = (median - overheads[-1]) / copies
            if key not in best or per_layer < best[key][0]:
                best[key] = (per_layer, spread / copies)
            done += 1
            if progress is not None:
                progress(done, total)
    overhead = min(overheads)
    rows = {key: max(ms, 1e-4) for key, (ms, _) in best.items()}
    meta = {
        "origin": "measured with onnxruntime by `optimize profile`",
        "device": device_description(),
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "threads": str(threads),
        "overhead_ms": f"{overhead:.5f}",
        "date": datetime.date.today().isoformat(),
    }
    return LatencyTable(rows=rows, meta=meta, spread={k: s for k, (_, s) in best.items()}, name="profile")


def print_progress(label: str) -> Callable[[int, int], None]:
    """A progress callback that prints `label: done/total (pct%)` to stderr every tenth."""
    state = {"last": -1}

    def report(done: int, total: int) -> None:
        pct = int(100 * done / total)
        if pct // 10 != state["last"] // 10 or done == total:
            state["last"] = pct
            print(f"  {label}: {done}/{total} ({pct}%)", file=sys.stderr, flush=True)

    return report


def profile_model(model: nn.Module, example_input: torch.Tensor, *,
                  keep_ratios: Iterable[float] = DEFAULT_KEEP_RATIOS,
                  precisions: Iterable[tuple[int, int]] = DEFAULT_PRECISIONS, round_to: int = 1,
                  threads: int = 1, repeats: int = 20, passes: int = 2, calibration_plans: int | None = None,
                  label: str | None = None) -> LatencyTable:
    """Profile every distinct layer shape of `model` (at each keep ratio and precision) here: what
    `optimize profile` writes. With `calibration_plans`, the table is then calibrated
    (`calibrate_table`) on whole-model runs of that many random plans plus uniform fp32 and int8
    plans at keep 1 and 0.5. With `label`, progress is printed to stderr under that name."""
    from edgeopt.evaluators.latency import calibration_samples
    from edgeopt.hw_models.estimate import calibrate_table
    from edgeopt.hw_models.targets import get_target
    from edgeopt.layers import trace_layers

    example = example_input[:1]
    precisions = list(precisions)
    keys = model_keys(trace_layers(model, example), keep_ratios=keep_ratios, precisions=precisions,
                      round_to=round_to)
    if label is not None:
        print(f"{label}: {len(keys)} layer shapes x {passes} passes, {threads} thread(s)"
              f"{'' if calibration_plans is None else ', then whole-model calibration runs'}",
              file=sys.stderr, flush=True)
    table = profile_keys(keys, threads=threads, repeats=repeats, passes=passes,
                         progress=None if label is None else print_progress("layers"))
    table.meta["input_shape"] = "x".join(str(d) for d in example.shape)
    table.meta["round_to"] = str(round_to)
    if calibration_plans is not None:
        samples = calibration_samples(model, example, precisions=precisions, keep_ratios=(1.0, 0.5),
                                      random_plans=calibration_plans, round_to=round_to, threads=threads,
                                      progress=None if label is None else print_progress("whole-model runs"))
        table = calibrate_table(table, samples, target=get_target("host"))
    return table


class OnDemandProfile:
    """Latency of the machine running edgeopt without a table: each layer shape is
    micro-benchmarked here the first time an estimate needs it, then remembered (per process).
    `optimize profile` writes a full table, calibrated on whole-model runs, for `--lut`."""

    def __init__(self, *, threads: int = 1, repeats: int = 10, passes: int = 1) -> None:
        self.threads, self.repeats, self.passes = threads, repeats, passes
        self._table: LatencyTable | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # A lock belongs to one process: local workers get the target pickled (`--workers N
        # --target host` failed with "cannot pickle '_thread.lock'") and make their own.
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def describe(self) -> str:
        return (f"measured here with onnxruntime, {self.threads} thread(s): each new layer shape is "
                "micro-benchmarked on first use (or pass --lut with a table from `optimize profile`)")

    def layer_ms(self, keys: list[LayerKey], target):  # -> LayerTimes
        from edgeopt.hw_models.table_latency import TableLatency

        wanted = [k.with_precision(storage_bits(k.w_bits), k.a_bits, None, k.dynamic) for k in keys]
        with self._lock:
            known = self._table.rows if self._table is not None else {}
            missing = [k for k in dict.fromkeys(wanted) if k not in known]
            if missing:
                new = profile_keys(missing, threads=self.threads, repeats=self.repeats, passes=self.passes)
                self._table = new if self._table is None else LatencyTable.merge([self._table, new], name="host")
            table = self._table
        return TableLatency(table).layer_ms(wanted, target)
