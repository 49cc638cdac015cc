"""Latency from a lookup table: a CSV file, a table shipped with edgeopt, or a LatencyTable.

Needs no torch (the shipped targets are built from it when `optimize targets` lists them).
"""

from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path

from edgeopt.errors import EdgeoptError
from edgeopt.hw_models.lut import LatencyTable, LayerKey, storage_bits
from edgeopt.hw_models.targets import HardwareTarget, LayerTimes

_TABLE_CACHE: dict[tuple[str, float], LatencyTable] = {}
_LOCK = threading.Lock()


class TableLatency:
    """Latency from a lookup table (a file, a shipped resource, or a LatencyTable)."""

    def __init__(self, table: LatencyTable | str | Path, *, resource: str | None = None) -> None:
        self._table = table if isinstance(table, LatencyTable) else None
        self._path = None if isinstance(table, LatencyTable) else table
        self._resource = resource

    @classmethod
    def shipped(cls, filename: str) -> TableLatency:
        """A table shipped in edgeopt/hw_models/data/, read on first use."""
        return cls("", resource=filename)

    @staticmethod
    def load(path: str | Path) -> LatencyTable:
        """Read a CSV table once per file version (a search reads it every trial)."""
        path = Path(path)
        try:
            stamp = path.stat().st_mtime
        except OSError:
            raise EdgeoptError(f"No latency table at {path}. Make one with "
                               "`optimize profile --model MODEL --out table.csv`.") from None
        with _LOCK:
            key = (str(path.resolve()), stamp)
            if key not in _TABLE_CACHE:
                _TABLE_CACHE[key] = LatencyTable.from_csv(path)
            return _TABLE_CACHE[key]

    @property
    def table(self) -> LatencyTable:
        if self._table is None:
            if self._resource is not None:
                ref = resources.files("edgeopt.hw_models") / "data" / self._resource
                with resources.as_file(ref) as path:
                    self._table = LatencyTable.from_csv(path)
                self._table.name = f"shipped {self._resource}"
            else:
                self._table = self.load(self._path)
        return self._table

    def describe(self) -> str:
        origin = self.table.meta.get("origin", "origin not stated").split(":")[0]
        return f"lookup table, {origin} ({len(self.table)} rows, {self.table.name})"

    def layer_ms(self, keys: list[LayerKey], target: HardwareTarget) -> LayerTimes:
        table = self.table
        if not table.times_outputs:
            keys = [key.with_output(None, None) for key in keys]
        fitted = None
        ms: list[float] = []
        sources: list[str] = []
        for key in keys:
            exact = key.with_precision(storage_bits(key.w_bits), key.a_bits, key.nm, key.dynamic)
            runs = key.with_precision(*target.runs_as(key.w_bits, key.a_bits, key.nm, key.dynamic))
            value = table.lookup(exact)
            used = exact
            if value is None and runs != exact:
                value, used = table.lookup(runs), runs
            if value is not None:
                ms.append(value)
                sources.append("lut")
                continue
            fitted = fitted or table.fitted(target.channel_multiple)
            precisions = table.precisions
            used = exact if exact.precision in precisions else runs
            if used.precision not in precisions:
                # The table never measured this precision: estimate it as dense float, which
                # claims no speed-up that nothing measured.
                used = key.with_precision(32, 32, None)
                if used.precision not in precisions:
                    used = key.with_precision(*sorted(precisions, key=str)[0])
            substituted = table.lookup(used)  # the same shape at the precision we fell back to
            ms.append(substituted if substituted is not None else (fitted.predict(used) or 0.0))
            sources.append("model")
        calibration = table.calibration
        if calibration is not None:
            ms = calibration.apply(keys, ms)
        return LayerTimes(ms=ms, sources=sources, overhead_ms=table.overhead_ms)
