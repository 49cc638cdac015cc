"""How long evaluating takes at each batch size on this CPU, and the size edgeopt picks.

The search scores every trial on the proxy split (2,000 images on the benchmark of
bench/prove.py), so evaluation is most of a trial's time. `edgeopt.search.training` sizes its
evaluation batches by the model's largest activation (`evaluation_batch_size`); this measures
what that choice costs against fixed sizes, on the edgenet (fp32 and its uniform int8 plan, the
proxy split) and on torchvision models at 224x224 and 64x64 (random weights and images).
Results: bench/results/eval_batch.json, with the machine's CPU flags.

    python bench/eval_batch.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from bench.prove import Run, parse_run_options  # noqa: E402
from bench.prove_base import commit, machine  # noqa: E402
from edgeopt.budget import parse_budget  # noqa: E402
from edgeopt.search.optimize import prepare  # noqa: E402
from edgeopt.search.training import evaluate, evaluation_batch_size  # noqa: E402

OUT = ROOT / "results" / "eval_batch.json"
SIZES = (256, 128, 64, 32, 16, 8, 4)


def seconds(model: torch.nn.Module, data, batch_size: int | None, repeats: int) -> float:
    """The fastest of `repeats` evaluations of all of `data`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate(model, data, batch_size=batch_size)
        best = min(best, time.perf_counter() - start)
    return round(best, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_run_options(parser, None, threads=2)  # torch's threads as prove.py's searches
    run = Run("edgenet", "host", args)
    with tempfile.TemporaryDirectory() as tmp:
        context, _ = prepare(run.model, run.data, target=run.target, budgets=(parse_budget("50%"),),
                             search=run.search, out_dir=Path(tmp), seed=0)
    int8 = context.compress(context.space.uniform(w_bits=8, a_bits=8, keep_ratio=1.0))
    cases = [("edgenet fp32, 32x32", run.model, run.data.proxy), ("edgenet uniform int8, 32x32", int8, run.data.proxy)]
    for name, size in (("mobilenet_v3_small", 224), ("resnet18", 224), ("mobilenet_v3_small", 64),
                       ("efficientnet_b0", 64)):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(256, 3, size, size, generator=generator), torch.randint(0, 10, (256,)))
        cases.append((f"{name}, {size}x{size}", torchvision.models.get_model(name, num_classes=10).eval(), data))
    results = {"machine": machine(), "commit": commit(), "torch_threads": torch.get_num_threads(),
               "command": "python bench/eval_batch.py", "cases": {}}
    for label, model, data in cases:
        picked = evaluation_batch_size(model.eval(), data[0][0], torch.device("cpu"))
        row = {"images": len(data), "picked": picked, "seconds_picked": seconds(model, data, None, args.repeats),
               "seconds_by_batch": {b: seconds(model, data, b, args.repeats) for b in SIZES}}
        row["fastest_fixed"] = min(row["seconds_by_batch"], key=row["seconds_by_batch"].get)
        results["cases"][label] = row
        print(label, json.dumps(row), flush=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
