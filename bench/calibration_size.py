"""How edgeopt's int8 accuracy moves with its calibration images: their number and their draw.

The edgenet's pi4 run of `bench/prove.py` compares edgeopt's int8 models with onnxruntime's
quantize_static applied to the same fine-tuned float models (BENCHMARKS.md, "The edgenet on pi4 at
numerics 6"). The two differ in their calibration: edgeopt's search draws 4 batches of 32 training
images by its seed (`SearchConfig.calib_batches`, `calib_batch_size`), prove.py gives
quantize_static the first 256. This script takes each fine-tuned float model of the hand family
(from prove.py's fine-tune store: nothing is trained), quantizes it as the int8 recipe does
(`Context.quantize`) with calibration sets of 128 images (seeds 0, 1 and 2) and 256 images (seed
0), and scores each on the 5,000 validation images. Seed 0 with 128 images is what prove.py's
hand int8 piece computed, so it must reproduce that piece's accuracy.

    python bench/calibration_size.py            # after bench/prove.py --base edgenet --target pi4

Writes bench/results/calibration_size.json (accuracy per keep and calibration set, and exact
McNemar tests of each set against seed 0 with 128 images).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from bench.prove import HAND_KEEPS, Run, _correct_bits, mcnemar, parse_run_options  # noqa: E402
from bench.prove_base import commit, machine  # noqa: E402
from edgeopt.search.finetune import finetune  # noqa: E402
from edgeopt.search.optimize import _calibration_batches  # noqa: E402
from edgeopt.search.select import Candidate  # noqa: E402
from edgeopt.search.training import predict  # noqa: E402

OUT = ROOT / "results" / "calibration_size.json"
# (name, batches of 32, seed): the search's default first, then other draws and twice the images.
CALIBRATIONS = (("128 images, seed 0", 4, 0), ("128 images, seed 1", 4, 1), ("128 images, seed 2", 4, 2),
                ("256 images, seed 0", 8, 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="edgenet", choices=("edgenet", "resnet20"))
    p.add_argument("--target", default="pi4", choices=("host", "pi4"))
    args = parse_run_options(p, argv, threads=2)
    run = Run(args.base, args.target, args)
    context = run.context
    results: dict = {"base": args.base, "target": args.target, "machine": machine(), "commit": commit(),
                     "reduce_range": context.reduce_range, "keeps": {}}
    for keep in HAND_KEEPS:
        piece = run.pieces.done.get(f"hand-k{keep:g}-int8")
        float_plan = context.space.uniform(w_bits=32, a_bits=32, keep_ratio=keep)
        int8_plan = context.space.uniform(w_bits=8, a_bits=8, keep_ratio=keep)
        candidate = Candidate(trial=-1, plan=float_plan, proxy_accuracy=0.0, latency_ms=0.0, macs=0,
                              effective_macs=0, bytes=0, violations=())
        tuned = finetune([candidate], context, data=run.data, config=run.recipe, seed=0, progress=False,
                         store=run.store)
        if not tuned:
            print(f"keep {keep:g}: no fine-tuned float model in the store; run bench/prove.py first", file=sys.stderr)
            continue
        row: dict = {"prove_int8_accuracy": None if piece is None else piece["accuracy"], "calibrations": {}}
        reference = None
        for name, batches, seed in CALIBRATIONS:
            calib = _calibration_batches(run.data.train, batches=batches, batch_size=32, seed=seed)
            model = replace(context, calib=calib).quantize(tuned[0].model, int8_plan)
            predicted, labels = predict(model, run.data.val)
            correct = _correct_bits(predicted, labels)
            entry = {"accuracy": round(100 * float((predicted == labels).double().mean()), 2)}
            if reference is None:
                reference = correct
            else:
                entry["vs_first"] = mcnemar(correct, reference)
            row["calibrations"][name] = entry
            print(f"keep {keep:g}, {name}: {entry['accuracy']:.2f}%", file=sys.stderr, flush=True)
        results["keeps"][f"{keep:g}"] = row
        OUT.write_text(json.dumps(results, indent=1) + "\n")  # written as it goes
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
