"""edgeopt: make trained PyTorch models fit edge devices.

Heavy optional imports (onnxruntime, onnx, plotting) happen inside the functions that need them,
so `import edgeopt` stays fast.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: spinning worker threads on a busy 2-core machine made training about
# 5x slower in our measurements; passive waiting costs nothing on an idle one. A user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from edgeopt.errors import EdgeoptError  # noqa: E402
from edgeopt.evaluators.cost import Cost, model_cost  # noqa: E402
from edgeopt.evaluators.latency import measure_latency  # noqa: E402
from edgeopt.evaluators.onnx_export import export_onnx  # noqa: E402
from edgeopt.hw_models.estimate import LatencyEstimate, estimate_latency  # noqa: E402
from edgeopt.hw_models.targets import HardwareTarget, get_target, register_target  # noqa: E402
from edgeopt.layers import LayerSpec  # noqa: E402
from edgeopt.plan import NM, LayerPlan, ModelPlan  # noqa: E402
from edgeopt.spaces.apply import apply_plan  # noqa: E402
from edgeopt.spaces.prune import PruneGroup  # noqa: E402
from edgeopt.spaces.space import Knobs, SearchSpace  # noqa: E402

__all__ = [
    "NM", "Cost", "EdgeoptError", "Knobs", "LayerPlan", "LayerSpec", "ModelPlan", "PruneGroup",
    "SearchSpace", "apply_plan", "export_onnx", "model_cost",
    "HardwareTarget", "LatencyEstimate", "estimate_latency", "get_target", "measure_latency",
    "register_target",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The search pulls in Optuna and pandas; load it on first use so `import edgeopt` stays fast.
    if name in ("optimize", "OptimizeResult", "SearchConfig", "FinetuneConfig"):
        from edgeopt.search import finetune, optimize

        return getattr(finetune if name == "FinetuneConfig" else optimize, name)
    raise AttributeError(f"module 'edgeopt' has no attribute {name!r}")
