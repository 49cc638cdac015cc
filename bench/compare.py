"""Side by side (issue 5): edgeopt's search against random search and what a user does by hand.

Every method runs in this one process on the same trained base model, data, budget and target
(pi4), and every compressed model gets the same fine-tuning (edgeopt.search.finetune: QAT at its
bit widths, pruned structure kept, distilled from the base model, `--finetune-epochs` epochs):

- edgeopt        `optimize` as the CLI runs it (its default sampler), `--trials` trials, top `--top` fine-tuned;
- random         the same, with Optuna's RandomSampler (same space, trials, warm start, fine-tuning);
- uniform_int8   every layer int8 (weights per channel, activations calibrated);
- l1_prune_int8  one uniform channel keep ratio (L1 magnitude, Torch-Pruning), the largest of the
                 space's ratios whose model meets the budget, then int8;
- nm24_int8      2:4 sparsity on every eligible layer, then int8.

Results go to bench/results/compare.json; the table is printed in Markdown for BENCHMARKS.md.

    python bench/compare.py                       # embedded demo data (mnist): runs on a fresh install
    # the run in BENCHMARKS.md (about 41 minutes on 2 quiet cores, plus 18 to train the base once):
    python bench/compare.py --data /work/shared/data/cifar10 --budget 40% --trials 60 --finetune-epochs 4 --top 3 --width 64 --base-epochs 30 --hv-seeds 5 --threads 2

Accuracy is validation top-1 after fine-tuning. `pi4_ms` is edgeopt's pi4 estimate; `host_ms` is
the onnxruntime median on this machine (1 thread), every method's plan applied the same way for
this CPU (int8 weights in 7 bits where it lacks VNNI) and all models timed in interleaved passes,
keeping each model's best pass. `seconds` and `peak_rss_mb` cover producing the model (search,
fine-tuning, selection), not the host timing done here afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from edgeopt import NM, SearchSpace, apply_plan, export_onnx, model_cost
from edgeopt.budget import parse_budget
from edgeopt.evaluators.cpu import int8_needs_reduce_range
from edgeopt.hw_models.estimate import estimate_latency
from edgeopt.hw_models.targets import get_target
from edgeopt.plan import ModelPlan
from edgeopt.search.data import load_data
from edgeopt.search.finetune import FinetuneConfig, finetune
from edgeopt.search.models import DEFAULT_WIDTH, check_model_fits, default_model, resolve_model
from edgeopt.search.optimize import SearchConfig, optimize, prepare, target_knobs
from edgeopt.search.select import Candidate
from edgeopt.search.training import evaluate

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TARGET = "pi4"
METHODS = ("edgeopt", "random", "uniform_int8", "l1_prune_int8", "nm24_int8")
FLOAT_TWIN = "edgeopt_plan_fp32"  # host timing only: edgeopt's pruning without quantization


# --- measuring a method's cost ------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0), so that each
    method's peak is its own and not the largest so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # not per method: the process's peak so far

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def metered(record: dict):
    record["peak_rss_is_per_method"] = _reset_peak_rss()
    start = time.perf_counter()
    try:
        yield
    finally:
        record["seconds"] = round(time.perf_counter() - start, 2)
        record["peak_rss_mb"] = round(_peak_rss_mb(), 1)


# --- hypervolume -------------------------------------------------------------------------------


def hypervolume_2d(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by (accuracy %, latency ms) points, accuracy maximized and latency
    minimized, bounded by `reference` = (accuracy floor, latency ceiling); in %-points x ms."""
    ref_acc, ref_ms = reference
    pts = sorted((ms, acc) for acc, ms in points if acc > ref_acc and ms < ref_ms)
    area, best = 0.0, ref_acc
    for i, (ms, acc) in enumerate(pts):
        best = max(best, acc)
        right = pts[i + 1][0] if i + 1 < len(pts) else ref_ms
        area += (right - ms) * (best - ref_acc)
    return area


def _optuna_hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float | None:
    """The same area by Optuna's implementation (a private module, so only a cross-check)."""
    try:
        import numpy as np
        from optuna._hypervolume import compute_hypervolume
    except ImportError:
        return None
    ref_acc, ref_ms = reference
    kept = [(-acc, ms) for acc, ms in points if acc > ref_acc and ms < ref_ms]
    if not kept:
        return 0.0
    return float(compute_hypervolume(np.array(kept, dtype=float), np.array([-ref_acc, ref_ms])))


# --- the base model ------------------------------------------------------------------------------


def base_model(data, *, epochs: float, width: int, cache: Path) -> tuple[torch.nn.Module, str]:
    """edgenet of `--width` trained by edgeopt's own routine (`--base-epochs`), cached in
    bench/results/models."""
    model, description = default_model(data, cache_dir=cache, epochs=epochs, width=width, progress=True)
    check_model_fits(model, data)
    return model.eval(), description


def side_setup(data_dir: str | None, *, threads: int, base_epochs: float = 30.0,
               width: int = 64) -> tuple:
    """(data, base model) of the comparison, for the side benchmarks that study one of its parts;
    Optuna and warnings quiet, `threads` torch threads."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    data = load_data(data_dir, seed=0)
    model, _ = base_model(data, epochs=base_epochs, width=width, cache=RESULTS / "models")
    return data, model


def side_context(model, data, *, budget: str = "40%"):
    """The search context the comparison builds (space, calibration, budget check) on pi4."""
    with tempfile.TemporaryDirectory() as tmp:
        context, _ = prepare(model, data, target=get_target(TARGET), budgets=(parse_budget(budget),),
                             search=SearchConfig(trials=1, seed=0), out_dir=Path(tmp), seed=0)
    return context


# --- the methods -------------------------------------------------------------------------------


def _plan_summary(plan: ModelPlan) -> dict:
    layers = list(plan.layers.values())
    return {
        "layers": len(layers),
        "int8_layers": sum(1 for lp in layers if lp.w_bits == 8 and lp.a_bits == 8),
        "float_layers": sum(1 for lp in layers if lp.w_bits == 32 and lp.a_bits == 32),
        "nm_layers": sum(1 for lp in layers if lp.nm is not None),
        "keep_ratios": sorted({lp.keep_ratio for lp in layers}),
    }


def _row(candidate: Candidate, *, meets_budget: bool) -> dict:
    return {"accuracy": candidate.accuracy, "proxy_accuracy": round(candidate.proxy_accuracy, 2),
            "macs": candidate.macs, "effective_macs": candidate.effective_macs, "bytes": candidate.bytes,
            "pi4_ms": round(candidate.latency_ms, 4), "meets_budget": meets_budget}


def run_search(model, data, *, sampler: str, args, out: Path) -> tuple[dict, ModelPlan | None, dict]:
    """`optimize` for pi4 with one sampler; (row, plan of the selected model, search details)."""
    shutil.rmtree(out, ignore_errors=True)  # a journal left in the folder would resume the study
    result = optimize(model, data, target=TARGET, budget=args.budget,
                      search=SearchConfig(trials=args.trials, sampler=sampler, seed=args.seed),
                      finetune_config=FinetuneConfig(top=args.top, epochs=args.finetune_epochs),
                      out=out, model_name="edgenet", progress=args.progress)
    frame = result.trials
    chosen = result.selected
    if chosen is None:  # nothing met the budget: report the most accurate fine-tuned one, marked so
        tuned = frame[frame["finetuned_accuracy"].notna()].sort_values("finetuned_accuracy", ascending=False)
        row = tuned.iloc[0]
        plan = next((c.plan for c in result.pareto if c.trial == int(row["trial"])), None)
        out_row = {"accuracy": float(row["finetuned_accuracy"]), "proxy_accuracy": float(row["proxy_accuracy"]),
                   "macs": int(row["macs"]), "effective_macs": int(row["effective_macs"]),
                   "bytes": int(row["bytes"]), "pi4_ms": float(row["latency_ms"]), "meets_budget": False}
    else:
        plan = chosen.plan
        out_row = _row(chosen, meets_budget=True) | {"trial": chosen.trial}
    details = {"frame": frame, "study_dir": out, "summary": result.summary}
    if plan is not None:
        out_row["plan"] = _plan_summary(plan)
    return out_row, plan, details


def run_plan(name: str, plan: ModelPlan, context, data, args) -> dict:
    """Compress with one fixed plan, score it as a search trial would, fine-tune it as the search
    fine-tunes its candidates."""
    metrics = context.measure(plan)
    candidate = Candidate(trial=-1, plan=plan, proxy_accuracy=metrics["proxy_accuracy"],
                          latency_ms=metrics["latency_ms"], macs=metrics["macs"],
                          effective_macs=metrics["effective_macs"], bytes=metrics["bytes"],
                          violations=tuple(metrics["violations"]))
    config = FinetuneConfig(top=1, epochs=args.finetune_epochs)
    tuned = finetune([candidate], context, data=data, config=config, seed=args.seed, progress=args.progress)
    if not tuned:
        raise RuntimeError(f"{name}: fine-tuning diverged")
    return _row(tuned[0].candidate, meets_budget=candidate.feasible) | {"plan": _plan_summary(plan)}


def l1_keep_ratio(context) -> tuple[float | None, list[dict]]:
    """The largest uniform keep ratio whose int8 model meets every budget (what a user tries by
    hand: prune everything a bit more until it fits), with what each ratio tried gave."""
    tried = []
    for keep in sorted(context.space.knobs.keep_ratios, reverse=True):
        plan = context.space.uniform(w_bits=8, a_bits=8, keep_ratio=keep)
        compressed = context.compress(plan)
        cost = model_cost(compressed, context.example_input)
        latency = estimate_latency(compressed, context.example_input, target=context.target).total_ms
        violations = context.violations(cost, latency)
        tried.append({"keep_ratio": keep, "macs": cost.macs, "pi4_ms": round(latency, 4),
                      "meets_budget": all(v <= 0 for v in violations)})
        if tried[-1]["meets_budget"]:
            return keep, tried
    return None, tried


# --- host latency --------------------------------------------------------------------------------


def host_latencies(models: dict[str, torch.nn.Module], example: torch.Tensor, *, passes: int,
                   folder: Path) -> dict[str, tuple[float, float]]:
    """Median onnxruntime ms (1 thread) and spread of each model, timed in `passes` interleaved
    passes; each keeps its best pass, so a burst of load from a neighbour hits no model alone."""
    from edgeopt.evaluators.latency import measure_latency

    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: export_onnx(model, example, folder / f"{name}.onnx") for name, model in models.items()}
    best: dict[str, tuple[float, float]] = {name: (math.inf, 0.0) for name in paths}
    for _ in range(passes):
        for name, path in paths.items():
            m = measure_latency(path, threads=1, repeats=100, min_time_s=0.5)
            if m.median_ms < best[name][0]:
                best[name] = (m.median_ms, m.spread_ms)
    return best


# --- search cost (issue 5, point 4) ----------------------------------------------------------------


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def trial_cost(model, data, calib: list, *, repeats: int) -> dict:
    """What one search trial costs on `model`: building the space (once per search), then per
    trial apply_plan + pi4 estimate + cost + proxy accuracy, medians over `repeats` random plans."""
    example = data.example_input()
    target = get_target(TARGET)
    start = time.perf_counter()
    space = SearchSpace.from_model(model, example)
    space_s = time.perf_counter() - start
    space = space.restrict(target_knobs(target, size_matters=False))
    plans = [space.sample(seed=s) for s in range(repeats)]
    parts: dict[str, list[float]] = {"apply": [], "estimate": [], "cost": [], "proxy": []}
    for plan in plans:
        t0 = time.perf_counter()
        compressed = apply_plan(model, plan, example, calib_data=calib,
                                round_to=target.accelerates.channel_multiple, space=space)
        t1 = time.perf_counter()
        estimate_latency(compressed, example, target=target)
        t2 = time.perf_counter()
        model_cost(compressed, example)
        t3 = time.perf_counter()
        evaluate(compressed, data.proxy)
        t4 = time.perf_counter()
        for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key].append(seconds)
    medians = {f"{k}_s": round(statistics.median(v), 3) for k, v in parts.items()}
    per_trial = [sum(p) for p in zip(*parts.values())]
    return {"layers": len(space.layers), "groups": len(space.groups),
            "prunable_groups": len(space.prunable_groups), "macs": model_cost(model, example).macs,
            "space_s": round(space_s, 3), **medians,
            "apply_estimate_s": round(statistics.median(a + e for a, e in zip(parts["apply"], parts["estimate"])), 3),
            "trial_s": round(statistics.median(per_trial), 3), "repeats": repeats}


def study_trial_seconds(frame_dir: Path) -> dict:
    """Per-trial wall time of a finished search, from its Optuna journal (every finished trial,
    the three enqueued starting plans included)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(frame_dir / "study.journal")))
    study = optuna.load_study(study_name="edgeopt", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.duration]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    seconds = sorted(t.duration.total_seconds() for t in done)
    return {"trials": len(seconds), "duplicates_pruned": len(pruned),
            "median_s": round(statistics.median(seconds), 3),
            "p90_s": round(seconds[min(len(seconds) - 1, int(0.9 * len(seconds)))], 3),
            "max_s": round(seconds[-1], 3), "total_s": round(sum(seconds), 1)}


def search_hypervolumes(model, data, *, sampler: str, seeds: list[int], args, reference) -> list[float]:
    """Hypervolume of search-only runs (no fine-tuning) at more seeds: one seed's comparison of
    two samplers is close to a coin toss, a few seeds say more."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from edgeopt.search.study import CONSTRAINTS, METRICS, finished

    volumes = []
    for seed in seeds:
        out = args.work / "hv" / f"{sampler}-seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        optimize(model, data, target=TARGET, budget=args.budget,
                 search=SearchConfig(trials=args.trials, sampler=sampler, seed=seed),
                 out=out, search_only=True, progress=False)
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal")))
        study = optuna.load_study(study_name="edgeopt", storage=storage)
        pts = [(t.user_attrs[METRICS]["proxy_accuracy"], t.user_attrs[METRICS]["latency_ms"])
               for t in finished(study) if all(v <= 0 for v in t.user_attrs[CONSTRAINTS])]
        volumes.append(round(hypervolume_2d(pts, reference), 4))
    return volumes


def inventory_growth(data, calib: list, *, repeats: int) -> dict:
    """resnet18 vs resnet50 (random weights: only time matters) on the benchmark's inputs."""
    out = {}
    for name in ("resnet18", "resnet50"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = resolve_model(name, data=data)
        out[name] = trial_cost(model, data, calib, repeats=repeats)
    return out


# --- main ------------------------------------------------------------------------------------------


def _markdown(report: dict) -> str:
    base = report["base"]
    lines = ["| method | top-1 % (val, fine-tuned) | MMACs | KB | pi4 ms (est.) | host ms (ORT, 1 thr) "
             "| meets budget | seconds | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|:---:|---:|---:|",
             f"| base (fp32) | {base['accuracy']:.1f} | {base['macs'] / 1e6:.2f} | {base['bytes'] / 1e3:.1f} "
             f"| {base['pi4_ms']:.3f} | {base['host_ms']:.3f} | {'yes' if base['meets_budget'] else 'no'} "
             f"| {base['seconds']:.0f} | {base['peak_rss_mb']:.0f} |"]
    for name, m in report["methods"].items():
        lines.append(f"| {name} | {m['accuracy']:.1f} | {m['macs'] / 1e6:.2f} | {m['bytes'] / 1e3:.1f} "
                     f"| {m['pi4_ms']:.3f} | {m['host_ms']:.3f} | {'yes' if m['meets_budget'] else 'no'} "
                     f"| {m['seconds']:.0f} | {m['peak_rss_mb']:.0f} |")
    for name, h in report.get("host_only", {}).items():
        lines.append(f"| {name} (host timing only) | - | {h['macs'] / 1e6:.2f} | - | - | {h['host_ms']:.3f} | - | - | - |")
    hv = report["hypervolume"]
    lines.append("")
    lines.append(f"Hypervolume of the within-budget trials in (proxy top-1 %, pi4 ms), reference "
                 f"{hv['reference']}: edgeopt {hv['edgeopt']:.2f}, random {hv['random']:.2f} "
                 f"(all trials, budget ignored: edgeopt {hv['all_trials']['edgeopt']:.2f}, "
                 f"random {hv['all_trials']['random']:.2f}).")
    if "more_seeds" in hv:
        more = hv["more_seeds"]
        lines.append(f"Search-only runs at seeds {more['seeds']}: edgeopt {more['edgeopt']}, random {more['random']}; "
                     f"mean over all seeds edgeopt {more['mean']['edgeopt']:.2f}, random {more['mean']['random']:.2f}; "
                     f"edgeopt at least random in {more['edgeopt_wins']} of {len(more['seeds']) + 1}.")
    return "\n".join(lines)


def targets_check(report: dict) -> dict:
    """Issue 5's targets, each true or false, with the figures they compare."""
    base, m = report["base"], report["methods"]
    ed = m["edgeopt"]
    hand = [m[k] for k in ("uniform_int8", "l1_prune_int8", "nm24_int8") if m[k]["meets_budget"]]
    best_hand = max((h["accuracy"] for h in hand), default=None)
    baselines_lose = best_hand is None or base["accuracy"] - best_hand > 1.0
    margin = 1.0 if baselines_lose else 0.0
    return {
        "edgeopt_meets_budget": ed["meets_budget"],
        "accuracy_vs_best_hand_baseline": {
            "edgeopt": ed["accuracy"], "best_hand_within_budget": best_hand, "required_margin": margin,
            "holds": ed["meets_budget"] and (best_hand is None or ed["accuracy"] >= best_hand + margin)},
        "hypervolume_vs_random": {"holds": report["hypervolume"]["edgeopt"] >= report["hypervolume"]["random"]},
        "host_speedup_vs_base": {"value": round(base["host_ms"] / ed["host_ms"], 2), "required": 2.0,
                                 "holds": base["host_ms"] / ed["host_ms"] >= 2.0},
        "host_speedup_vs_uniform_int8": {"value": round(m["uniform_int8"]["host_ms"] / ed["host_ms"], 2),
                                         "required": 1.3,
                                         "holds": m["uniform_int8"]["host_ms"] / ed["host_ms"] >= 1.3},
        "accuracy_drop_vs_base": {"value": round(base["accuracy"] - ed["accuracy"], 2), "allowed": 1.0,
                                  "holds": base["accuracy"] - ed["accuracy"] <= 1.0},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="ImageFolder directory (default: embedded mnist demo data)")
    parser.add_argument("--budget", default="40%", help="one budget, as `optimize --budget` reads it")
    parser.add_argument("--trials", type=int, default=60, help="search trials, edgeopt and random alike")
    parser.add_argument("--finetune-epochs", type=float, default=2.0, help="fine-tuning epochs per model")
    parser.add_argument("--top", type=int, default=3, help="candidates each search fine-tunes")
    parser.add_argument("--base-epochs", type=float, default=None,
                        help="epochs of the base model's training (default: edgeopt's default recipe)")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                        help="edgenet's width (channels of its first layers; MACs grow with its square)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host-passes", type=int, default=3, help="interleaved host timing passes")
    parser.add_argument("--cost-repeats", type=int, default=5,
                        help="random plans timed per model for the search-cost figures (0: skip them)")
    parser.add_argument("--hv-seeds", type=int, default=0,
                        help="extra search-only seeds (no fine-tuning) for the hypervolume comparison")
    parser.add_argument("--out", type=Path, default=RESULTS / "compare.json")
    parser.add_argument("--work", type=Path, default=RESULTS / "runs",
                        help="where the searches' studies, reports and ONNX files go (not committed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared 2-core machine a second OpenMP thread "
                             "fighting the neighbours' made training ~8x slower, not faster)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial drowns the table
    command = "python bench/compare.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()

    data = load_data(args.data, seed=args.seed)
    print(f"data: {data.description}", file=sys.stderr)
    budget = parse_budget(args.budget)
    cache = RESULTS / "models"
    from edgeopt.search.models import DEFAULT_EPOCHS

    base_epochs = DEFAULT_EPOCHS if args.base_epochs is None else args.base_epochs
    base_record: dict = {}
    with metered(base_record):
        model, model_description = base_model(data, epochs=base_epochs, width=args.width, cache=cache)
    print(f"model: {model_description}", file=sys.stderr)
    example = data.example_input()

    # The hand baselines use the very context a search builds: same space, calibration batches,
    # compression settings, proxy and budget check.
    target = get_target(TARGET)
    with tempfile.TemporaryDirectory() as tmp:
        context, _ = prepare(model, data, target=target, budgets=(budget,),
                             search=SearchConfig(trials=args.trials, seed=args.seed), out_dir=Path(tmp),
                             seed=args.seed)
    full_space = SearchSpace.from_model(model, example)  # N:M too, which pi4's space leaves out
    base_cost = context.base
    base_pi4 = estimate_latency(model, example, target=target).total_ms
    base_row = {"accuracy": evaluate(model, data.val), "proxy_accuracy": round(evaluate(model, data.proxy), 2),
                "macs": base_cost.macs, "effective_macs": base_cost.effective_macs, "bytes": base_cost.bytes,
                "pi4_ms": round(base_pi4, 4),
                "meets_budget": budget.violation(base_cost.macs, base_cost.macs) <= 0,
                "model": model_description, "trained_epochs": base_epochs, **base_record}

    methods: dict[str, dict] = {}
    plans: dict[str, ModelPlan] = {}
    searches: dict[str, dict] = {}
    for name, sampler in (("edgeopt", SearchConfig().sampler), ("random", "random")):
        record: dict = {}
        print(f"\n== {name}: optimize(sampler={sampler!r}, trials={args.trials})", file=sys.stderr)
        with metered(record):
            row, plan, details = run_search(model, data, sampler=sampler, args=args, out=args.work / name)
        methods[name] = row | record
        searches[name] = details
        if plan is not None:
            plans[name] = plan

    hand = {
        "uniform_int8": (context, context.space.uniform(w_bits=8, a_bits=8)),
        "nm24_int8": (replace(context, space=full_space),
                      full_space.uniform(w_bits=8, a_bits=8, nm=NM(n=2, m=4))),
    }
    l1_record: dict = {}
    with metered(l1_record):
        keep, tried = l1_keep_ratio(context)
    if keep is None:
        print("l1_prune_int8: no uniform keep ratio meets the budget; using the smallest", file=sys.stderr)
        keep = min(context.space.knobs.keep_ratios)
    hand["l1_prune_int8"] = (context, context.space.uniform(w_bits=8, a_bits=8, keep_ratio=keep))
    for name in ("uniform_int8", "l1_prune_int8", "nm24_int8"):
        ctx, plan = hand[name]
        print(f"\n== {name}", file=sys.stderr)
        record = {}
        with metered(record):
            row = run_plan(name, plan, ctx, data, args)
        if name == "l1_prune_int8":
            record["seconds"] = round(record["seconds"] + l1_record["seconds"], 2)
            record["peak_rss_mb"] = max(record["peak_rss_mb"], l1_record["peak_rss_mb"])
            row["keep_ratio"] = keep
            row["keep_ratios_tried"] = tried
        methods[name] = row | record
        plans[name] = plan

    # Host latency: each plan applied for this CPU (7-bit int8 weights without VNNI), the same for all.
    print("\n== host latency (onnxruntime, 1 thread)", file=sys.stderr)
    reduce = int8_needs_reduce_range()
    host_models = {"base": model}
    for name, plan in plans.items():
        host_models[name] = apply_plan(model, plan, example, calib_data=context.calib,
                                       round_to=target.accelerates.channel_multiple, reduce_range=reduce,
                                       space=full_space)
    if "edgeopt" in plans:
        # The selected structure without quantization: says whether int8 itself pays on this CPU.
        float_plan = ModelPlan(layers={fqn: replace(lp, w_bits=32, a_bits=32, nm=None)
                                       for fqn, lp in plans["edgeopt"].layers.items()})
        host_models[FLOAT_TWIN] = apply_plan(model, float_plan, example, calib_data=context.calib,
                                             round_to=target.accelerates.channel_multiple, space=full_space)
    timed = host_latencies(host_models, example, passes=args.host_passes, folder=args.work / "onnx")
    base_row["host_ms"], base_row["host_spread_ms"] = (round(v, 4) for v in timed["base"])
    for name in methods:
        if name in timed:
            methods[name]["host_ms"], methods[name]["host_spread_ms"] = (round(v, 4) for v in timed[name])
        else:
            methods[name]["host_ms"] = methods[name]["host_spread_ms"] = None
    for name, m in methods.items():  # checks that the host copy is the same architecture
        m["host_model_macs"] = model_cost(host_models[name], example).macs if name in host_models else None

    # Hypervolume of the final fronts: the within-budget trials' proxy accuracy vs pi4 latency.
    reference = (round(100.0 / data.num_classes, 2), round(base_pi4, 4))
    hv: dict = {"reference": list(reference),
                "reference_means": "(accuracy floor = chance, 100/classes %; latency ceiling = the fp32 base "
                                   "model's pi4 ms); points: every finished trial within budget, proxy top-1",
                "all_trials": {}, "optuna_check": {}}
    for name in ("edgeopt", "random"):
        frame = searches[name]["frame"]
        within = frame[frame["feasible"]]
        pts = list(zip(within["proxy_accuracy"], within["latency_ms"]))
        hv[name] = round(hypervolume_2d(pts, reference), 4)
        hv["optuna_check"][name] = _optuna_hypervolume(pts, reference)
        hv["all_trials"][name] = round(hypervolume_2d(list(zip(frame["proxy_accuracy"], frame["latency_ms"])),
                                                      reference), 4)
        tuned = frame[frame["finetuned_accuracy"].notna() | frame["screened_accuracy"].notna()]
        searches[name]["finetuned"] = tuned[["trial", "proxy_accuracy", "screened_accuracy", "finetuned_accuracy",
                                             "latency_ms", "macs", "feasible"]].astype(object).where(
                                                 tuned.notna(), None).to_dict("records")
        searches[name]["feasible_trials"] = int(frame["feasible"].sum())

    if args.hv_seeds > 0:
        seeds = [args.seed + 1 + i for i in range(args.hv_seeds)]
        hv["more_seeds"] = {"seeds": seeds}
        for name, sampler in (("edgeopt", SearchConfig().sampler), ("random", "random")):
            print(f"\n== hypervolume, {name}, seeds {seeds}", file=sys.stderr)
            hv["more_seeds"][name] = search_hypervolumes(model, data, sampler=sampler, seeds=seeds, args=args,
                                                         reference=reference)
        all_seeds = {name: [hv[name], *hv["more_seeds"][name]] for name in ("edgeopt", "random")}
        hv["more_seeds"]["mean"] = {name: round(statistics.mean(v), 4) for name, v in all_seeds.items()}
        hv["more_seeds"]["edgeopt_wins"] = sum(e >= r for e, r in zip(all_seeds["edgeopt"], all_seeds["random"]))

    search_cost: dict = {}
    if args.cost_repeats > 0:
        print("\n== search cost", file=sys.stderr)
        search_cost["benchmark_model_study"] = study_trial_seconds(args.work / "edgeopt")
        search_cost["benchmark_model_parts"] = trial_cost(model, data, context.calib, repeats=args.cost_repeats)
        search_cost["inventory"] = inventory_growth(data, context.calib, repeats=args.cost_repeats)
        search_cost["input"] = list(example.shape[1:])

    report = {
        "base": base_row,
        "methods": {name: methods[name] for name in METHODS},
        "hypervolume": hv,
        "command": command,
        "settings": {"data": data.description, "budget": str(budget), "target": TARGET, "trials": args.trials,
                     "finetune_epochs": args.finetune_epochs, "top": args.top, "seed": args.seed,
                     "torch_threads": args.threads,
                     "base_epochs": base_epochs, "width": args.width, "host_passes": args.host_passes,
                     "host_reduce_range": reduce},
        "searches": {name: {k: v for k, v in s.items() if k in ("finetuned", "feasible_trials")}
                     for name, s in searches.items()},
        "search_cost": search_cost,
        "host_only": ({FLOAT_TWIN: {"host_ms": round(timed[FLOAT_TWIN][0], 4),
                                    "host_spread_ms": round(timed[FLOAT_TWIN][1], 4),
                                    "macs": model_cost(host_models[FLOAT_TWIN], example).macs,
                                    "means": "edgeopt's selected pruning in fp32, not quantized (not fine-tuned: "
                                             "timed only)"}} if FLOAT_TWIN in timed else {}),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    report["targets"] = targets_check(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    print(_markdown(report))
    print(json.dumps(report["targets"], indent=2, default=_json_default))
    print(f"wrote {args.out} in {report['total_seconds']:.0f} s", file=sys.stderr)
    return 0


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
