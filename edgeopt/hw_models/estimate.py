"""Estimated latency of a model on a target: per layer from a table, or from a fitted model.

`estimate_latency` is called once per search trial, so it traces the model once and does dict
lookups; the roofline fits are made once per table and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeopt.canonical import canonical
from edgeopt.errors import EdgeoptError
from edgeopt.hw_models.graph import TracedGraph, trace_graph
from edgeopt.hw_models.lut import LatencyTable, LayerKey
from edgeopt.hw_models.table_latency import TableLatency
from edgeopt.hw_models.targets import HardwareTarget, get_target
from edgeopt.layers import LayerSpec, trace_layers
from edgeopt.input_size import input_for

SOURCES = ("lut", "model", "measured")


@dataclass(frozen=True, kw_only=True)
class LayerLatency:
    fqn: str  # for an op between layers: the torch call and the module it ran in
    kind: str  # conv/depthwise/grouped/linear, or pool/elementwise/copy for an op between layers
    ms: float
    source: str  # "lut": read from the table; "model": from the fitted or analytic model
    runs: bool = True  # False: its result only reaches the output multiplied by zero (costs 0)


@dataclass(frozen=True, kw_only=True)
class LatencyEstimate:
    """A model's latency on one target. `source` is "lut" when every layer came from the table,
    "model" when any layer was estimated, "measured" for a whole-model measurement."""

    total_ms: float
    layers: tuple[LayerLatency, ...]
    source: str
    target: str
    overhead_ms: float = 0.0  # once per inference: runtime call, input/output
    spread_ms: float | None = None  # measured only: interquartile range
    ops: tuple[LayerLatency, ...] = ()  # pools, adds, unfused activations, copies (targets that price them)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise EdgeoptError(f"latency source must be one of {SOURCES}, got {self.source!r}.")

    def breakdown(self) -> dict[str, float]:
        """ms per layer, by module name."""
        return {layer.fqn: layer.ms for layer in self.layers}

    @property
    def ops_ms(self) -> float:
        """The part of `total_ms` spent between the layers."""
        return sum(op.ms for op in self.ops)


# -- table-based latency --------------------------------------------------------------------------
def calibrate_table(table: LatencyTable, samples: Sequence[tuple[Sequence[LayerSpec], float]], *,
                    target: HardwareTarget) -> LatencyTable:
    """Fit the table's `Calibration` on whole-model measurements made on the same device:
    `samples` holds (traced layers of a model, its measured ms) pairs. Returns a new table whose
    metadata carries the correction and how well it fits its samples."""
    import numpy as np
    from scipy.optimize import lsq_linear

    from edgeopt.hw_models.lut import Calibration, calibration_terms

    if len(samples) < 3:
        raise EdgeoptError("Calibration needs at least 3 whole-model measurements.")
    plain = LatencyTable(rows=dict(table.rows), meta={k: v for k, v in table.meta.items() if k != "calibration"},
                         spread=dict(table.spread), name=table.name)
    raw = TableLatency(plain)
    rows, targets = [], []
    for layers, measured in samples:
        keys = [LayerKey.from_spec(spec) for spec in layers]
        times = raw.layer_ms(keys, target)
        rows.append(np.sum(calibration_terms(keys, times.ms), axis=0))
        targets.append(measured - times.overhead_ms)
    a, y = np.array(rows), np.array(targets)
    # Relative least squares within physical bounds; a term no sample exercises stays neutral.
    neutral = (1.0, 1.0, 0.0, 0.0, 0.0)
    lower, upper = (0.5, 0.5, 0.0, -0.05, 0.0), (3.0, 3.0, 0.5, 0.2, 5.0)
    used = [j for j in range(a.shape[1]) if a[:, j].any()]
    fit = lsq_linear(a[:, used] / y[:, None], np.ones(len(y)),
                     bounds=([lower[j] for j in used], [upper[j] for j in used]))
    coef = list(neutral)
    for j, value in zip(used, fit.x):
        coef[j] = float(value)
    measured = np.array([ms for _, ms in samples])
    error = float(np.median(np.abs(a @ np.array(coef) - y) / measured * 100))
    calibration = Calibration(float_scale=coef[0], int_scale=coef[1], weight_ms_per_mb=coef[2],
                              layer_ms=coef[3], switch_ms_per_mb=coef[4], points=len(y), error_pct=error)
    return LatencyTable(rows=dict(table.rows), meta=plain.meta | {"calibration": calibration.to_text()},
                        spread=dict(table.spread), name=table.name)


# -- the entry points -------------------------------------------------------------------------------
def _resolve(target: str | HardwareTarget, lut: str | Path | LatencyTable | None) -> HardwareTarget:
    resolved = get_target(target)
    return resolved.with_lut(lut) if lut is not None else resolved


def estimate_layers(layers: Sequence[LayerSpec], *, target: str | HardwareTarget = "pi4",
                    lut: str | Path | LatencyTable | None = None) -> LatencyEstimate:
    """Latency of already traced layers (`edgeopt.layers.trace_layers`) on `target`: the layers
    alone (`estimate_latency` adds what runs between them where the target prices it)."""
    return _estimate(layers, _resolve(target, lut))


def _estimate(layers: Sequence[LayerSpec], target: HardwareTarget, graph: TracedGraph | None = None
              ) -> LatencyEstimate:
    keys = [LayerKey.from_spec(spec) for spec in layers]
    times = target.latency.layer_ms(keys, target)
    dead = graph.dead if graph is not None else frozenset()
    per_layer = tuple(LayerLatency(fqn=spec.fqn, kind=spec.kind, ms=0.0 if spec.fqn in dead else t, source=s,
                                   runs=spec.fqn not in dead)
                      for spec, t, s in zip(layers, times.ms, times.sources))
    ops: tuple[LayerLatency, ...] = ()
    if graph is not None:
        op_ms = target.latency.op_ms(graph.ops, target)
        if op_ms is not None:
            ops = tuple(LayerLatency(fqn=op.name, kind=op.kind, ms=t, source="model")
                        for op, t in zip(graph.ops, op_ms))
    total = sum(layer.ms for layer in per_layer) + sum(op.ms for op in ops) + times.overhead_ms
    source = "lut" if all(s == "lut" for s in times.sources) and not ops else "model"
    return LatencyEstimate(total_ms=total, layers=per_layer, source=source, target=target.name,
                           overhead_ms=times.overhead_ms, ops=ops)


def estimate_latency(model: nn.Module, example_input: torch.Tensor, *,
                     target: str | HardwareTarget = "pi4",
                     lut: str | Path | LatencyTable | None = None) -> LatencyEstimate:
    """Estimated latency of one inference of `model` (plain or made by `apply_plan`) on `target`:
    the total in ms, the per-layer breakdown, and where the numbers came from.

    Layers are looked up in the target's table (or `lut`, a CSV written by `optimize profile`);
    shapes the table lacks get the table's fitted roofline model, never an error. Bit widths and
    N:M patterns count only where the target's runtime accelerates them (`target.runs_as`).
    Where the target's latency model prices the ops between layers (`op_ms`: pi4), the model's
    dataflow is traced too (`edgeopt.hw_models.graph`): pools, adds, activations no layer
    absorbs and copies are added, and layers whose result is only ever multiplied by zero
    cost nothing. A model made to run at a smaller input size (a plan's input scale) is
    estimated at that size.
    """
    resolved = _resolve(target, lut)
    example_input = input_for(model, example_input[:1])
    model = canonical(model)
    if callable(getattr(resolved.latency, "op_ms", None)):
        graph = trace_graph(model, example_input[:1])
        return _estimate(graph.layers, resolved, graph)
    return _estimate(trace_layers(model, example_input[:1]), resolved)
