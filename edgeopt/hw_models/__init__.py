"""Hardware targets and latency: lookup tables, the roofline fits, the device profiler.

Never imports `edgeopt.spaces` (data flows search -> spaces/evaluators/hw_models -> plan).
"""

from __future__ import annotations

from edgeopt.hw_models.estimate import (LatencyEstimate, LayerLatency, TableLatency, calibrate_table,
                                        estimate_latency, estimate_layers)
from edgeopt.hw_models.lut import Calibration, LatencyTable, LayerKey
from edgeopt.hw_models.targets import (Accelerates, HardwareTarget, get_target, list_targets,
                                       register_target, unregister_target)

__all__ = [
    "Accelerates", "Calibration", "HardwareTarget", "LatencyEstimate", "LatencyTable", "LayerKey",
    "LayerLatency", "TableLatency", "calibrate_table", "estimate_latency", "estimate_layers",
    "get_target", "list_targets", "register_target", "unregister_target",
]
