"""Latency lookup tables: the CSV format, the lookup, and the per-op-kind roofline fit.

A table has one row per layer shape and precision, keyed by structured fields (never a string
that must be parsed): op kind, in/out channels, kernel, stride, groups, input size, weight and
activation bits, N:M pattern, and (optional columns) what runs on the layer's output before the
next layer: an activation other than ReLU/ReLU6 and a squeeze-excite gate. `optimize profile`
writes one from measurements; the shipped pi4 table was estimated (its header says so). Lines
starting with `#` before the header carry metadata (`# key: value`: device, runtime, threads,
origin, overhead_ms).

A shape that is not in the table gets an estimate from a roofline-style model fitted to the
table, per op kind and precision: a fixed overhead plus a compute term (MACs with channels
rounded up to the SIMD width) plus memory terms (weight bytes, activation bytes). The fit is
then anchored on the nearest rows of the same layer family (same kind, kernel, stride and input
size at other channel counts), which carry what the roofline misses (kernel choice, cache fit).

`OpKey` is the other key latency models price: an op between the layers (pool, elementwise,
copy), as `edgeopt.hw_models.graph.trace_graph` finds them.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgeopt.errors import EdgeoptError
from edgeopt.layer_kinds import ACTIVATIONS, FUSED_ACTIVATIONS, GATES, LAYER_KINDS
from edgeopt.plan import A_BITS, NM, NM_PATTERNS, W_BITS

if TYPE_CHECKING:
    from edgeopt.layers import LayerSpec

KEY_COLUMNS = ("op_kind", "in_channels", "out_channels", "kernel_h", "kernel_w", "stride_h",
               "stride_w", "groups", "input_h", "input_w", "w_bits", "a_bits", "nm")
REQUIRED_COLUMNS = KEY_COLUMNS + ("latency_ms",)
OPTIONAL_COLUMNS = ("spread_ms",)
# 1 on a row timed with dynamic-range int8 (`LayerKey.dynamic`); written only by tables that have one.
DYNAMIC_COLUMN = "dynamic"
# The activation and the gate after the layer (`LayerKey.activation`, `.gate`); written only by
# tables that have them, empty meaning none (a table without them never timed one).
ACTIVATION_COLUMN, GATE_COLUMN = "activation", "gate"
PRICED_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a not in FUSED_ACTIVATIONS)
# A profile cycles each layer through copies with their own weights until they add up to
# `footprint_mb()` (at most MAX_COPIES copies), so that its weights are not still in the core's
# cache from the previous run, as they would not be inside a model: four times the core's L2,
# at least FOOTPRINT_MB. On a Xeon with 2 MB of L2 the former 2 MB (up to 8 copies) left the
# weights in L2, and the host estimate of efficientnet_b0 at 32x32 came out 23% under its
# measured time in fp32 and 14% in int8 (8.4 MB, up to 32 copies: within 9%; BENCHMARKS.md,
# "Latency sees activations and gates").
FOOTPRINT_MB = 2.0
MAX_COPIES = 32
_INT_COLUMNS = KEY_COLUMNS[1:12]


def storage_bits(w_bits: int) -> int:
    """Bits a weight occupies in a runtime: 6-bit values live in int8, 2-bit ones in int4."""
    return {32: 32, 16: 16, 8: 8, 6: 8, 4: 4, 2: 4}[w_bits]


def weight_mb_of(key: LayerKey) -> float:
    return key.weight_elements * storage_bits(key.w_bits) / 8 / 1e6


def footprint_mb() -> float:
    """The weight MB a profile's micro-benchmark cycles through: four times this CPU's L2."""
    from edgeopt.evaluators.cpu import l2_cache_bytes

    l2 = l2_cache_bytes()
    return max(FOOTPRINT_MB, 4 * l2 / 1e6) if l2 else FOOTPRINT_MB


def micro_copies(key: LayerKey) -> int:
    """How many copies of a layer a profile's micro-benchmark cycles through."""
    return max(1, min(MAX_COPIES, math.ceil(footprint_mb() / max(weight_mb_of(key), 1e-9))))



def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple if multiple > 1 else value


@dataclass(frozen=True)
class LayerKey:
    """What a layer's latency depends on. For a linear layer `input_hw` is (tokens, 1).

    `dynamic` marks dynamic-range int8 (w_bits 8, a_bits 32: float activations that the kernel
    quantizes at run time), which runs other kernels than weight-only int8. `activation` is the
    activation on the layer's output where it is not ReLU-class (None: ReLU, ReLU6, a clamp, or
    none; those run inside the kernel), and `gate` the kind of squeeze-excite gate multiplying
    it (`edgeopt.layers.LayerSpec`): an int8 model runs both in float between its integer
    layers, which a layer timed alone would not show."""

    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    input_hw: tuple[int, int]
    w_bits: int = 32
    a_bits: int = 32
    nm: NM | None = None
    dynamic: bool = False
    activation: str | None = None
    gate: str | None = None

    @classmethod
    def from_spec(cls, spec: LayerSpec, *, w_bits: int | None = None, a_bits: int | None = None,
                  nm: NM | None | str = "same") -> LayerKey:
        """The spec's layer, at its own precision unless one is given (a given one is static)."""
        hw = (max(1, spec.positions), 1) if spec.kind == "linear" else spec.input_hw
        own = w_bits is None and a_bits is None
        activation = spec.activation if spec.activation not in FUSED_ACTIVATIONS else None
        return cls(spec.kind, spec.in_channels, spec.out_channels, tuple(spec.kernel), tuple(spec.stride),
                   spec.groups, tuple(hw), spec.w_bits if w_bits is None else w_bits,
                   spec.a_bits if a_bits is None else a_bits, spec.nm if nm == "same" else nm,
                   spec.dynamic and own, activation, spec.gate)

    def with_precision(self, w_bits: int, a_bits: int, nm: NM | None, dynamic: bool = False) -> LayerKey:
        return LayerKey(self.kind, self.in_channels, self.out_channels, self.kernel, self.stride,
                        self.groups, self.input_hw, w_bits, a_bits, nm, dynamic, self.activation, self.gate)

    def with_channels(self, in_channels: int, out_channels: int) -> LayerKey:
        groups = in_channels if self.kind == "depthwise" else self.groups
        return LayerKey(self.kind, in_channels, out_channels, self.kernel, self.stride, groups,
                        self.input_hw, self.w_bits, self.a_bits, self.nm, self.dynamic, self.activation, self.gate)

    def with_output(self, activation: str | None, gate: str | None) -> LayerKey:
        """The same layer followed by another activation and gate (None, None: the layer alone)."""
        return LayerKey(self.kind, self.in_channels, self.out_channels, self.kernel, self.stride, self.groups,
                        self.input_hw, self.w_bits, self.a_bits, self.nm, self.dynamic, activation, gate)

    # -- derived sizes (padding (k - 1) // 2, as nearly every CNN uses) ---------------------
    @property
    def output_hw(self) -> tuple[int, int]:
        if self.kind == "linear":
            return self.input_hw
        (h, w), (kh, kw), (sh, sw) = self.input_hw, self.kernel, self.stride
        return ((h + 2 * ((kh - 1) // 2) - kh) // sh + 1, (w + 2 * ((kw - 1) // 2) - kw) // sw + 1)

    @property
    def positions(self) -> int:
        oh, ow = self.output_hw
        return max(1, oh) * max(1, ow)

    @property
    def reduction(self) -> int:
        return (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]

    @property
    def macs(self) -> int:
        return self.positions * self.out_channels * self.reduction

    @property
    def weight_elements(self) -> int:
        return self.out_channels * self.reduction

    @property
    def op_class(self) -> str:
        """The kind the roofline is fitted per: runtimes pick different kernels for pointwise,
        3x3 stride-1 (Winograd on ARM) and other convolutions."""
        if self.kind == "conv" and self.kernel == (1, 1):
            return "conv1x1"
        if self.kind == "conv" and self.kernel == (3, 3) and self.stride == (1, 1):
            return "conv3x3"
        return self.kind

    @property
    def family(self) -> tuple:
        """Same layer at other channel counts (keep ratios): what anchors the fitted model."""
        return (self.kind, self.kernel, self.stride, self.input_hw, self.w_bits, self.a_bits, self.nm,
                self.dynamic, self.groups if self.kind == "grouped" else 0, self.activation, self.gate)

    @property
    def precision(self) -> tuple[int, int, NM | None, bool]:
        return (self.w_bits, self.a_bits, self.nm, self.dynamic)

    def features(self, channel_multiple: int = 1) -> tuple[float, ...]:
        """The roofline's terms: (1, MACs with channels rounded up to the SIMD width, weight
        bytes, activation bytes, outputs, outputs through an activation, outputs through a
        gate). The fifth prices short dot products: a kernel pays a fixed cost per output, which
        matters when each output needs few MACs; the last two what runs after the kernel."""
        m = channel_multiple
        if self.kind == "depthwise":
            rounded = self.positions * round_up(self.out_channels, m) * self.kernel[0] * self.kernel[1]
        else:
            per_group_in = self.in_channels // self.groups
            rounded = (self.positions * round_up(self.out_channels, m)
                       * round_up(per_group_in, m if self.groups == 1 else 1)
                       * self.kernel[0] * self.kernel[1])
        w_bytes = self.weight_elements * storage_bits(self.w_bits) / 8
        a_bytes = 1 if self.a_bits == 8 else 4
        outputs = self.out_channels * self.positions
        acts = (self.in_channels * self.input_hw[0] * self.input_hw[1] + outputs) * a_bytes
        return (1.0, float(rounded), float(w_bytes), float(acts), float(outputs),
                float(outputs if self.activation else 0), float(outputs if self.gate else 0))

    def row(self) -> dict[str, object]:
        return {"op_kind": self.kind, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_h": self.kernel[0], "kernel_w": self.kernel[1], "stride_h": self.stride[0],
                "stride_w": self.stride[1], "groups": self.groups, "input_h": self.input_hw[0],
                "input_w": self.input_hw[1], "w_bits": self.w_bits, "a_bits": self.a_bits,
                "nm": "" if self.nm is None else f"{self.nm.n}:{self.nm.m}"} | (
                    {DYNAMIC_COLUMN: 1} if self.dynamic else {}) | (
                    {ACTIVATION_COLUMN: self.activation} if self.activation else {}) | (
                    {GATE_COLUMN: self.gate} if self.gate else {})


OP_KINDS = ("pool", "elementwise", "copy")


@dataclass(frozen=True)
class OpKey:
    """A non-conv op as a latency model prices it: per sample, the elements it reads (all tensor
    inputs) and writes, and the taps per output (a pool's window; 1 for elementwise ops and
    copies). `name` (the torch call and the module it ran in) is for reports only."""

    kind: str  # one of OP_KINDS
    in_elements: int
    out_elements: int
    taps: int = 1
    name: str = field(default="", compare=False)


def _check_key(key: LayerKey) -> str | None:
    """Why a key is not a valid layer, or None."""
    if key.kind not in LAYER_KINDS:
        return f"op_kind {key.kind!r} is not one of {list(LAYER_KINDS)}"
    if min(key.in_channels, key.out_channels, key.groups, *key.kernel, *key.stride, *key.input_hw) < 1:
        return "channels, kernel, stride, groups and input size must all be at least 1"
    if key.in_channels % key.groups or key.out_channels % key.groups:
        return f"groups={key.groups} does not divide in/out channels {key.in_channels}/{key.out_channels}"
    if key.kind == "depthwise" and not key.groups == key.in_channels == key.out_channels:
        return "a depthwise row needs groups == in_channels == out_channels"
    if key.kind in ("conv", "linear") and key.groups != 1:
        return f"a {key.kind} row needs groups == 1"
    if key.w_bits not in W_BITS:
        return f"w_bits={key.w_bits} is not one of {list(W_BITS)}"
    if key.a_bits not in A_BITS:
        return f"a_bits={key.a_bits} is not one of {list(A_BITS)}"
    if key.dynamic and (key.w_bits, key.a_bits) != (8, 32):
        return f"a dynamic row needs w_bits=8 and a_bits=32, got {key.w_bits} and {key.a_bits}"
    if key.activation is not None and key.activation not in PRICED_ACTIVATIONS:
        return (f"activation {key.activation!r} is not one of {list(PRICED_ACTIVATIONS)} (empty: none, or "
                "one the layer's kernel runs: ReLU, ReLU6, a clamp)")
    if key.gate is not None and key.gate not in GATES:
        return f"gate {key.gate!r} is not one of {list(GATES)} (empty: none)"
    return None


def parse_nm(text: str) -> NM | None:
    text = text.strip()
    if text in ("", "none", "None", "dense"):
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"nm {text!r} is not empty or N:M such as 2:4")
    nm = NM(n=int(parts[0]), m=int(parts[1]))
    if nm not in NM_PATTERNS:
        raise ValueError(f"nm {text} is not one of {[str(p) for p in NM_PATTERNS if p]}")
    return nm


@dataclass(frozen=True)
class _Fit:
    coef: tuple[float, ...]
    rows: int

    def predict(self, features: tuple[float, ...]) -> float:
        return sum(c * f for c, f in zip(self.coef, features))


def is_integer(key: LayerKey) -> bool:
    """Runs as an integer kernel: integer weights and 8-bit activations."""
    return key.w_bits not in (32, 16) and key.a_bits == 8


def calibration_terms(keys: Sequence[LayerKey], ms: Sequence[float]) -> list[tuple[float, ...]]:
    """Per layer, in execution order: (ms if float, ms if integer, weight MB, 1, switch MB).

    "switch MB" is the layer's input in MB (fp32) where the activations change between float
    and int8 from the previous layer: there the runtime inserts (de)quantization and layout
    changes (onnxruntime runs int8 convolutions in NHWC and float ones in its blocked layout).
    """
    terms = []
    previous = None
    for key, t in zip(keys, ms):
        act8 = key.a_bits == 8
        switch = (previous is not None and act8 != previous)
        in_mb = key.in_channels * key.input_hw[0] * key.input_hw[1] * 4 / 1e6
        integer = is_integer(key)
        terms.append((0.0 if integer else t, t if integer else 0.0, weight_mb_of(key), 1.0,
                      in_mb if switch else 0.0))
        previous = act8
    return terms


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Whole-model corrections a profile fits on the same device (`# calibration:` in the file).

    A layer alone is not a layer inside a model: inside one, its weights come from further
    away (the other layers evicted them), and the graph adds glue between layers (requantizing,
    layout changes where float and int8 layers meet) that no single-layer benchmark shows. So
    each row becomes `scale * ms + weight_ms_per_mb * weight MB + layer_ms + switch_ms_per_mb *
    input MB where the precision switches`, with `scale` per precision class (float / integer),
    fitted on whole-model measurements of the profiled model.
    """

    float_scale: float = 1.0
    int_scale: float = 1.0
    weight_ms_per_mb: float = 0.0
    layer_ms: float = 0.0
    switch_ms_per_mb: float = 0.0
    points: int = 0  # whole-model measurements it was fitted on
    error_pct: float = 0.0  # their median absolute error after correction

    FIELDS = ("float_scale", "int_scale", "weight_ms_per_mb", "layer_ms", "switch_ms_per_mb",
              "points", "error_pct")

    def to_text(self) -> str:
        return " ".join(f"{name}={getattr(self, name):.6g}" for name in self.FIELDS)

    @classmethod
    def from_text(cls, text: str, *, name: str = "table") -> Calibration:
        try:
            values = dict(item.split("=", 1) for item in text.split())
            unknown = set(values) - set(cls.FIELDS)
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            parsed = {k: (int(float(v)) if k == "points" else float(v)) for k, v in values.items()}
        except ValueError as exc:
            raise EdgeoptError(f"{name}: '# calibration:' must read like 'float_scale=1.0 int_scale=1.1 "
                               f"weight_ms_per_mb=0.02 layer_ms=0.001' ({exc}).") from None
        if not all(math.isfinite(v) for v in parsed.values()) or parsed.get("float_scale", 1) <= 0 \
                or parsed.get("int_scale", 1) <= 0:
            raise EdgeoptError(f"{name}: '# calibration:' needs finite values and positive scales.")
        return cls(**parsed)

    @property
    def coefficients(self) -> tuple[float, ...]:
        return (self.float_scale, self.int_scale, self.weight_ms_per_mb, self.layer_ms, self.switch_ms_per_mb)

    def apply(self, keys: Sequence[LayerKey], ms: Sequence[float]) -> list[float]:
        coef = self.coefficients
        return [max(sum(c * f for c, f in zip(coef, terms)), 0.2 * t)
                for terms, t in zip(calibration_terms(keys, ms), ms)]


@dataclass
class LatencyTable:
    """Per-layer latencies in ms, keyed by `LayerKey`; `meta` holds the header's `# key: value`s."""

    rows: dict[LayerKey, float]
    meta: dict[str, str] = field(default_factory=dict)
    spread: dict[LayerKey, float] = field(default_factory=dict)
    name: str = "table"

    def __post_init__(self) -> None:
        if not self.rows:
            raise EdgeoptError(f"The latency table {self.name} has no rows.")
        self._fits: dict[int, _Fitted] = {}
        self._precisions: frozenset | None = None
        self._times_outputs: bool | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def overhead_ms(self) -> float:
        """Fixed cost of one inference (session call, input and output), counted once a model."""
        try:
            return float(self.meta.get("overhead_ms", 0.0))
        except ValueError:
            raise EdgeoptError(f"{self.name}: '# overhead_ms:' must be a number, got "
                               f"{self.meta['overhead_ms']!r}.") from None

    @property
    def calibration(self) -> Calibration | None:
        text = self.meta.get("calibration", "").strip()
        return Calibration.from_text(text, name=self.name) if text else None

    @property
    def precisions(self) -> frozenset[tuple[int, int, NM | None]]:
        """The (w_bits, a_bits, nm) combinations the table has rows for."""
        if self._precisions is None:
            self._precisions = frozenset(key.precision for key in self.rows)
        return self._precisions

    @property
    def times_outputs(self) -> bool:
        """Whether any row times an activation or gate after its layer. A table without (written
        before they were keyed, or for a model with neither) timed every layer alone, and is read
        so: `TableLatency` looks a key up without them."""
        if self._times_outputs is None:
            self._times_outputs = any(key.activation or key.gate for key in self.rows)
        return self._times_outputs

    def lookup(self, key: LayerKey) -> float | None:
        return self.rows.get(key)

    def fitted(self, channel_multiple: int = 1) -> _Fitted:
        if channel_multiple not in self._fits:
            self._fits[channel_multiple] = _Fitted(self, channel_multiple)
        return self._fits[channel_multiple]

    # -- CSV ---------------------------------------------------------------------------------
    @classmethod
    def from_csv(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EdgeoptError(f"No latency table at {path}. Make one with "
                               "`optimize profile --model MODEL --out table.csv`.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise EdgeoptError(f"Cannot read the latency table {path} ({type(exc).__name__}: {exc}); "
                               "it must be a UTF-8 CSV written by `optimize profile`.") from None
        return cls.from_text(text, name=str(path))

    @classmethod
    def from_text(cls, text: str, *, name: str = "table") -> LatencyTable:
        if "\x00" in text:
            raise EdgeoptError(f"The latency table {name} is binary, not a CSV; re-create it with "
                               "`optimize profile`.")
        lines = text.splitlines()
        meta: dict[str, str] = {}
        start = 0
        while start < len(lines) and (lines[start].startswith("#") or not lines[start].strip()):
            line = lines[start].lstrip("#").strip()
            if ":" in line:
                k, v = line.split(":", 1)
                meta[k.strip()] = v.strip()
            start += 1
        reader = csv.reader(io.StringIO("\n".join(lines[start:])))
        header = next(reader, None)
        if header is None:
            raise EdgeoptError(f"The latency table {name} is empty; expected a header with columns "
                               f"{', '.join(REQUIRED_COLUMNS)}.")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise EdgeoptError(
                f"The latency table {name} lacks the column(s) {', '.join(missing)} (it has "
                f"{', '.join(header) or 'none'}). A table needs {', '.join(REQUIRED_COLUMNS)}; "
                "write one with `optimize profile`.")
        index = {h: i for i, h in enumerate(header)}
        found: dict[LayerKey, list[float]] = defaultdict(list)
        optional: dict[str, dict[LayerKey, float]] = {c: {} for c in OPTIONAL_COLUMNS}
        for line_no, fields in enumerate(reader, start=start + 2):
            if not fields or all(not f.strip() for f in fields):
                continue
            where = f"{name}, line {line_no}"
            if len(fields) != len(header):
                raise EdgeoptError(f"{where}: {len(fields)} fields where the header has {len(header)}; "
                                   "the file is truncated or corrupted.")
            get = lambda col: fields[index[col]].strip()  # noqa: E731
            try:
                ints = {col: int(get(col)) for col in _INT_COLUMNS}
            except ValueError:
                bad = next(c for c in _INT_COLUMNS if not get(c).lstrip("-").isdigit())
                raise EdgeoptError(f"{where}: {bad}={get(bad)!r} is not a whole number.") from None
            try:
                nm = parse_nm(get("nm"))
            except (ValueError, EdgeoptError) as exc:
                raise EdgeoptError(f"{where}: {exc}.") from None
            try:
                latency = float(get("latency_ms"))
            except ValueError:
                raise EdgeoptError(f"{where}: latency_ms={get('latency_ms')!r} is not a number.") from None
            if not math.isfinite(latency) or latency <= 0:
                raise EdgeoptError(f"{where}: latency_ms={get('latency_ms')} must be a positive number.")
            dynamic = get(DYNAMIC_COLUMN) if DYNAMIC_COLUMN in index else ""
            if dynamic not in ("", "0", "1"):
                raise EdgeoptError(f"{where}: {DYNAMIC_COLUMN}={dynamic!r} must be 1, 0 or empty.")
            activation, gate = ((get(col) if col in index else "") or None for col in (ACTIVATION_COLUMN, GATE_COLUMN))
            key = LayerKey(get("op_kind"), ints["in_channels"], ints["out_channels"],
                           (ints["kernel_h"], ints["kernel_w"]), (ints["stride_h"], ints["stride_w"]),
                           ints["groups"], (ints["input_h"], ints["input_w"]), ints["w_bits"],
                           ints["a_bits"], nm, dynamic == "1", activation, gate)
            problem = _check_key(key)
            if problem:
                raise EdgeoptError(f"{where}: {problem}.")
            found[key].append(latency)
            for col in OPTIONAL_COLUMNS:
                if col in index and get(col):
                    try:
                        optional[col][key] = float(get(col))
                    except ValueError:
                        raise EdgeoptError(f"{where}: {col}={get(col)!r} is not a number.") from None
        if not found:
            raise EdgeoptError(f"The latency table {name} has a header but no rows.")
        # Rows measured twice (two profiles concatenated) count once, at their median.
        rows = {key: statistics.median(v) for key, v in found.items()}
        return cls(rows=rows, meta=meta, spread=optional["spread_ms"], name=name)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_text(), encoding="utf-8")
        return path

    def to_text(self) -> str:
        out = io.StringIO()
        for k, v in self.meta.items():
            out.write(f"# {k}: {v}\n")
        extra = (["spread_ms"] if self.spread else []) + [
            column for column, attr in ((DYNAMIC_COLUMN, "dynamic"), (ACTIVATION_COLUMN, "activation"),
                                        (GATE_COLUMN, "gate"))
            if any(getattr(k, attr) for k in self.rows)]
        writer = csv.DictWriter(out, fieldnames=list(REQUIRED_COLUMNS) + extra, lineterminator="\n")
        writer.writeheader()
        for key in sorted(self.rows, key=_sort_key):
            row = key.row() | {"latency_ms": f"{self.rows[key]:.6g}"}
            if key in self.spread:
                row["spread_ms"] = f"{self.spread[key]:.3g}"
            writer.writerow(row)
        return out.getvalue()

    @classmethod
    def merge(cls, tables: Iterable[LatencyTable], *, name: str = "merged") -> LatencyTable:
        rows: dict[LayerKey, float] = {}
        meta: dict[str, str] = {}
        spread: dict[LayerKey, float] = {}
        for table in tables:
            rows |= table.rows
            meta |= table.meta
            spread |= table.spread
        return cls(rows=rows, meta=meta, spread=spread, name=name)


def _sort_key(key: LayerKey) -> tuple:
    return (key.kind, key.w_bits, key.a_bits, str(key.nm), key.dynamic, key.activation or "", key.gate or "",
            key.kernel, key.stride, key.input_hw, key.groups, key.in_channels, key.out_channels)


def _nnls(rows: list[tuple[tuple[float, ...], float]]) -> tuple[float, ...]:
    """Non-negative least squares in relative error: every term is a cost, never a credit."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.array([f for f, _ in rows], dtype=float)
    y = np.array([t for _, t in rows], dtype=float)
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls((a / scale) / y[:, None], np.ones(len(y)))
    return tuple(float(c) for c in coef / scale)


class _Fitted:
    """The table's roofline fit per (op class, precision), with fallbacks so that any shape of
    any precision the table has gets an estimate, anchored on the rows of the same family.
    Fits and anchors are made on first use (a search asks for a handful of groups)."""

    MIN_ROWS = 6

    def __init__(self, table: LatencyTable, channel_multiple: int) -> None:
        self.multiple = channel_multiple
        self.groups: dict[tuple, list[LayerKey]] = defaultdict(list)
        self.families: dict[tuple, list[LayerKey]] = defaultdict(list)
        self.rows = table.rows
        for key in table.rows:
            self.groups[(key.op_class,) + key.precision].append(key)
            self.groups[(_family_group(key.op_class),) + key.precision].append(key)
            self.groups[key.precision].append(key)
            self.families[key.family].append(key)
        self._fits: dict[tuple, _Fit | None] = {}
        self._anchors: dict[tuple, list[tuple[float, float]]] = {}

    def _fit(self, group_key: tuple) -> _Fit | None:
        if group_key not in self._fits:
            keys = self.groups.get(group_key, [])
            enough = len(keys) >= self.MIN_ROWS or (keys and len(group_key) == 3)
            self._fits[group_key] = (_Fit(_nnls([(k.features(self.multiple), self.rows[k]) for k in keys]), len(keys))
                                     if enough else None)
        return self._fits[group_key]

    def _raw(self, key: LayerKey) -> float | None:
        features = key.features(self.multiple)
        for group_key in ((key.op_class,) + key.precision, (_family_group(key.op_class),) + key.precision,
                          key.precision):
            fit = self._fit(group_key)
            if fit is not None:
                return fit.predict(features)
        return None

    def _anchors_of(self, family: tuple) -> list[tuple[float, float]]:
        """(log MACs, measured / fitted) for the table's rows of a family."""
        if family not in self._anchors:
            anchors = []
            for key in self.families.get(family, []):
                predicted = self._raw(key)
                if predicted is not None and predicted > 0:
                    anchors.append((math.log(max(key.macs, 1)), self.rows[key] / predicted))
            self._anchors[family] = anchors
        return self._anchors[family]

    def predict(self, key: LayerKey) -> float | None:
        """The fitted estimate for `key`, or None if the table has no row of its precision."""
        raw = self._raw(key)
        if raw is None:
            return None
        anchors = self._anchors_of(key.family)
        if anchors:
            x = math.log(max(key.macs, 1))
            nearest = sorted(anchors, key=lambda a: abs(a[0] - x))[:2]
            if abs(nearest[0][0] - x) < 1e-9:
                nearest = nearest[:1]  # a row with the same work: trust it alone
            raw *= math.exp(sum(math.log(max(r, 1e-9)) for _, r in nearest) / len(nearest))
        return max(raw, 1e-6)


def _family_group(op_class: str) -> str:
    """Coarser op classes for small tables: a linear layer is a 1x1 conv on one position."""
    return "depthwise" if op_class == "depthwise" else "dense"
