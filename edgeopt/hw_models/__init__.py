"""Hardware targets and latency: lookup tables, the roofline fits, the device profiler.

Never imports `edgeopt.spaces` (data flows search -> spaces/evaluators/hw_models -> plan).
The names of `estimate` trace models with torch, so they load on first use: listing or choosing
a target (`optimize targets`, `optimize --help`) needs no torch.
"""

from __future__ import annotations

import importlib

from edgeopt.hw_models.lut import Calibration, LatencyTable, LayerKey
from edgeopt.hw_models.table_latency import TableLatency
from edgeopt.hw_models.targets import (Accelerates, HardwareTarget, get_target, list_targets,
                                       register_target, unregister_target)

_FROM_ESTIMATE = ("LatencyEstimate", "LayerLatency", "calibrate_table", "estimate_latency", "estimate_layers")

__all__ = [
    "Accelerates", "Calibration", "HardwareTarget", "LatencyTable", "LayerKey", "TableLatency",
    "get_target", "list_targets", "register_target", "unregister_target", *_FROM_ESTIMATE,
]


def __getattr__(name: str):
    if name in _FROM_ESTIMATE:
        return getattr(importlib.import_module("edgeopt.hw_models.estimate"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
