"""Per-layer accounting of the selected model against the base: what each layer's compression
saved in MACs, bytes and time, and, where it did not pay on the target's clock, why.

Users of every compression tool ask why a compressed model is "not faster" and get no answer
layer by layer. Here each layer gets its knobs, MACs and bytes before and after, the target's
estimated time before and after, and the time onnxruntime's profiler measures on this machine
(`edgeopt.evaluators.node_profile`: quantizers and layout changes charged to the layer they
serve). A layer whose compression did not save time on the target's clock (measured on host,
estimated elsewhere) is flagged with the reason its figures show.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edgeopt.evaluators.cost import layer_bytes
from edgeopt.evaluators.node_profile import NodeProfile
from edgeopt.hw_models.estimate import LatencyEstimate
from edgeopt.layers import LayerSpec
from edgeopt.plan import FLOAT_BITS, ModelPlan
from edgeopt.spaces.depth import inside

LAYERS_FILE = "layers.csv"
# A saving under this share of the base layer's time is within what one profile moves by.
PAYS_SHARE = 0.05
UNSHOWN = "not shown faster here"


@dataclass(frozen=True, kw_only=True)
class LayerRow:
    layer: str
    kind: str
    knobs: str  # what the plan did to it: "w8a8, keep 0.75, 2:4", "dropped", "unchanged"
    base_macs: int
    macs: int
    base_bytes: int
    bytes: int
    base_estimated_ms: float
    estimated_ms: float
    base_measured_ms: float | None  # onnxruntime's profiler on this machine, kernel + serving nodes
    measured_ms: float | None
    serving_ms: float | None  # of measured_ms: quantizers and layout changes around the layer
    flag: str  # why the compression did not pay on the target's clock; "" where it did or none was made

    @property
    def saved_ms(self) -> float | None:
        if self.base_measured_ms is None or self.measured_ms is None:
            return None
        return self.base_measured_ms - self.measured_ms


def knobs_text(plan: ModelPlan, fqn: str, dropped: bool, inputs_pruned: bool = False) -> str:
    if dropped:
        return ("dropped (its block left as the shortcut)" if inside(fqn, plan.dropped)
                else "removed with its squeeze-excite gate (surgery)")
    lp = plan.layers.get(fqn)
    parts = []
    block = next((name for name in plan.surgery if inside(fqn, {name})), None)
    if block is not None:
        parts.append(f"in a block with surgery ({plan.surgery[block].describe()})")
    if lp is not None and lp.dynamic:
        parts.append(f"w{lp.w_bits} dynamic-range")
    elif lp is not None and (lp.w_bits, lp.a_bits) != (32, 32):
        parts.append(f"w{lp.w_bits}a{lp.a_bits}")
    if lp is not None and lp.keep_ratio < 1:
        parts.append(f"keep {lp.keep_ratio:g}")
    if lp is not None and lp.nm is not None:
        parts.append(f"{lp.nm.n}:{lp.nm.m}")
    if lp is not None and lp.sparsity:
        parts.append(f"sparsity {lp.sparsity:g}")
    if plan.input_scale < 1:
        parts.append(f"input x{plan.input_scale:g}")
    if inputs_pruned and not (lp is not None and lp.keep_ratio < 1):
        parts.append("inputs pruned with the layer before")
    return ", ".join(parts) or "unchanged"


def stored_bytes(spec: LayerSpec) -> int:
    """A float layer's weight and bias (its BatchNorm folded in, as the exported model has it)."""
    return 4 * spec.out_channels * (spec.reduction + 1)


def why_not_paid(*, plan: ModelPlan, fqn: str, spec: LayerSpec, base_ms: float, ms: float,
                 kernel_ms: float | None, base_kernel_ms: float | None, serving_ms: float | None,
                 measured: bool, target: str, simd: int, noise_ms: float = 0.0) -> str:
    """The reason a compressed layer's time on the target's clock did not drop (by more than
    PAYS_SHARE of its base time and more than `noise_ms`, how far the two measurements move
    between sessions), or "" where it did or nothing was compressed."""
    lp = plan.layers.get(fqn)
    if lp is None or lp.is_identity:
        return ""
    if base_ms - ms > max(PAYS_SHARE * base_ms, noise_ms):
        return ""
    where = "here" if measured else f"on {target} (estimated)"
    if measured and noise_ms > 0 and ms - base_ms <= noise_ms:
        # Neither faster nor slower beyond what the measurement moves by between sessions.
        return f"{UNSHOWN} (within the measurement's spread, {noise_ms:.3f} ms)"
    quantized = lp.w_bits not in FLOAT_BITS or lp.a_bits not in FLOAT_BITS
    if quantized and measured and kernel_ms is not None and base_kernel_ms is not None:
        if kernel_ms >= base_kernel_ms * (1 - PAYS_SHARE):
            return f"int8 kernel no faster than fp32 {where} ({kernel_ms:.3f} vs {base_kernel_ms:.3f} ms)"
        if serving_ms:
            return (f"float island: the quantizers and layout changes around it ({serving_ms:.3f} ms) cost "
                    f"what int8 saved ({base_kernel_ms - kernel_ms:.3f} ms)")
    if quantized and not measured:
        return f"int8 no faster than fp32 {where}"
    if lp.keep_ratio < 1 and simd > 1 and spec.out_channels % simd:
        return f"channels ({spec.out_channels}) not a multiple of the SIMD width ({simd})"
    if lp.nm is not None:
        return f"{lp.nm.n}:{lp.nm.m} sparsity not run faster {where}"
    if lp.sparsity:
        return f"unstructured sparsity not run faster {where} (it saves stored bytes only)"
    return f"no faster {where} ({ms:.3f} vs {base_ms:.3f} ms)"


def account_layers(*, plan: ModelPlan, base_layers: list[LayerSpec], layers: list[LayerSpec], modules: dict,
                   base_estimate: LatencyEstimate, estimate: LatencyEstimate, base_profile: NodeProfile | None,
                   profile: NodeProfile | None, measured_clock: bool, target: str, simd: int) -> list[LayerRow]:
    """One row per layer of the base model. `modules` maps the selected model's compressed layers
    to their modules (for their stored bytes); `measured_clock` says whether the target's clock
    is this machine's (host), so flags read the profile rather than the estimate."""
    now = {spec.fqn: spec for spec in layers}
    base_est, est = base_estimate.breakdown(), estimate.breakdown()
    rows = []
    for spec in base_layers:
        fqn = spec.fqn
        kept = now.get(fqn)
        dropped = kept is None
        base_time = base_profile.layers.get(fqn) if base_profile else None
        time = profile.layers.get(fqn) if profile and not dropped else None
        base_measured = base_time.ms if base_time else None
        measured = 0.0 if dropped and profile else (time.ms if time else None)
        if measured_clock and base_measured is not None and measured is not None:
            clock_base, clock_now = base_measured, measured
        else:
            clock_base, clock_now = base_est.get(fqn, 0.0), est.get(fqn, 0.0)
        module = modules.get(fqn)
        flag = "" if dropped else why_not_paid(
            plan=plan, fqn=fqn, spec=kept, base_ms=clock_base, ms=clock_now,
            kernel_ms=time.kernel_ms if time else None, base_kernel_ms=base_time.kernel_ms if base_time else None,
            serving_ms=time.serving_ms if time else None, measured=measured_clock and time is not None,
            target=target, simd=simd,
            noise_ms=(base_time.spread_ms + time.spread_ms) if measured_clock and base_time and time else 0.0)
        rows.append(LayerRow(
            layer=fqn, kind=spec.kind,
            knobs=knobs_text(plan, fqn, dropped, inputs_pruned=not dropped and kept.in_channels < spec.in_channels),
            base_macs=spec.macs, macs=0 if dropped else kept.macs,
            base_bytes=stored_bytes(spec), bytes=0 if dropped else (layer_bytes(module) if module is not None
                                                                     else stored_bytes(kept)),
            base_estimated_ms=base_est.get(fqn, 0.0), estimated_ms=0.0 if dropped else est.get(fqn, 0.0),
            base_measured_ms=base_measured, measured_ms=measured,
            serving_ms=None if time is None else time.serving_ms, flag=flag))
    return rows


def write_layers_csv(rows: list[LayerRow], path: Path) -> None:
    names = [f.name for f in fields(LayerRow)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names + ["saved_ms"])
        writer.writeheader()
        for row in rows:
            values = asdict(row)
            for key, value in values.items():
                if isinstance(value, float):
                    values[key] = round(value, 5)
            saved = row.saved_ms
            writer.writerow(values | {"saved_ms": None if saved is None else round(saved, 5)})


def report_lines(rows: list[LayerRow], *, target: str, measured_clock: bool, between: tuple[float, float] | None,
                 overhead_ms: float | None = None, top: int = 12) -> list[str]:
    """report.md's section: the layers that saved most and every flagged one."""
    if not rows:
        return []
    clock = "measured here (onnxruntime's profiler)" if measured_clock else f"estimated for {target}"
    lines = ["## Per layer: what paid", "",
             f"Each layer of the base model against the selected model ({LAYERS_FILE} holds every layer). "
             f"Time is on the target's clock, {clock}; the measured columns are onnxruntime's profiler on this "
             "machine, quantizers and layout changes charged to the layer they serve.", "",
             "| layer | knobs | MACs saved | bytes saved | est. ms (base -> now) | measured ms (base -> now) | "
             "did not pay because |", "|---|---|---|---|---|---|---|"]

    def saved_key(row: LayerRow) -> float:
        if measured_clock and row.saved_ms is not None:
            return row.saved_ms
        return row.base_estimated_ms - row.estimated_ms

    shown = sorted(rows, key=saved_key, reverse=True)[:top]
    shown += [r for r in rows if r.flag and r not in shown]
    for r in shown:
        measured = ("n/a" if r.base_measured_ms is None or r.measured_ms is None
                    else f"{r.base_measured_ms:.3f} -> {r.measured_ms:.3f}")
        lines.append(f"| {r.layer} | {r.knobs} | {r.base_macs - r.macs:,} | {r.base_bytes - r.bytes:,} "
                     f"| {r.base_estimated_ms:.3f} -> {r.estimated_ms:.3f} | {measured} | {r.flag} |")
    compressed = sum(1 for r in rows if r.knobs != "unchanged")
    unshown = sum(1 for r in rows if r.flag.startswith(UNSHOWN))
    flagged = sum(1 for r in rows if r.flag) - unshown
    lines += ["", f"{flagged} of {compressed} compressed layers did not pay on the target's clock"
              + (f"; for {unshown} more the measurement cannot tell (their saving is within how much the "
                 "profile moves between sessions)" if unshown else "") + "."
              if flagged or unshown else "Every compressed layer saved time on the target's clock."]
    if between is not None:
        lines.append(f"Between the layers (adds, pools, activations no layer absorbs), measured here: "
                     f"{between[0]:.3f} ms in the base, {between[1]:.3f} ms in the selected model.")
    if overhead_ms:
        lines.append(f"The profiler's own cost, {overhead_ms * 1000:.1f} us per node here, is taken out of every "
                     "node's time: a layer faster than that reads 0.")
    return lines + [""]
