"""Which sampler settings beat random search (issue 5): search-only runs of the comparison's
setting (cifar10 subset, edgenet base, 40% budget, pi4, 60 trials) at several seeds, and the
hypervolume of each run's within-budget trials, as `bench/compare.py --hv-seeds` computes it.

    python bench/sampler_hypervolume.py --variants nsga2,tpe,gp,random --seeds 0,1,2,3,4,5

A variant is `random`, `tpe` (edgeopt's TPE settings), `nsga2` (edgeopt's default population),
`nsga2-popN` (NSGA-II with population N) or `gp` (Optuna's GPSampler with the budget as its
constraint). The base model is compare.py's (edgenet of `--width`, `--base-epochs`, cached in
bench/results/models), so seed 0 is the full comparison run's search.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import compare  # noqa: E402

from edgeopt.search import study as study_module  # noqa: E402
from edgeopt.hw_models.estimate import estimate_latency  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/cifar10")
    parser.add_argument("--variants", default="nsga2,random")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--budget", default="40%")
    parser.add_argument("--base-epochs", type=float, default=30.0)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    data, model = compare.side_setup(args.data, threads=args.threads, base_epochs=args.base_epochs,
                                     width=args.width)
    base_ms = estimate_latency(model, data.example_input(), target=compare.TARGET).total_ms
    reference = (round(100.0 / data.num_classes, 2), round(base_ms, 4))
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    default_nsga2 = study_module.SAMPLERS["nsga2"]
    for variant in args.variants.split(","):
        sampler = variant
        study_module.SAMPLERS["nsga2"] = default_nsga2
        if variant.startswith("nsga2-pop"):
            population = int(variant.removeprefix("nsga2-pop"))
            study_module.SAMPLERS["nsga2"] = lambda seed, trials, p=population: optuna.samplers.NSGAIISampler(
                population_size=p, seed=seed, constraints_func=study_module.constraints_of)
            sampler = "nsga2"
        elif variant == "gp":
            study_module.SAMPLERS["nsga2"] = lambda seed, trials: optuna.samplers.GPSampler(
                seed=seed, constraints_func=study_module.constraints_of, deterministic_objective=True)
            sampler = "nsga2"
        run_args = types.SimpleNamespace(work=Path("/tmp/edgeopt-sampler-hv") / variant, budget=args.budget,
                                         trials=args.trials)
        results[variant] = compare.search_hypervolumes(model, data, sampler=sampler, seeds=seeds, args=run_args,
                                                       reference=reference)
        print(f"{variant}: {results[variant]} mean {statistics.mean(results[variant]):.2f}", file=sys.stderr,
              flush=True)
    print(f"reference {reference}, seeds {seeds}, {args.trials} trials\n")
    print("| sampler | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    print("|---|" + "---:|" * (len(seeds) + 1))
    for variant, volumes in results.items():
        print(f"| {variant} | " + " | ".join(f"{v:.2f}" for v in volumes) + f" | {statistics.mean(volumes):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
