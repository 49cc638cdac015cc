"""Is the fine-tuning recipe what holds the hand plan 1.3 points under the base? (issue 5)

On the comparison's setting (cifar10 subset, edgenet width 64, pi4, 40 % budget), the hand plan
(uniform int8 at one keep ratio, `--keep`, 0.625 in the comparison) is compressed once and
fine-tuned from that start with the recipe `optimize` uses (AdamW 5e-4, distillation weight 0.5,
no augmentation) and with one change at a time: augmentation, distillation weight 0.9, learning
rate 1e-3, twice the epochs, and another seed (to read the others against). Prints one JSON line
per variant (validation and proxy top-1 after fine-tuning).

    python bench/finetune_recipes.py --data /work/shared/data/cifar10
    python bench/finetune_recipes.py --base-epochs 60 --variants "default,seed 1"   # a longer-trained base

About 15 minutes on the 2-core VM with two torch threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import compare  # noqa: E402

from edgeopt import model_cost  # noqa: E402
from edgeopt.search.finetune import FinetuneConfig  # noqa: E402
from edgeopt.search.training import evaluate, random_affine, train  # noqa: E402


def variants(epochs: float) -> dict[str, dict]:
    recipe = FinetuneConfig()
    default = {"epochs": epochs, "lr": recipe.lr, "batch_size": recipe.batch_size, "seed": 0}
    return {
        "default": default,
        "seed 1": default | {"seed": 1},
        "augmentation": default | {"augment": random_affine},
        "distillation 0.9": default | {"distill_weight": 0.9},
        "lr 1e-3": default | {"lr": 1e-3},
        f"{2 * epochs:g} epochs": default | {"epochs": 2 * epochs},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/cifar10")
    parser.add_argument("--keep", type=float, default=0.625, help="the hand plan's uniform keep ratio")
    parser.add_argument("--epochs", type=float, default=4.0, help="the default recipe's epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base-epochs", type=float, default=30.0,
                        help="the base model's training (30 in the comparison; trained and cached on first use)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated names of the variants to run (default: all)")
    args = parser.parse_args()
    chosen = variants(args.epochs)
    if args.variants is not None:
        names = [name.strip() for name in args.variants.split(",")]
        unknown = [name for name in names if name not in chosen]
        if unknown:
            sys.exit(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(chosen)}")
        chosen = {name: chosen[name] for name in names}
    data, model = compare.side_setup(args.data, threads=args.threads, base_epochs=args.base_epochs)
    context = compare.side_context(model, data)
    plan = context.space.uniform(w_bits=8, a_bits=8, keep_ratio=args.keep)
    example = data.example_input()
    macs_share = model_cost(context.compress(plan), example).macs / model_cost(model, example).macs
    print(json.dumps({"base_val": evaluate(model, data.val), "base_epochs": args.base_epochs, "keep": args.keep,
                      "macs_share": round(macs_share, 4)}), flush=True)
    for name, kwargs in chosen.items():
        compressed = context.compress(plan)
        start = time.time()
        train(compressed, data.train, teacher=context.model, **kwargs)
        print(json.dumps({"variant": name, "val": evaluate(compressed, data.val),
                          "proxy": evaluate(compressed, data.proxy), "seconds": round(time.time() - start)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
