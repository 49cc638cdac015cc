"""The per-layer sensitivity proxy (issue 4, point 5): what it costs and how well it ranks.

Quality, on a trained model: random plans from pi4's search space (what NSGA-II's first
generation draws), each scored by the sensitivity table and by the default proxy (top-1 on the
whole proxy split after apply_plan's calibration): Spearman and Kendall rank correlation, and the
mean error of the estimated top-1.

Cost, per model: measuring the table once (number of single changes, seconds), and one trial in
each mode, medians over random plans: `heldout` = apply_plan with calibration + pi4 estimate +
costs + proxy evaluation; `sensitivity` = apply_plan without calibration + pi4 estimate + costs +
the table's sum. resnet18 and resnet50 have random weights: only their times mean anything.

    python bench/sensitivity_proxy.py --data /work/shared/data/cifar10   # the run in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from scipy.stats import kendalltau, spearmanr

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from edgeopt import SearchSpace, apply_plan, model_cost  # noqa: E402
from edgeopt.hw_models.estimate import estimate_latency  # noqa: E402
from edgeopt.hw_models.targets import get_target  # noqa: E402
from edgeopt.search.data import load_data  # noqa: E402
from edgeopt.search.models import resolve_model  # noqa: E402
from edgeopt.search.optimize import _calibration_batches, target_knobs  # noqa: E402
from edgeopt.search.sensitivity import changes, measure_sensitivity  # noqa: E402
from edgeopt.search.training import evaluate  # noqa: E402

TARGET = "pi4"


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def trial_seconds(model, space, example, calib, data, table, *, plans: int) -> dict:
    target = get_target(TARGET)
    round_to = target.accelerates.channel_multiple
    times = {"heldout": [], "sensitivity": []}
    for seed in range(plans):
        plan = space.sample(1000 + seed)
        start = time.perf_counter()
        compressed = apply_plan(model, plan, example, calib_data=calib, round_to=round_to, space=space)
        estimate_latency(compressed, example, target=target)
        model_cost(compressed, example)
        evaluate(compressed, data.proxy)
        times["heldout"].append(time.perf_counter() - start)
        start = time.perf_counter()
        structure = apply_plan(model, plan, example, round_to=round_to, space=space, calibrate_model=False)
        estimate_latency(structure, example, target=target)
        model_cost(structure, example)
        table.score(plan, space)
        times["sensitivity"].append(time.perf_counter() - start)
    return {f"{k}_trial_s": round(statistics.median(v), 3) for k, v in times.items()}


def study(name: str, model, data, *, plans: int, cost_plans: int, images: int, rank: bool) -> dict:
    example = data.example_input()
    target = get_target(TARGET)
    space = SearchSpace.from_model(model, example).restrict(target_knobs(target, size_matters=False))
    calib = _calibration_batches(data.train, batches=4, batch_size=32, seed=0)
    start = time.perf_counter()
    table = measure_sensitivity(model, space, example, calib=calib, dataset=data.proxy, images=images,
                                round_to=target.accelerates.channel_multiple, progress=True)
    row = {"model": name, "layers": len(space.layers), "prunable_groups": len(space.prunable_groups),
           "changes": len(list(changes(space))), "images": table.images,
           "measure_s": round(time.perf_counter() - start, 1)}
    row |= trial_seconds(model, space, example, calib, data, table, plans=cost_plans)
    if rank:
        scores, measured = [], []
        for seed in range(plans):
            plan = space.sample(seed)
            scores.append(table.score(plan, space))
            compressed = apply_plan(model, plan, example, calib_data=calib,
                                    round_to=target.accelerates.channel_multiple, space=space)
            measured.append(evaluate(compressed, data.proxy))
        row |= {"plans": plans, "spearman": round(float(spearmanr(scores, measured).statistic), 3),
                "kendall": round(float(kendalltau(scores, measured).statistic), 3),
                "mean_error_points": round(statistics.mean(s - m for s, m in zip(scores, measured)), 2),
                "median_abs_error_points": round(statistics.median(abs(s - m) for s, m in zip(scores, measured)), 2),
                "measured_top1_range": [round(min(measured), 1), round(max(measured), 1)]}
    log(json.dumps(row))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="ImageFolder directory (default: the embedded mnist data)")
    parser.add_argument("--base-epochs", type=float, default=40.0, help="as bench/compare.py trains its base model")
    parser.add_argument("--plans", type=int, default=40, help="random plans ranked")
    parser.add_argument("--cost-plans", type=int, default=5, help="random plans timed per mode")
    parser.add_argument("--images", type=int, default=512, help="proxy images the table is measured on")
    parser.add_argument("--archs", default="resnet18,resnet50", help="random-weight models timed too")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_data(args.data, seed=0)
    model, description = resolve_model(None, data=data, cache_dir=ROOT / "results" / "models",
                                       epochs=args.base_epochs, progress=True)
    rows = [study("edgenet (trained)", model.eval(), data, plans=args.plans, cost_plans=args.cost_plans,
                  images=args.images, rank=True)]
    for arch in filter(None, args.archs.split(",")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            random_model, _ = resolve_model(arch, data=data)
        rows.append(study(f"{arch} (random weights)", random_model.eval(), data, plans=0,
                          cost_plans=args.cost_plans, images=args.images, rank=False))
    print(f"base model: {description}\ndata: {data.description}\n")
    print("| model | layers | prune groups | single changes | table measured once (s) | "
          "trial, heldout (s) | trial, sensitivity (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['prunable_groups']} | {r['changes']} | {r['measure_s']} | "
              f"{r['heldout_trial_s']} | {r['sensitivity_trial_s']} |")
    ranked = rows[0]
    print(f"\nrank agreement with the heldout proxy over {ranked['plans']} random pi4 plans: Spearman "
          f"{ranked['spearman']}, Kendall {ranked['kendall']}; estimated minus measured top-1: mean "
          f"{ranked['mean_error_points']} points, median |error| {ranked['median_abs_error_points']}; "
          f"measured top-1 range {ranked['measured_top1_range']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
