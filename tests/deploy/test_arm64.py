"""ARM64 agreement: models exported for `pi4` run through the bundle's run.py on onnxruntime's
aarch64 build, under qemu user-mode emulation of a Cortex-A72 (the Raspberry Pi 4's core), and
give the PyTorch model's top-1 on every input, and its scores to 1e-5 (relative to the largest
score) where every layer is an integer layer. Where integer layers read float layers' outputs,
a float kernel's last bit can put a value across a quantizer's rounding tie: such an input's
scores move by a step (rare, bounded below); fp32 agrees to float rounding (1e-4).

This is what the x86 tests cannot show: the Pi runs onnxruntime's ARM kernels (NEON, no SDOT),
with full-range int8 weights, where x86 without VNNI saturates on them. Emulation says nothing
about speed. The sysroot comes from tools/arm64-onnxruntime/setup (root and package registries,
about a minute); without it the test is skipped with that reason, and with
EDGEOPT_REQUIRE_ARM64=1 (set by .ci/run) it fails instead, so CI cannot pass it by skipping.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from edgeopt import NM, LayerPlan, ModelPlan, SearchSpace, apply_plan, export_onnx
from edgeopt.hw_models.targets import get_target
from edgeopt.plan import FLOAT_BITS
from edgeopt.search.models import EdgeNet
from tests.coverage import fit_head, integer_only
from tests.deploy.bundle import make_bundle, preprocessing, read_results, reference_inputs, write_images

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "arm64-onnxruntime"
SIZE = 32  # small inputs: every inference is emulated instruction by instruction
INPUTS = 16
CLASSES = 10
MODELS = {
    "edgenet": lambda: EdgeNet(3, CLASSES),  # the demo model's architecture, for RGB input
    "resnet18": lambda: torchvision.models.resnet18(num_classes=CLASSES),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=CLASSES),
}


def _arm64_python() -> list[str]:
    """The command that runs a Python script with onnxruntime's aarch64 build; fails or skips
    (EDGEOPT_REQUIRE_ARM64) with the reason where there is none."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return [sys.executable]  # an ARM64 machine runs the kernels natively
    root = Path(os.environ.get("ARM64_ROOT") or Path.home() / ".cache" / "arm64-onnxruntime")
    why = None
    if shutil.which("qemu-aarch64-static") is None:
        why = "qemu-aarch64-static is not installed"
    elif not (root / ".ready").exists() or not (root / "site" / "PIL").is_dir():
        why = f"no aarch64 sysroot with onnxruntime, numpy and Pillow at {root}"
    if why is None:
        return [str(TOOLS / "run")]
    message = (f"ARM64 onnxruntime under emulation is not set up here ({why}); run "
               f"tools/arm64-onnxruntime/setup as root (it needs the package registries, about a minute)")
    if os.environ.get("EDGEOPT_REQUIRE_ARM64") == "1":
        pytest.fail(message + ". EDGEOPT_REQUIRE_ARM64=1 makes this a failure.", pytrace=False)
    pytest.skip(message)


@torch.no_grad()
def settle_batchnorm(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    """BatchNorm statistics measured on `batches`, as training leaves them. With the initial ones
    (mean 0, variance 1) a random mobilenet_v2's activations shrink to 1e-9 by its last block, so
    every input gets the classifier's bias and no comparison of scores could fail."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches
    model.train()
    for batch in batches:
        model(batch)
    return model.eval()


def mixed_plan(space: SearchSpace) -> ModelPlan:
    """Pruning (keep 0.75, 0.5 or 1 by prune group), 2:4 on every third layer that takes it,
    every fourth layer float, w8a8 elsewhere: every quantized layer is an integer layer."""
    keep = {}
    for i, group in enumerate(space.prunable_groups):
        for fqn in group.layers:
            keep[fqn] = (0.75, 0.5, 1.0)[i % 3]
    layers = {}
    for i, layer in enumerate(space.layers):
        bits = {"w_bits": 32, "a_bits": 32} if i % 4 == 2 else {"w_bits": 8, "a_bits": 8}
        nm = NM(n=2, m=4) if i % 3 == 1 and NM(n=2, m=4) in space.nm_choices(layer) else None
        layers[layer.fqn] = LayerPlan(**bits, keep_ratio=keep.get(layer.fqn, 1.0), nm=nm)
    plan = ModelPlan(layers=layers)
    assert any(lp.nm for lp in layers.values()) and any(lp.keep_ratio < 1 for lp in layers.values())
    return plan


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(MODELS))
def test_pi4_exports_agree_with_pytorch_on_arm64_onnxruntime(arch, tmp_path, coverage_log):
    python = _arm64_python()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pi4 = get_target("pi4")
    prep = preprocessing(SIZE, classes=CLASSES)
    photos = write_images(tmp_path / "photos", INPUTS, size=(40, 34))  # run.py resizes and crops them
    x = reference_inputs(photos, prep)
    generator = torch.Generator().manual_seed(1)
    model = settle_batchnorm(MODELS[arch](), [torch.randn(32, 3, SIZE, SIZE, generator=generator) for _ in range(4)])
    # A random network's scores are near-tied, and any float rounding would flip them; a head
    # fitted to labels decides them as a trained model's are (tests/coverage.py).
    fit_head(model, torch.cat([x, torch.randn(96, 3, SIZE, SIZE, generator=generator)]), classes=CLASSES)
    calib = [x, torch.randn(16, 3, SIZE, SIZE, generator=generator)]
    example = x[:1]
    space = SearchSpace.from_model(model, example)
    plans = {"fp32": space.uniform(), "uniform int8": space.uniform(w_bits=8, a_bits=8),
             "mixed (pruned, 2:4, float layers)": mixed_plan(space)}
    runs = {}
    for name, plan in plans.items():
        # pi4 keeps full-range int8 weights (reduce_range=False): the A72's kernels take them.
        small = apply_plan(model, plan, example, calib_data=calib, round_to=pi4.channel_multiple, space=space)
        with torch.no_grad():
            ref = small(x).numpy()
        folder = tmp_path / name.split()[0]
        export_onnx(small, example, folder / "model.onnx", preprocessing=prep)
        run_py = make_bundle(folder, folder / "model.onnx", prep)
        # The plans' emulated runs go side by side: emulation is slow, and each is one thread.
        proc = subprocess.Popen([*python, str(run_py), str(tmp_path / "photos"), "--threads", "1", "--warmup", "1",
                                 "--runs", "1", "--json", str(folder / "arm64.json")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # From the plan: layers it leaves untouched are not among the model's compressed layers.
        quantized = [lp.w_bits not in FLOAT_BITS and lp.a_bits == 8 for lp in plan.layers.values()]
        kind = ("integer" if all(quantized) and integer_only(small) else
                "mixed" if any(quantized) and integer_only(small) else "float" if not any(quantized) else "other")
        runs[name] = (proc, time.perf_counter(), folder, ref, kind)
    failures = []
    for name, (proc, started, folder, ref, kind) in runs.items():
        _, err = proc.communicate(timeout=600)
        seconds = time.perf_counter() - started
        assert proc.returncode == 0, f"{arch} {name}: run.py on ARM64 failed: {err[-2000:]}"
        scores, top1 = read_results(folder / "arm64.json")
        flips = int((np.array(top1) != ref.argmax(1)).sum())
        per_input = np.abs(scores - ref).max(1)
        diff, scale = float(per_input.max()), float(np.abs(ref).max())
        off = int((per_input > 1e-5 * scale).sum())
        spread = float(ref.std(0).mean())  # how much the scores vary between inputs
        if kind == "integer":
            # Every layer an integer layer: onnxruntime's ARM kernels compute the same integers,
            # and only the float rounding of the last dequantization can differ.
            rule, ok = "integer layers only: within 1e-5 on every input", off == 0
        elif kind == "mixed":
            # Integer layers read float layers' outputs: where two float kernels' last bits put a
            # value on the other side of the next quantizer's rounding tie, that input's scores
            # move by a quantization step (README, "The compression API"); every other input is
            # exact. At most one input in eight may, by at most 5% of the largest score.
            rule = "integer and float layers: within 1e-5 but for rounding ties"
            ok = off <= INPUTS // 8 and diff <= 0.05 * scale
        elif kind == "float":
            rule, ok = "float: within 1e-4, two float kernels' rounding", diff <= 1e-4 * scale
        else:
            rule, ok = "non-integer quantized layers: top-1 only", True
        coverage_log.append(
            f"ARM64 {arch} {name}: top-1 agrees on {INPUTS - flips}/{INPUTS}; largest score difference {diff:.3g}, "
            f"{off} input(s) beyond 1e-5 of the scores' scale {scale:.3g} ({rule}); spread across inputs "
            f"{spread:.3g}; run.py {seconds:.1f} s emulated")
        # Scores that barely vary with the input (vanished activations) would make agreement trivial.
        assert spread > 0.05 * scale, coverage_log[-1]
        if flips or not ok:
            failures.append(coverage_log[-1])
    assert not failures, failures
