"""What the search alone costs per trial on a prove.py base model, and what it finds: the fixed-size
searches of `bench/prove.py` (40 trials, seed 0, TPE, started from the hand and allocated plans), run
search-only at the 70, 50 and 35% latency budgets.

    python bench/search_cost.py --label early-stop                # the working tree, TPE seed 0
    python bench/search_cost.py --label early-stop --budgets 70 --samplers tpe random --seeds 0 1 2 3 4 5
    (cd ../old-checkout && python bench/search_cost.py --label full-proxy)   # a copy of this script there

Per budget: the trials' median, 90th percentile and total wall time (from the study journal), how
many trials the proxy scored on part of its images (`edgeopt.search.objective.PROXY_STAGES`), and
the hypervolume of the within-budget trials in (proxy top-1 %, target ms) above (chance, the
base's time), as prove.py measures it. Results go to bench/results/search_cost.json under the
label, each search as it finishes (named sampler-seed-budget); a killed run resumes its studies.
Run it alone: it is a timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import _cpu_name, hypervolume_2d, study_trial_seconds  # noqa: E402
from bench.prove_base import DEFAULT_CACHE, cifar_data, commit, load_base, machine  # noqa: E402
from edgeopt.hw_models.targets import get_target  # noqa: E402
from edgeopt.search.objective import target_latency  # noqa: E402
from edgeopt.search.optimize import SearchConfig, optimize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "search_cost.json"
BUDGETS = (70, 50, 35)


def study_points(out: Path) -> tuple[list[tuple[float, float]], int]:
    """(proxy accuracy, ms) of the within-budget trials, and how many trials stopped early."""
    import optuna

    from edgeopt.search.study import CONSTRAINTS, METRICS, finished, make_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="edgeopt", storage=make_storage(None, out))
    trials = finished(study)
    full = max((t.user_attrs[METRICS].get("proxy_images") or 0) for t in trials)
    points = [(t.user_attrs[METRICS]["proxy_accuracy"], t.user_attrs[METRICS]["latency_ms"])
              for t in trials if all(v <= 0 for v in t.user_attrs[CONSTRAINTS])]
    stopped = sum(1 for t in trials if (t.user_attrs[METRICS].get("proxy_images") or full) < full)
    return points, stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="the name this run's figures are kept under")
    p.add_argument("--base", default="edgenet", choices=("edgenet", "resnet20"))
    p.add_argument("--target", default="pi4", choices=("pi4",),
                   help="pi4 only: its estimate reads the same on any machine (host needs prove.py's clock)")
    p.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="percent of the base's latency")
    p.add_argument("--samplers", nargs="+", default=["tpe"], choices=("tpe", "random"),
                   help="random starts from nothing, as prove.py's hypervolume seeds do")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    data = cifar_data(args.cache)
    model = load_base(args.base).eval()
    target = get_target(args.target)
    base_ms = float(target_latency(model, data.example_input(), target).total_ms)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    run = results.setdefault(args.label, {})
    run.update({"commit": commit(), "machine": machine() | {"cpu_name": _cpu_name()}, "base_ms": base_ms,
                "searches": run.get("searches", {})})
    run.setdefault("commands", [])
    command = " ".join(["python bench/search_cost.py", *(argv if argv is not None else sys.argv[1:])])
    if command not in run["commands"]:
        run["commands"].append(command)
    for sampler in args.samplers:
        for seed in args.seeds:
            for pct in args.budgets:
                name = f"{sampler}-{seed}-{pct}"
                if name in run["searches"]:
                    continue
                budget_ms = round(base_ms * pct / 100, 4)
                out = args.cache / "search_cost" / f"{args.base}-{args.target}" / args.label / name
                started = time.time()
                optimize(model, data, target=target, budget=f"{budget_ms}ms", out=out, search_only=True,
                         progress=False,
                         search=SearchConfig(trials=args.trials, seed=seed, input_scales=(1.0,), depth=False,
                                             sampler=sampler, start="none" if sampler == "random" else "allocated"))
                points, stopped = study_points(out)
                run["searches"][name] = study_trial_seconds(out) | {
                    "budget_ms": budget_ms, "stopped_early": stopped, "within_budget": len(points),
                    "hypervolume": round(hypervolume_2d(points, (100.0 / data.num_classes, base_ms)), 3),
                    "best_within_budget": max(points, default=None), "wall_s": round(time.time() - started, 1),
                    "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                RESULTS.write_text(json.dumps(results, indent=1) + "\n")
                row = run["searches"][name]
                print(f"{name}: median {row['median_s']} s, total {row['total_s']} s, stopped early {stopped}, "
                      f"hypervolume {row['hypervolume']}", flush=True)
    medians = [row["median_s"] for row in run["searches"].values()]
    print(f"{args.label}: trial medians {medians} s (median {statistics.median(medians)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
