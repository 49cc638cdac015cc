"""edgeopt: make trained PyTorch models fit edge devices.

Heavy optional imports (onnxruntime, onnx, plotting) happen inside the functions that need them,
so `import edgeopt` stays fast.
"""

from __future__ import annotations

from edgeopt.errors import EdgeoptError
from edgeopt.evaluators.cost import Cost, model_cost
from edgeopt.evaluators.onnx_export import export_onnx
from edgeopt.layers import LayerSpec
from edgeopt.plan import NM, LayerPlan, ModelPlan
from edgeopt.spaces.apply import apply_plan
from edgeopt.spaces.prune import PruneGroup
from edgeopt.spaces.space import Knobs, SearchSpace

__all__ = [
    "NM", "Cost", "EdgeoptError", "Knobs", "LayerPlan", "LayerSpec", "ModelPlan", "PruneGroup",
    "SearchSpace", "apply_plan", "export_onnx", "model_cost",
]
__version__ = "0.1.0"
