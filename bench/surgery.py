"""Does model surgery pay on the host clock? (issue 20, point 6)

For each model (torchvision efficientnet_b0 and mobilenet_v3_small at 64x64, trained briefly with
edgeopt's own loop on the CIFAR-10 subset of ../shared/data/cifar10, upscaled from 32x32):

1. `optimize --target host --no-surgery` at a latency budget of `--budget` (a share of the fp32
   base's calm time on the reference clock): its selected model S0 is the best the search finds
   without surgery (validation accuracy a0, latency t0);
2. `optimize --target host` (surgery searched, as by default) at a budget of t0 / 1.3: its selected
   model S1 must be at least 1.3x faster than S0 and at most 1 point less accurate.

Both searches share the base model, data, seed, start (`--start hand` by default: the hand plans,
TI's lite model among them where surgery is on, then TPE) and fine-tuning recipe; S0 and S1 are then timed
against each other in alternating turns (`paired_latency.paired_ratio`, one onnxruntime thread,
each model run twice per turn and the second run timed, as the search's clock times and as a
model run alone finds its caches; each is also timed alone) and compared on the same validation images (exact McNemar test). Each step is cached in
--cache (the trained bases, each search's output folder and fine-tune store), so a killed run
resumes; the figures go to bench/results/surgery.json with the machine's CPU flags.

    python bench/surgery.py [--models efficientnet_b0,mobilenet_v3_small] [--budget 0.6]

`--train-images N` trains and searches on N images of the full CIFAR-10 training set
(../shared/data/cifar10-full.tar.gz, unpacked into the cache) and validates on all 5,000 of its
validation images, where the subset's 1,000 cannot tell one point (standard error about 1.2
points of a paired difference there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from paired_latency import paired_ratio  # noqa: E402

from bench.compare import _cpu_name  # noqa: E402
from bench.prove_base import DEFAULT_CACHE, commit, machine  # noqa: E402
from bench.real_run import subset_folder  # noqa: E402

from edgeopt.evaluators.cpu import int8_needs_reduce_range  # noqa: E402
from edgeopt.evaluators.latency import ReferenceClock, measure_latency  # noqa: E402
from edgeopt.evaluators.onnx_export import export_onnx  # noqa: E402
from edgeopt.search.data import load_data  # noqa: E402
from edgeopt.search.finetune import FinetuneConfig  # noqa: E402
from edgeopt.search.optimize import SearchConfig, optimize  # noqa: E402
from edgeopt.search.training import evaluate, predict, train  # noqa: E402

DATA = ROOT.parent.parent / "shared" / "data" / "cifar10"
OUT = ROOT / "results" / "surgery.json"
TURN = 2  # paired timing: each model twice per turn, the second timed (paired_latency.paired_ratio)
SPEEDUP = 1.3  # the target: this much faster ...
MAX_LOSS = 1.0  # ... at most this many points less accurate


def machine_record() -> dict:
    """The CPU (flags: VNNI or not), whether int8 needs reduce_range here, and the commit."""
    return machine() | {"cpu": _cpu_name(), "reduce_range": int8_needs_reduce_range(), "commit": commit()}


def mcnemar(first: torch.Tensor, second: torch.Tensor) -> dict:
    """Exact McNemar test on two models' per-image correctness."""
    from scipy.stats import binomtest

    only_first, only_second = int((first & ~second).sum()), int((~first & second).sum())
    n = only_first + only_second
    return {"only_first_right": only_first, "only_second_right": only_second,
            "difference_points": round(100 * (only_first - only_second) / len(first), 2),
            "p": 1.0 if n == 0 else float(binomtest(only_first, n, 0.5).pvalue)}


def base_model(name: str, data, cache: Path, epochs: float) -> tuple[torch.nn.Module, dict]:
    """The model trained from scratch on the subset (cached; resumable per epoch)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=data.num_classes)
    weights = cache / f"{name}.pt"
    info_path = cache / f"{name}.json"
    if weights.exists() and info_path.exists():
        model.load_state_dict(torch.load(weights))
        return model.eval(), json.loads(info_path.read_text())
    started = time.time()
    train(model, data.train, epochs=epochs, lr=3e-3, batch_size=64, seed=0, progress=f"train {name}",
          checkpoint=cache / f"{name}.ckpt")
    info = {"epochs": epochs, "seconds": round(time.time() - started), "val_top1": round(evaluate(model, data.val), 2)}
    torch.save(model.state_dict(), weights)
    info_path.write_text(json.dumps(info))
    return model.eval(), info


def search(model, data, *, out: Path, budget_ms: float, reference_ms: float, surgery: bool, args) -> dict:
    """One `optimize` run on host; its selected model's figures."""
    result = optimize(model, data, target="host", budget=f"{budget_ms:.4f}ms", out=out, progress=True,
                      search=SearchConfig(trials=args.trials, seed=args.seed, surgery=surgery, reference_ms=reference_ms,
                                          start=args.start),
                      finetune_config=FinetuneConfig(epochs=args.finetune_epochs))
    if result.selected is None:
        return {"met_budget": False, "budget_ms": budget_ms}
    predicted, labels = predict(result.model, data.val)
    return {"met_budget": True, "budget_ms": round(budget_ms, 4), "trial": result.selected.trial,
            "commit": commit(), "command": " ".join(["python bench/surgery.py", *sys.argv[1:]]),
            "accuracy": round(100 * float((predicted == labels).double().mean()), 2),
            "latency_ms": round(result.summary["selected"]["latency_ms"], 4),
            "macs": result.selected.macs, "plan_surgery": {b: s.describe() for b, s in result.plan.surgery.items()},
            "int8_layers": sum(lp.w_bits == 8 for lp in result.plan.layers.values()),
            "layers": len(result.plan.layers), "input_scale": result.plan.input_scale,
            "dropped": len(result.plan.dropped), "onnx": str(out / "selected" / "model.onnx"),
            "correct": "".join("1" if ok else "0" for ok in (predicted == labels).tolist())}


def paired(s0: dict, s1: dict, *, runs: int) -> dict:
    """S0 against S1: the paired time ratio (each model twice per turn, the second timed, as the
    search's reference clock times), each model's median timed alone, and McNemar on validation."""
    a, b = Path(s0["onnx"]), Path(s1["onnx"])
    timing = paired_ratio(a, b, runs=runs, turn=TURN)
    alone = {name: round(measure_latency(path, threads=1, repeats=300, min_time_s=0.5).median_ms, 4)
             for name, path in (("s0", a), ("s1", b))}
    first = torch.tensor([c == "1" for c in s0["correct"]])
    second = torch.tensor([c == "1" for c in s1["correct"]])
    return {"speedup": round(1 / timing["ratio"], 3), "interquartile_time_ratio": timing["interquartile"],
            "s0_ms": timing["a_ms"], "s1_ms": timing["b_ms"], "runs": runs, "turn": TURN,
            "alone_ms": alone, "mcnemar_s0_vs_s1": mcnemar(first, second), "commit": commit()}


def save(results: dict, own: set[str]) -> None:
    """Write this run's entries into the results file as it is now: another run (another model or
    tag) may have written its own since this one read it."""
    current = json.loads(OUT.read_text()) if OUT.exists() else {}
    current.update({key: results[key] for key in ("machine", "command", *sorted(own))})
    partial = OUT.with_suffix(".partial")
    partial.write_text(json.dumps(current, indent=1) + "\n")
    partial.replace(OUT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_b0,mobilenet_v3_small")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.6, help="S0's latency budget, a share of the fp32 base's")
    parser.add_argument("--epochs", type=float, default=15, help="base training epochs")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="the searches' and fine-tunes' seed (the data split stays)")
    parser.add_argument("--start", default="hand", choices=("allocated", "hand", "none"),
                        help="as optimize --start; hand (default) skips the allocation's sensitivity table, "
                             "an hour per search on efficientnet_b0 here")
    parser.add_argument("--finetune-epochs", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=2000, help="alternating runs of the final paired timing")
    parser.add_argument("--train-images", type=int, default=0,
                        help="0 (default): the shared CIFAR-10 subset (5,000 train, 1,000 validation images); N: N "
                             "training images of the full set and all its 5,000 validation images, for accuracies "
                             "a point apart")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "surgery")
    parser.add_argument("--train-only", action="store_true", help="train (or load) the base models and stop")
    parser.add_argument("--tag", default="", help="appended to each model's key in the results and its search folders, "
                                                   "for a run with other settings")
    parser.add_argument("--s0-from", metavar="TAG", default=None,
                        help="take S0 (the search without surgery) and the reference clock from the entry of this tag "
                             "(\"\" for none) instead of searching again: for a change to the search with surgery only")
    args = parser.parse_args()
    if not args.train_images and not DATA.is_dir():
        sys.exit(f"{DATA} is missing; this benchmark needs the shared CIFAR-10 subset.")
    torch.set_num_threads(1)
    if args.train_images:  # its own base models and searches
        args.cache = args.cache / f"cifar10-{args.train_images}"
    args.cache.mkdir(parents=True, exist_ok=True)
    folder = subset_folder(DEFAULT_CACHE, args.train_images, val_per_class=500) if args.train_images else DATA
    data = load_data(str(folder), input_size=args.size, seed=0)
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results["machine"] = machine_record()
    results["command"] = " ".join(["python bench/surgery.py", *sys.argv[1:]])
    own: set[str] = set()  # the entries this run writes
    for name in args.models.split(","):
        model, info = base_model(name, data, args.cache, args.epochs)
        if args.train_only:  # the entries are the searches' to write: a base alone is only cached
            print(json.dumps({name: info}), flush=True)
            continue
        entry = results.setdefault(name + args.tag, {})
        own.add(name + args.tag)
        entry["base"] = info
        entry["machine"] = results["machine"]  # entries of one file come from several machines
        entry["settings"] = {"budget": args.budget, "trials": args.trials, "start": args.start,
                             "finetune_epochs": args.finetune_epochs, "seed": args.seed,
                             "data": f"{len(data.train) + len(data.proxy)} training images (of which {len(data.proxy)} "
                                     f"proxy), {len(data.val)} validation images, {folder.name}"}
        if args.s0_from is not None and "without_surgery" not in entry:
            earlier = results.get(name + args.s0_from)
            if not earlier or "without_surgery" not in earlier:
                sys.exit(f"--s0-from: {OUT} has no search without surgery under {name + args.s0_from!r}; "
                         f"run that tag first, or leave --s0-from out.")
            entry["reference_ms"], entry["without_surgery"] = earlier["reference_ms"], earlier["without_surgery"]
            entry["s0_from"] = name + args.s0_from
        base_onnx = export_onnx(model, data.example_input(), args.cache / f"{name}-fp32.onnx")
        reference_ms = entry.get("reference_ms") or ReferenceClock(base_onnx).reference_ms
        entry["reference_ms"] = round(reference_ms, 4)
        if "without_surgery" not in entry:
            entry["without_surgery"] = search(model, data, out=args.cache / f"{name}{args.tag}-without", budget_ms=args.budget * reference_ms,
                                              reference_ms=reference_ms, surgery=False, args=args)
            save(results, own)
        s0 = entry["without_surgery"]
        if not s0["met_budget"]:
            print(f"{name}: the search without surgery met no model under the budget", file=sys.stderr)
            continue
        if "with_surgery" not in entry:
            entry["with_surgery"] = search(model, data, out=args.cache / f"{name}{args.tag}-with", budget_ms=s0["latency_ms"] / SPEEDUP,
                                           reference_ms=reference_ms, surgery=True, args=args)
            save(results, own)
        s1 = entry["with_surgery"]
        if s1["met_budget"] and ("paired" not in entry or entry["paired"].get("turn") != TURN):
            if "paired" in entry:  # timed in single alternating runs: kept, and timed again as below
                entry["paired_single_alternating_runs"] = entry.pop("paired")
            entry["paired"] = paired(s0, s1, runs=args.runs)
            entry["target_met"] = (entry["paired"]["speedup"] >= SPEEDUP
                                   and s1["accuracy"] >= s0["accuracy"] - MAX_LOSS)
            save(results, own)
        print(json.dumps({name: {k: v for k, v in entry.items() if k not in ("without_surgery", "with_surgery")}}),
              flush=True)
    if not args.train_only:
        save(results, own)
    return 0


if __name__ == "__main__":
    sys.exit(main())
