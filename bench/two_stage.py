"""Fine-tune in float first, then quantize: the int8 hand plans of the edgenet, by share of float.

    python bench/two_stage.py [--keeps 0.75 0.5] [--shares 0 0.75 1] [--epochs 0.25]

The edgenet's pi4 run of `bench/prove.py` found its int8 hand plans, fine-tuned with QAT from the
first step, below the same plans fine-tuned in float and then quantized by onnxruntime's
quantize_static (keep 0.5: 65.70% against 68.22%, McNemar p = 1e-10). This fine-tunes each
uniform int8 plan with `FinetuneConfig.float_share` at each share (0: QAT throughout, 1: float
throughout and then quantized, calibrated on the fine-tuned weights) with prove's recipe and
data, and gives each one's validation top-1 and the paired test against share 0. Results go to
bench/results/two_stage.json as they finish (a rerun skips those done).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from bench.prove import _correct_bits, _machine_tag, mcnemar  # noqa: E402
from bench.prove_base import DEFAULT_CACHE, cifar_data, load_base  # noqa: E402
from edgeopt.budget import parse_budget  # noqa: E402
from edgeopt.hw_models.targets import get_target  # noqa: E402
from edgeopt.search.finetune import FinetuneConfig, finetune  # noqa: E402
from edgeopt.search.optimize import SearchConfig, prepare  # noqa: E402
from edgeopt.search.select import Candidate  # noqa: E402
from edgeopt.search.training import predict  # noqa: E402

RESULTS = ROOT / "results" / "two_stage.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.75, 1.0])
    p.add_argument("--epochs", type=float, default=0.25)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    done = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data = cifar_data(args.cache)
    model = load_base("edgenet")
    with tempfile.TemporaryDirectory() as tmp:
        context, _ = prepare(model, data, target=get_target("pi4"), budgets=(parse_budget("50%"),),
                             search=SearchConfig(seed=0, input_scales=(1.0,), depth=False), out_dir=Path(tmp), seed=0)
    for keep in args.keeps:
        plan = context.space.uniform(w_bits=8, a_bits=8, keep_ratio=keep)
        for share in args.shares:
            name = f"k{keep:g}-int8-float{share:g}"
            if name in done:
                continue
            candidate = Candidate(trial=-1, plan=plan, proxy_accuracy=0.0, latency_ms=0.0, macs=0,
                                  effective_macs=0, bytes=0, violations=())
            tuned = finetune([candidate], context, data=data, seed=0, progress=True,
                             config=FinetuneConfig(epochs=args.epochs, float_share=share))
            predicted, labels = predict(tuned[0].model, data.val)
            done[name] = {"keep": keep, "float_share": share, "epochs": args.epochs,
                          "accuracy": round(100 * float((predicted == labels).double().mean()), 2),
                          "proxy_accuracy": tuned[0].candidate.tuned_proxy_accuracy,
                          "correct": _correct_bits(predicted, labels), "machine": _machine_tag()}
            RESULTS.write_text(json.dumps(done, indent=1))
            print(name, done[name]["accuracy"], file=sys.stderr, flush=True)
    for keep in args.keeps:
        qat = done.get(f"k{keep:g}-int8-float0")
        for share in args.shares:
            row = done.get(f"k{keep:g}-int8-float{share:g}")
            if row and qat and share:
                paired = mcnemar(row["correct"], qat["correct"])
                print(f"keep {keep:g}, float share {share:g}: {row['accuracy']:.2f}% against QAT throughout "
                      f"{qat['accuracy']:.2f}% ({paired['difference_points']:+.2f}, McNemar p = {paired['p']:.2g})")
            elif row:
                print(f"keep {keep:g}, float share {share:g}: {row['accuracy']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
