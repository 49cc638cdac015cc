"""What integer residual sums buy and cost (issue 18, host): speed, accuracy, agreement.

For each base model of the "Prove the search" benchmark (ResNet-20 and the edgenet, trained on
full CIFAR-10), the uniform int8 plan at keep 1 and keep 0.625 is built twice from the same
calibration batches: with integer residual sums (`edgeopt.spaces.residual`, what `apply_plan`
does) and without them (the float residual stream of the exports before; `apply_plan`'s
installer is switched off for that build only). Not fine-tuned: the comparison is of the
numerics alone. Reported per build:

- validation top-1 on the 5,000 validation images, and McNemar's test between the two builds;
- the ops onnxruntime runs (after its fusions) and whether its scores equal the PyTorch model's
  on 500 validation images (largest absolute difference, top-1 agreement);
- the paired time ratio on this CPU (`paired_latency.paired_ratio`, one thread, warm turns)
  of the integer-sum export to the float-sum one.

    python bench/integer_sums.py [--runs 3000]

Results: bench/results/integer_sums.json (with the CPU's flags).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from bench.paired_latency import paired_ratio  # noqa: E402
from bench.prove import mcnemar  # noqa: E402
from bench.prove_base import DEFAULT_CACHE, cifar_data, commit, load_base, machine  # noqa: E402
from edgeopt import SearchSpace, apply_plan, export_onnx  # noqa: E402
from edgeopt.evaluators.cpu import int8_needs_reduce_range  # noqa: E402
from edgeopt.search.optimize import _calibration_batches  # noqa: E402
from edgeopt.search.training import predict  # noqa: E402
from edgeopt.spaces.residual import sum_quantizers  # noqa: E402

OUT = ROOT / "results" / "integer_sums.json"


def runtime_ops(path: Path, folder: Path) -> dict[str, int]:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "opt.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(n.op_type for n in onnx.load(str(folder / "opt.onnx")).graph.node))


def agreement(model: torch.nn.Module, path: Path, images: torch.Tensor) -> dict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(images).numpy()
    got = np.concatenate([session.run(None, {"input": images[i:i + 50].numpy()})[0] for i in range(0, len(images), 50)])
    return {"images": len(images), "largest_difference": float(np.abs(got - ref).max()),
            "top1_agree": int((got.argmax(1) == ref.argmax(1)).sum())}


def build(base: torch.nn.Module, space: SearchSpace, example, calib, keep: float, *, integer_sums: bool):
    plan = space.uniform(w_bits=8, a_bits=8, keep_ratio=keep)
    if integer_sums:
        return apply_plan(base, plan, example, calib_data=calib, space=space, reduce_range=int8_needs_reduce_range())
    with mock.patch("edgeopt.spaces.apply.install_integer_sums", return_value=0):
        return apply_plan(base, plan, example, calib_data=calib, space=space, reduce_range=int8_needs_reduce_range())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3000, help="paired timing runs per comparison")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = cifar_data(args.cache)
    example = data.example_input()
    calib = _calibration_batches(data.train, batches=4, batch_size=32, seed=0)  # optimize's, at seed 0
    labels = data.val.tensors[1]
    results = {"command": "python bench/integer_sums.py " + " ".join(argv or sys.argv[1:]),
               "commit": commit(), "machine": machine(), "reduce_range": int8_needs_reduce_range(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ("resnet20", "edgenet"):
            base = load_base(name)
            space = SearchSpace.from_model(base, example)
            for keep in (1.0, 0.625):
                row = {"model": name, "keep": keep}
                paths = {}
                for integer in (False, True):
                    kind = "integer_sums" if integer else "float_sums"
                    model = build(base, space, example, calib, keep, integer_sums=integer)
                    predicted, _ = predict(model, data.val)
                    path = export_onnx(model, example, folder / f"{name}-{keep}-{kind}.onnx")
                    paths[kind] = path
                    row[kind] = {"accuracy": round(100 * float((predicted == labels).double().mean()), 2),
                                 "correct": "".join("1" if c else "0" for c in (predicted == labels).tolist()),
                                 "sums": len(sum_quantizers(model)), "ops": runtime_ops(path, folder),
                                 "agreement": agreement(model, path, data.val.tensors[0][:500])}
                row["paired_test"] = mcnemar(row["integer_sums"]["correct"], row["float_sums"]["correct"])
                row["time_ratio"] = paired_ratio(paths["float_sums"], paths["integer_sums"], runs=args.runs, turn=2)
                for kind in ("integer_sums", "float_sums"):
                    del row[kind]["correct"]
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
