"""The Raspberry Pi 4 latency model, calibrated on published whole-model measurements.

Nobody here owns a Pi 4, so its table is estimated, not measured, and says so. The estimate is
a per-op roofline whose handful of constants are fitted to the published ncnn benchncnn
figures for a Raspberry Pi 4 Model B at its stock 1.5 GHz with 4 threads (FP32 and INT8), for
the models torchvision also has (../shared/data/pi4_published_latencies.csv in the development
tree; the source of every figure is in that file):

    conv/linear ms = overhead + MACs / throughput(op class, precision)
                     + short-dot-product cost per output
                     + weight bytes / weight bandwidth + activation bytes / activation bandwidth
                     (+ a requantization cost per int8 output element)
                     (+ its activation, if not ReLU-class: output elements x work per
                        element / activation throughput, and where ncnn runs it as a layer of
                        its own, overhead + output bytes read and written / act. bandwidth)
    other op ms    = overhead + bytes read and written / activation bandwidth
                     (+ window taps / pooling throughput for a pool)

MACs count channels rounded up to the NEON width, and a 3x3 stride-1 convolution's output
positions rounded up to whole 6x6 tiles (ncnn runs those as Winograd F(6,3), which computes
whole tiles: an 8x8 map costs what a 12x12 one does). Activations whose layer reads and writes
no more than `CACHE_BYTES` stream from the L2 cache at `cache_gbps`, larger ones from DRAM at
`act_gbps`. The ops between layers (pooling, residual adds, the activations no layer absorbs,
concatenations, channel shuffles) and which layers never run (their result only multiplied by
zero) come from `edgeopt.hw_models.graph.trace_graph`.

An activation a layer absorbs (`LayerKey.activation`, past its BatchNorm) is free when it is
ReLU-class, as ncnn fuses ReLU and its clamps into the convolution. Any other costs its work
per output element, in sigmoid-equivalents (`ACTIVATION_WORK`, from the NEON instructions each
takes) over one fitted throughput; ncnn's converter fuses a sigmoid, a mish and a leaky ReLU
into the convolution too (pnnx's fuse_convolution_activation), while the rest (SiLU as Swish,
Hardswish, GELU, ...) run as a layer of their own: a pass over the output, in fp32 as every op
but convolutions and inner products. A squeeze-excite gate (`LayerKey.gate`) is priced as the
ops it runs, which the traced graph holds: the global pool, the two small convolutions (layers
with their own activations, the gate's sigmoid among them) and the product; the layer's own
price leaves it out, so it is not counted twice.

Each constant has a prior from the hardware (4x Cortex-A72 at 1.5 GHz: 8 fp32 MACs per cycle
per core at peak, LPDDR4 at a few GB/s, a 1 MB L2; no SDOT, so int8 gains 1.5-2x, not 4x; a
few microseconds to dispatch a layer to 4 threads) and the fit moves it only as far as the
published figures demand (a ridge penalty in log space). Some constants the 17 figures hardly
move (the overheads, the L2 bandwidth, the pooling throughput, the pointwise short-dot-product
cost, the activation throughput): those stay near their priors, and BENCHMARKS.md ("pi4 ranks
NAS-Bench-201", "Latency sees activations and gates") says how the priors were chosen. The
fitted model then writes `data/pi4.csv`, one row per distinct layer shape of common torchvision
models at common input sizes and keep ratios, fp32 and int8, with
its constants in the header; `Pi4Latency` reads the table, prices shapes outside it and the
other ops with those constants.

On this runtime class N:M patterns and bits below 8 have no kernels (`pi4` does not list them as
accelerated), so a 4-bit or 2:4 layer costs what its int8 or dense version costs. Ops other than
convolutions and linear layers run in fp32 (ncnn's int8 covers convolutions and inner products).

Regenerate the shipped table with

    python -m edgeopt.hw_models.pi4 ../shared/data/pi4_published_latencies.csv
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeopt.errors import EdgeoptError
from edgeopt.hw_models.table_latency import TableLatency
from edgeopt.hw_models.lut import OpKey
from edgeopt.hw_models.lut import LatencyTable, LayerKey, round_up

if TYPE_CHECKING:
    from edgeopt.hw_models.graph import TracedGraph
    from edgeopt.hw_models.targets import HardwareTarget, LayerTimes

CHANNEL_MULTIPLE = 8  # NEON: 4 fp32 lanes, ncnn packs int8 by 8
WINOGRAD_TILE = 6  # ncnn's 3x3 stride-1 convolutions: Winograd F(6,3), 6x6 output tiles
CACHE_BYTES = 512 * 1024  # a layer's activations up to here stay in the 1 MB L2 (half of it: weights share it)
PRECISIONS = ((32, 32), (8, 8))

# Published model names -> torchvision names. The ncnn "squeezenet" is v1.1, "mobilenet_v3" the
# large variant (its latency sits between v2 and v3-small, as large does); mobilenet v1,
# shufflenet v1, proxylessnas and efficientnetv2-b0 are not in torchvision.
TORCHVISION_NAMES = {
    "squeezenet": "squeezenet1_1", "mobilenet_v2": "mobilenet_v2", "mobilenet_v3": "mobilenet_v3_large",
    "shufflenet_v2": "shufflenet_v2_x1_0", "mnasnet": "mnasnet1_0", "efficientnet_b0": "efficientnet_b0",
    "regnety_400m": "regnet_y_400mf", "googlenet": "googlenet", "resnet18": "resnet18",
    "alexnet": "alexnet", "vgg16": "vgg16", "resnet50": "resnet50",
    "mobilenet_v2_1.0": "mobilenet_v2", "mobilenet_v3_large": "mobilenet_v3_large",
    "mobilenet_v3_small": "mobilenet_v3_small",
}


def pi4_class(key: LayerKey) -> str:
    """ncnn picks kernels by shape: 3x3 stride-1 convolutions run Winograd, 1x1 ones run GEMM."""
    if key.kind == "depthwise":
        return "depthwise"
    if key.kind == "grouped":
        return "pointwise" if key.kernel == (1, 1) else "grouped"
    if key.kind == "linear" or key.kernel == (1, 1):
        return "pointwise"
    if key.kernel == (3, 3) and key.stride == (1, 1):
        return "conv3x3"
    return "conv"


CLASSES = ("conv3x3", "conv", "pointwise", "grouped", "depthwise")

# Priors: (value, spread in natural-log units). Throughputs in GMAC/s for 4 threads.
PRIORS: dict[str, tuple[float, float]] = {
    "gmacs_conv3x3": (20.0, 1.0), "gmacs_conv": (10.0, 1.0), "gmacs_pointwise": (12.0, 1.0),
    "gmacs_grouped": (4.0, 1.0), "gmacs_depthwise": (2.0, 1.0),
    "int8_conv3x3": (1.8, 0.4), "int8_conv": (1.5, 0.4), "int8_pointwise": (1.5, 0.4),
    "int8_grouped": (1.2, 0.4), "int8_depthwise": (1.2, 0.4),
    "weight_gbps": (3.0, 1.0), "act_gbps": (6.0, 1.0), "layer_us": (3.0, 1.0),
    "requant_gelems": (2.0, 1.0), "short_reduction": (64.0, 1.0),
    # Short dot products of pointwise GEMMs (1x1 convolutions, linear layers): ncnn's 1x1 kernel
    # reads its input once per output tile, so a short one costs little more than its traffic.
    "short_pointwise": (16.0, 1.0),
    # What is not a conv/linear layer: dispatch, L2 bandwidth, pooling (taps per second).
    "op_us": (2.0, 1.0), "cache_gbps": (40.0, 1.0), "gtaps_pool": (4.0, 1.0),
    # Activations other than ReLU: G sigmoid-equivalents per second on 4 threads (a NEON sigmoid
    # is about 30 instructions per 4 floats: ~0.4 G/s a core at 1.5 GHz).
    "gelems_act": (1.5, 1.0),
}

# Work per element of each activation, in sigmoids: an exp polynomial and a reciprocal (sigmoid,
# SiLU, tanh, the ELUs, GELU's erf or tanh), two or three transcendentals (softplus; mish), a
# clamp and a multiply or two (the hard ones), a compare and a multiply (leaky ReLU, PReLU).
ACTIVATION_WORK: dict[str, float] = {
    "silu": 1.0, "sigmoid": 1.0, "tanh": 1.0, "elu": 1.0, "selu": 1.0, "celu": 1.0, "gelu": 1.0,
    "gelu_tanh": 1.0, "softplus": 2.0, "mish": 3.0, "hardswish": 0.2, "hardsigmoid": 0.2,
    "leaky_relu": 0.1, "prelu": 0.1,
}
NCNN_FUSED = ("sigmoid", "mish", "leaky_relu")  # run inside the convolution: no pass of their own


@dataclass(frozen=True)
class Pi4Model:
    """Fitted constants (see PRIORS for their meaning and units)."""

    params: dict[str, float]

    def act_ms(self, nbytes: float, *, working_set: float | None = None) -> float:
        """Moving activation bytes: from L2 when the op's working set fits, else from DRAM."""
        fits = (nbytes if working_set is None else working_set) <= CACHE_BYTES
        return nbytes / ((self.params["cache_gbps"] if fits else self.params["act_gbps"]) * 1e6)

    def layer_ms(self, key: LayerKey) -> float:
        p = self.params
        cls = pi4_class(key)
        integer = key.w_bits not in (32, 16) and key.a_bits == 8
        m = CHANNEL_MULTIPLE
        if key.kind == "depthwise":
            macs = key.positions * round_up(key.out_channels, m) * key.kernel[0] * key.kernel[1]
        else:
            macs = (key.positions * round_up(key.out_channels, m)
                    * round_up(key.in_channels // key.groups, m if key.groups == 1 else 1)
                    * key.kernel[0] * key.kernel[1])
        if cls == "conv3x3":
            (oh, ow), t = key.output_hw, WINOGRAD_TILE
            macs = macs * (round_up(max(oh, 1), t) * round_up(max(ow, 1), t)) / key.positions
        gmacs = p[f"gmacs_{cls}"] * (p[f"int8_{cls}"] if integer else 1.0)
        w_bytes = key.weight_elements * (1 if integer else 4)
        in_elems = key.in_channels * key.input_hw[0] * key.input_hw[1]
        out_elems = key.out_channels * key.positions
        act_bytes = (in_elems + out_elems) * (1 if integer else 4)
        compute = macs / (gmacs * 1e6)
        if key.kind != "depthwise":
            # GEMM kernels amortize loads over the dot product: short ones run below peak.
            short = p["short_pointwise"] if cls == "pointwise" else p["short_reduction"]
            compute *= 1 + short / key.reduction
        memory = w_bytes / (p["weight_gbps"] * 1e6) + self.act_ms(act_bytes)
        ms = p["layer_us"] / 1e3 + compute + memory
        if integer:
            ms += out_elems / (p["requant_gelems"] * 1e6)
        if key.activation is not None:
            ms += self.activation_ms(key.activation, out_elems)
        return ms

    def activation_ms(self, kind: str, elements: int) -> float:
        """A non-ReLU activation over a layer's output: its work, and unless ncnn fuses it, a pass
        of its own reading and writing the output in fp32."""
        p = self.params
        ms = elements * ACTIVATION_WORK[kind] / (p["gelems_act"] * 1e6)
        return ms if kind in NCNN_FUSED else ms + p["op_us"] / 1e3 + self.act_ms(elements * 8)

    def op_ms(self, op: OpKey) -> float:
        """A pool, elementwise op or copy between layers: always fp32 (see module docstring)."""
        p = self.params
        ms = p["op_us"] / 1e3 + self.act_ms((op.in_elements + op.out_elements) * 4)
        if op.kind == "pool":
            ms += op.taps * op.out_elements / (p["gtaps_pool"] * 1e6)
        return ms

    def model_ms(self, keys: Iterable[LayerKey | OpKey]) -> float:
        return sum(self.op_ms(k) if isinstance(k, OpKey) else self.layer_ms(k) for k in keys)

    @classmethod
    def from_text(cls, text: str) -> Pi4Model | None:
        """The constants as a table's `# constants:` header writes them; None if any is missing."""
        try:
            params = {k: float(v) for k, v in (item.split("=", 1) for item in text.split())}
        except ValueError:
            return None
        return cls(params) if set(PRIORS) <= set(params) else None

    def to_text(self) -> str:
        return " ".join(f"{k}={v:.6g}" for k, v in self.params.items())


def runs_as_pi4(key: LayerKey) -> LayerKey:
    """fp32 or int8: what ncnn-class runtimes on the A72 execute (see module docstring)."""
    integer = key.w_bits not in (32, 16) and key.a_bits == 8
    return key.with_precision(8, 8, None) if integer else key.with_precision(32, 32, None)


class Pi4Latency(TableLatency):
    """The pi4 target's latency: layers from the shipped table; shapes outside it, and the ops
    between layers (`trace_graph`), from the fitted model whose constants the table's header
    carries. A table without them (`with_lut` on a profile) prices layers only, as any table."""

    def model(self) -> Pi4Model | None:
        table = self.table
        if getattr(self, "_model_of", None) is not table:
            self._model = Pi4Model.from_text(table.meta.get("constants", ""))
            self._model_of = table
        return self._model

    def describe(self) -> str:
        return super().describe() + ("; ops between layers from its constants" if self.model() else "")

    def layer_ms(self, keys: list[LayerKey], target: HardwareTarget) -> LayerTimes:
        keys = [key.with_output(key.activation, None) for key in keys]  # gates: priced as their ops
        times = super().layer_ms(keys, target)
        model = self.model()
        if model is None or self.table.calibration is not None:
            return times
        # A shape the table lacks gets the model that wrote the table, not a fit to the table.
        ms = [t if s == "lut" else model.layer_ms(k.with_precision(*target.runs_as(k.w_bits, k.a_bits, k.nm, k.dynamic)))
              for k, t, s in zip(keys, times.ms, times.sources)]
        return dataclasses.replace(times, ms=ms)

    def op_ms(self, ops: Sequence[OpKey], target: HardwareTarget) -> list[float] | None:
        model = self.model()
        return None if model is None else [model.op_ms(op) for op in ops]


# -- published data ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    model: str  # as published
    torchvision: str
    precision: str  # "FP32" or "INT8"
    latency_ms: float
    runtime: str
    threads: str
    clock: str


def read_published(path: str | Path) -> list[Published]:
    """Rows of the published CSV whose model torchvision has."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(path.open(encoding="utf-8")))
    except OSError as exc:
        raise EdgeoptError(f"Cannot read the published latencies {path}: {exc}.") from None
    need = {"model", "precision", "runtime", "threads", "cpu_clock", "latency_ms"}
    if not rows or not need <= set(rows[0]):
        raise EdgeoptError(f"{path} needs the columns {sorted(need)}.")
    out = []
    for row in rows:
        name = TORCHVISION_NAMES.get(row["model"])
        if name is None:
            continue
        out.append(Published(row["model"], name, row["precision"].upper(), float(row["latency_ms"]),
                             row["runtime"], row["threads"], row["cpu_clock"]))
    return out


def calibration_rows(rows: Iterable[Published]) -> list[Published]:
    """The rows the pi4 target stands for: ncnn, 4 threads, stock 1.5 GHz."""
    return [r for r in rows if r.threads.strip() == "4" and r.clock.startswith("1.5 GHz")
            and r.runtime.startswith("ncnn")]


# benchncnn's default inputs (ncnn benchmark/benchncnn.cpp): 227x227 for these, 224x224 for the rest.
INPUT_SIZES = {"squeezenet1_1": 227, "alexnet": 227}


def graph_keys(graph: TracedGraph, precision: str) -> list[LayerKey | OpKey]:
    """What runs of a traced model, all its layers fp32 or all int8: the live layers' keys, then
    the other ops."""
    w, a = (8, 8) if precision == "INT8" else (32, 32)
    layers = [LayerKey.from_spec(spec, w_bits=w, a_bits=a, nm=None) for spec in graph.layers
              if spec.fqn not in graph.dead]
    return [*layers, *graph.ops]


def model_points(name: str, precision: str, *, size: int | None = None) -> list[LayerKey | OpKey]:
    """`graph_keys` of a torchvision model at its benchmark input size: what `fit` takes."""
    import torch
    import torchvision

    from edgeopt.hw_models.graph import trace_graph

    size = size or INPUT_SIZES.get(name, 224)
    model = torchvision.models.get_model(name, weights=None).eval()
    return graph_keys(trace_graph(model, torch.zeros(1, 3, size, size)), precision)


def fit(points: Sequence[tuple[list[LayerKey | OpKey], float]], *, prior_weight: float = 1.0) -> Pi4Model:
    """Fit the constants to (layers and ops, published ms) points: log-error least squares plus
    the priors' ridge penalty."""
    import numpy as np
    from scipy.optimize import least_squares

    names = list(PRIORS)
    prior = np.array([math.log(PRIORS[n][0]) for n in names])
    spread = np.array([PRIORS[n][1] for n in names])

    def residuals(theta: np.ndarray) -> np.ndarray:
        model = Pi4Model(dict(zip(names, np.exp(theta))))
        fit_res = [math.log(model.model_ms(keys) / ms) for keys, ms in points]
        return np.concatenate([fit_res, prior_weight * (theta - prior) / spread / math.sqrt(len(names))])

    result = least_squares(residuals, prior.copy(), method="trf")
    return Pi4Model(dict(zip(names, (float(v) for v in np.exp(result.x)))))


# -- the shipped table --------------------------------------------------------------------------
REFERENCE_MODELS = ("squeezenet1_1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
                    "shufflenet_v2_x1_0", "mnasnet1_0", "efficientnet_b0", "regnet_y_400mf",
                    "googlenet", "resnet18", "resnet34", "resnet50", "alexnet", "vgg16")
REFERENCE_SIZES = (227, 224, 160, 128, 96, 64, 32)
REFERENCE_KEEPS = (1.0, 0.5)


def build_table(model: Pi4Model, *, models: Sequence[str] = REFERENCE_MODELS,
                sizes: Sequence[int] = REFERENCE_SIZES, keep_ratios: Sequence[float] = REFERENCE_KEEPS,
                meta: dict[str, str] | None = None) -> LatencyTable:
    """Estimated rows for every distinct layer shape of `models` at `sizes` and keep ratios."""
    import torch
    import torchvision

    from edgeopt.hw_models.profiler import model_keys
    from edgeopt.layers import trace_layers

    keys: dict[LayerKey, None] = {}
    for name in models:
        net = torchvision.models.get_model(name, weights=None).eval()
        for size in sizes:
            try:
                layers = trace_layers(net, torch.zeros(1, 3, size, size))
            except EdgeoptError:
                continue  # too small an input for this architecture
            for key in model_keys(layers, keep_ratios=keep_ratios, precisions=PRECISIONS):
                keys[key.with_output(key.activation, None)] = None
    rows = {key: model.layer_ms(key) for key in keys}
    return LatencyTable(rows=rows, meta=dict(meta or {}), name="pi4")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m edgeopt.hw_models.pi4 PUBLISHED_CSV", file=sys.stderr)
        return 2
    published = calibration_rows(read_published(argv[0]))
    points = [(model_points(r.torchvision, r.precision), r.latency_ms) for r in published]
    model = fit(points)
    errors = [abs(model.model_ms(keys) / ms - 1) * 100 for keys, ms in points]
    meta = {
        "origin": ("ESTIMATED, not measured: a per-op roofline calibrated on published whole-model "
                   "latencies (ncnn benchncnn, Raspberry Pi 4 Model B, 1.5 GHz, 4 threads, FP32/INT8; "
                   "Tencent/ncnn benchmark/README.md). Replace it with `optimize profile` run on a Pi."),
        "device": "Raspberry Pi 4 Model B (4x Cortex-A72 @ 1.5 GHz, no SDOT)",
        "runtime": "ncnn/XNNPACK class CPU runtime, 4 threads",
        "threads": "4",
        "calibrated_on": f"{len(points)} published figures; in-sample median abs error "
                         f"{sorted(errors)[len(errors) // 2]:.1f}%",
        "constants": model.to_text(),
    }
    table = build_table(model, meta=meta)
    out = Path(__file__).parent / "data" / "pi4.csv"
    table.to_csv(out)
    print(f"wrote {len(table)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
