"""Does a short fine-tune rank candidates better than the proxy? (issue 5, the screening round)

On the comparison's setting (cifar10 subset, edgenet width 64, pi4, 40 % budget), a seed-0
search of 60 trials (`--sampler`, NSGA-II by default as when the figures were taken) picks the candidates `optimize` would screen (`finetune_order`, 10 of them);
each is fine-tuned twice from its compressed start, for `--short` epochs (scored on the proxy
split, as the screening round scores it) and for `--full` epochs (scored on validation, as the
final round). Prints one JSON line per candidate and the rank correlations with the full
fine-tune's accuracy.

    python bench/screening_rank.py --data /work/shared/data/cifar10

About 20 minutes on the 2-core VM with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend
from scipy.stats import kendalltau, spearmanr

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import compare  # noqa: E402

from edgeopt.search.finetune import FinetuneConfig, finetune  # noqa: E402
from edgeopt.search.optimize import (SearchConfig, _candidates, _hand_candidate, _starting_plans,  # noqa: E402
                                     optimize)
from edgeopt.search.select import finetune_order  # noqa: E402
from edgeopt.search.training import evaluate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/cifar10")
    parser.add_argument("--work", default="/tmp/edgeopt-screening", help="where the search's study goes")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--short", type=float, default=0.5)
    parser.add_argument("--full", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sampler", default="nsga2", help="the search's sampler (the figures in BENCHMARKS.md: nsga2)")
    args = parser.parse_args()
    data, model = compare.side_setup(args.data, threads=args.threads)
    journal = Path(args.work) / "study.journal"
    if not journal.exists():
        optimize(model, data, target=compare.TARGET, budget="40%", search=SearchConfig(trials=60, seed=0, sampler=args.sampler),
                 out=journal.parent, search_only=True, progress=False)
    context = compare.side_context(model, data)
    study = optuna.load_study(study_name="edgeopt", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(journal))))
    candidates = _candidates(study)
    hand = _hand_candidate(candidates, _starting_plans(context.space))
    rows = []
    for c in finetune_order(candidates, args.candidates, spread=10.0, hand=hand):
        start = time.time()
        short = finetune([c], context, data=data, config=FinetuneConfig(top=1, epochs=args.short), seed=0)[0]
        short_proxy = evaluate(short.model, data.proxy)
        short_s = time.time() - start
        full = finetune([c], context, data=data, config=FinetuneConfig(top=1, epochs=args.full), seed=0)[0]
        rows.append({"trial": c.trial, "proxy": round(c.proxy_accuracy, 2), "ms": round(c.latency_ms, 4),
                     "mmacs": round(c.macs / 1e6, 2), "short_proxy": round(short_proxy, 2),
                     "short_val": round(short.candidate.accuracy, 2), "full_val": round(full.candidate.accuracy, 2),
                     "short_s": round(short_s, 1), "s": round(time.time() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    for subset, label in ((rows, "all"), ([r for r in rows if r["proxy"] >= 45], "proxy >= 45")):
        target = [r["full_val"] for r in subset]
        for key in ("proxy", "short_proxy"):
            scores = [r[key] for r in subset]
            print(f"{label} ({len(subset)}): {key} vs full fine-tune: Kendall "
                  f"{kendalltau(scores, target).statistic:.2f}, Spearman {spearmanr(scores, target).statistic:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
