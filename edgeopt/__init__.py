"""edgeopt: make trained PyTorch models fit edge devices.

Every public name loads on first use, and heavy optional imports (onnxruntime, onnx, plotting)
happen inside the functions that need them, so `import edgeopt` stays fast and needs no torch.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning worker threads on a busy 2-core machine made training about
# 5x slower in our measurements; passive waiting costs nothing on an idle one. A user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Every public name, by the module that defines it. They load on first use (PEP 562), so that
# `import edgeopt` is fast and the device side (`edgeopt.Cascade`, which needs onnxruntime and
# numpy only) imports without torch.
_PUBLIC = {
    "EdgeoptError": "edgeopt.errors", "Cost": "edgeopt.evaluators.cost", "model_cost": "edgeopt.evaluators.cost",
    "measure_latency": "edgeopt.evaluators.latency", "export_onnx": "edgeopt.evaluators.onnx_export",
    "LatencyEstimate": "edgeopt.hw_models.estimate", "estimate_latency": "edgeopt.hw_models.estimate",
    "HardwareTarget": "edgeopt.hw_models.targets", "get_target": "edgeopt.hw_models.targets",
    "register_target": "edgeopt.hw_models.targets", "LayerSpec": "edgeopt.layers", "NM": "edgeopt.plan",
    "LayerPlan": "edgeopt.plan", "ModelPlan": "edgeopt.plan", "Surgery": "edgeopt.plan",
    "apply_plan": "edgeopt.spaces.apply",
    "PruneGroup": "edgeopt.spaces.prune", "Knobs": "edgeopt.spaces.space", "SearchSpace": "edgeopt.spaces.space",
    "optimize": "edgeopt.search.optimize", "OptimizeResult": "edgeopt.search.optimize",
    "SearchConfig": "edgeopt.search.optimize", "FinetuneConfig": "edgeopt.search.finetune",
    "Cascade": "edgeopt.deploy.cascade",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeopt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
