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


def test_the_cli_answers_help_and_option_errors_without_torch():
    # torch, torchvision and timm (through Torch-Pruning) took 8.5 s to import on the development
    # VM: `optimize --help` and a mistyped option waited that long for one line of argparse.
    code = ("import sys, edgeopt.cli; heavy = [m for m in ('torch', 'torchvision', 'timm', 'torch_pruning') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    from edgeopt.cli import _search_parser
    from edgeopt.search.finetune import FinetuneConfig

    # The parser's defaults are the library's: the CLI reads them from the selection rule's module.
    defaults = _search_parser().parse_args(["--budget", "1ms"])
    assert (defaults.max_drop, defaults.min_speedup) == (FinetuneConfig().max_drop, FinetuneConfig().min_speedup)


def test_listing_the_targets_needs_no_torch():
    # `optimize targets` built the shipped targets through modules that import torch (4-7 s on the
    # development VM); the targets, tables and the host profiler's timing need none of it.
    code = ("import sys\nfrom edgeopt.cli import main\nmain(['targets'])\n"
            "print('loaded:' + ','.join(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "loaded:"
    assert {line.split()[0] for line in lines[:-1]} >= {"pi4", "host", "jetson-orin-nano"}
    # The names that need torch still load on first use.
    import edgeopt.hw_models as hw_models

    assert callable(hw_models.estimate_latency) and hw_models.LatencyEstimate.__name__ == "LatencyEstimate"
