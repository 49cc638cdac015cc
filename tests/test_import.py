from __future__ import annotations

import subprocess
import sys


def test_import_edgeopt_does_not_load_heavy_optional_modules():
    code = ("import sys, edgeopt; heavy = [m for m in ('onnxruntime', 'matplotlib', 'plotly', 'onnx') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_names_are_exported():
    import edgeopt

    for name in ("SearchSpace", "apply_plan", "model_cost", "export_onnx", "ModelPlan", "LayerPlan", "NM"):
        assert hasattr(edgeopt, name), name
