"""Where does dynamic-range int8 pay on this CPU? (the host target's `dynamic_kinds`)

Part 1, per layer kind: each shape timed by the host profiler (`edgeopt.hw_models.profiler`,
the graphs `optimize profile` and the on-demand host table time: fp32, static int8 as
QLinearConv/QLinearMatMul, and dynamic-range int8 as DynamicQuantizeLinear -> ConvInteger /
MatMulInteger -> Cast -> Mul -> Add, which onnxruntime fuses for MatMul), 3 interleaved passes,
the lowest pass median kept. Shapes: a transformer's Linear layers on 197 and 50 tokens, classifier
heads on one vector, dense 3x3 and 1x1 convolutions and depthwise 3x3 ones at CNN sizes.

Part 2, whole models: a Linear-heavy model in fp32 against the same model with every Linear layer
dynamic-range int8 (the rest fp32), exported by `export_onnx` and timed in alternating runs
(`paired_latency.paired_ratio`, one onnxruntime thread): timm deit_tiny at 224x224 and a small ViT
of our own at 32x32, random weights (speed does not depend on the values). Also checks that the
exported model's top-1 equals the PyTorch dynamic model's on 16 random images, one at a time.

    python bench/dynamic_range.py [--runs 300] [--out bench/results/dynamic_range.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from paired_latency import paired_ratio  # noqa: E402

from bench.compare import _cpu_name  # noqa: E402
from bench.prove_base import commit, machine  # noqa: E402

from edgeopt import LayerPlan, ModelPlan, SearchSpace, apply_plan  # noqa: E402
from edgeopt.evaluators.cpu import int8_needs_reduce_range  # noqa: E402
from edgeopt.evaluators.onnx_export import export_onnx  # noqa: E402
from edgeopt.hw_models.lut import LayerKey  # noqa: E402
from edgeopt.hw_models.profiler import profile_keys  # noqa: E402

# (label, kind, in, out, kernel, stride, groups, input hw): hw is (tokens, 1) for a linear layer.
SHAPES = [
    ("vit qkv 197 tokens", "linear", 192, 576, 1, 1, 1, (197, 1)),
    ("vit mlp fc1 197 tokens", "linear", 192, 768, 1, 1, 1, (197, 1)),
    ("vit mlp fc2 197 tokens", "linear", 768, 192, 1, 1, 1, (197, 1)),
    ("vit mlp fc1 50 tokens", "linear", 384, 1536, 1, 1, 1, (50, 1)),
    ("head 1280->1000", "linear", 1280, 1000, 1, 1, 1, (1, 1)),
    ("head 512->10", "linear", 512, 10, 1, 1, 1, (1, 1)),
    ("conv 3x3 64->64 56x56", "conv", 64, 64, 3, 1, 1, (56, 56)),
    ("conv 3x3 128->128 28x28", "conv", 128, 128, 3, 1, 1, (28, 28)),
    ("conv 1x1 96->576 14x14", "conv", 96, 576, 1, 1, 1, (14, 14)),
    ("conv 1x1 64->128 16x16", "conv", 64, 128, 1, 1, 1, (16, 16)),
    ("depthwise 3x3 144 28x28", "depthwise", 144, 144, 3, 1, 144, (28, 28)),
    ("depthwise 3x3 576 14x14", "depthwise", 576, 576, 3, 1, 576, (14, 14)),
]
PRECISIONS = {"fp32": (32, 32, False), "static int8": (8, 8, False), "dynamic int8": (8, 32, True)}


def machine_record() -> dict:
    """The CPU (flags: VNNI or not), whether int8 needs reduce_range here, and the commit."""
    return machine() | {"cpu": _cpu_name(), "reduce_range": int8_needs_reduce_range(), "commit": commit()}


def per_kind() -> list[dict]:
    keys = {}
    for label, kind, cin, cout, k, s, g, hw in SHAPES:
        for name, (w, a, dyn) in PRECISIONS.items():
            keys[(label, name)] = LayerKey(kind, cin, cout, (k, k), (s, s), g, hw, w, a, None, dyn)
    table = profile_keys(list(keys.values()), threads=1, repeats=30, passes=3)
    rows = []
    for label, kind, *_ in SHAPES:
        ms = {name: table.rows[keys[(label, name)]] for name in PRECISIONS}
        rows.append({"layer": label, "kind": kind, **{f"{n}_ms": round(v, 4) for n, v in ms.items()},
                     "dynamic_over_fp32": round(ms["dynamic int8"] / ms["fp32"], 3),
                     "static_over_fp32": round(ms["static int8"] / ms["fp32"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


class TinyViT(torch.nn.Module):
    """A small ViT of our own: 4x4 patches of a 32x32 image, 6 blocks of width 192."""

    def __init__(self, classes: int = 10, width: int = 192, depth: int = 6) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, width, 4, stride=4)
        self.position = torch.nn.Parameter(torch.randn(1, 64, width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(width, 3, 4 * width, dropout=0.0, batch_first=True,
                                                 norm_first=True, activation="gelu")
        self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def whole_models(runs: int, tmp: Path) -> list[dict]:
    import timm

    out = []
    for name, build, size in (("timm deit_tiny_patch16_224", lambda: timm.create_model(
            "deit_tiny_patch16_224", pretrained=False, num_classes=10), 224),
                              ("TinyViT (6 blocks, width 192)", TinyViT, 32)):
        started = time.time()
        torch.manual_seed(0)
        model = build().eval()
        example = torch.randn(1, 3, size, size)
        space = SearchSpace.from_model(model, example)
        linear = [layer.fqn for layer in space.layers if layer.kind == "linear"]
        plan = ModelPlan(layers={fqn: LayerPlan(w_bits=8, dynamic=True) for fqn in linear})
        dynamic = apply_plan(model, plan, example, space=space, reduce_range=int8_needs_reduce_range())
        fp32_path, dyn_path = tmp / "fp32.onnx", tmp / "dynamic.onnx"
        export_onnx(model, example, fp32_path)
        export_onnx(dynamic, example, dyn_path)
        import onnxruntime as ort
        session = ort.InferenceSession(str(dyn_path), providers=["CPUExecutionProvider"])
        images = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = dynamic(images).argmax(1).numpy()
        theirs = np.array([session.run(None, {"input": images[i:i + 1].numpy()})[0].argmax() for i in range(16)])
        pair = paired_ratio(fp32_path, dyn_path, runs=runs)
        linear_macs = sum(layer.macs for layer in space.layers if layer.kind == "linear")
        out.append({"model": name, "input": size, "linear_layers": len(linear),
                    "linear_share_of_macs": round(linear_macs / sum(layer.macs for layer in space.layers), 3),
                    "fp32_ms": pair["a_ms"], "dynamic_ms": pair["b_ms"], "speedup": round(1 / pair["ratio"], 3),
                    "time_ratio": pair["ratio"], "interquartile": pair["interquartile"], "runs": runs,
                    "top1_agrees": f"{int((ours == theirs).sum())}/16", "seconds": round(time.time() - started)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="alternating runs per whole-model pair")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "dynamic_range.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"machine": machine_record(), "command": " ".join(["python bench/dynamic_range.py", *sys.argv[1:]])}
    print(json.dumps(result), flush=True)
    result["per_kind"] = per_kind()
    with tempfile.TemporaryDirectory() as tmp:
        result["whole_models"] = whole_models(args.runs, Path(tmp))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
