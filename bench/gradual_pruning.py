"""Does fading the channels out before removing them beat one-shot pruning? (issue 5, accuracy)

The comparison's hand plan (uniform int8 at keep 0.625, 39 % of the MACs) loses 1.3 points to
the base after edgeopt's 4-epoch fine-tune, and no recipe change closed it (finetune_recipes.py).
Here the same epochs are split: the float base first trains for `--fade` epochs (distilled from
itself, the fine-tune's recipe) while the channels the plan removes (lowest L1, ranked on the
unpruned model) are scaled down linearly to zero, so the rest of the network learns to do
without them; then the plan is applied (pruning removes channels that are already zero) and the
QAT fine-tune takes the remaining epochs. Growing regularization (Wang et al., ICLR 2021) is
the idea; the linear fade is the simplest schedule of it. Prints one JSON line per run.

    python bench/gradual_pruning.py --data /work/shared/data/cifar10 --fade 0,1,2 --seeds 0,1
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

import compare  # noqa: E402

from edgeopt.search.finetune import FinetuneConfig  # noqa: E402
from edgeopt.search.training import evaluate, train  # noqa: E402
from edgeopt.spaces.apply import apply_plan  # noqa: E402
from edgeopt.spaces.prune import build_graph, channels_to_drop  # noqa: E402


def fade_slices(model: nn.Module, example_input: torch.Tensor, keep: dict[str, float],
                round_to: int) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(parameter, dim, indices) of every weight slice that carries a channel the plan drops:
    producers' output rows and biases, BatchNorm scales and shifts, consumers' input columns."""
    graph = build_graph(model, example_input)
    modules = dict(model.named_modules())
    slices = []
    for root_name, idxs in channels_to_drop(graph, keep, round_to=round_to).items():
        root = modules[root_name]
        pruner = graph.get_pruner_of_module(root)
        for dep, mapped in graph.get_pruning_group(root, pruner.prune_out_channels, idxs):
            layer, index = dep.target.module, torch.tensor([int(i) for i in mapped])
            out = graph.is_out_channel_pruning_fn(dep.handler)
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                slices += [(p, 0, index) for p in (layer.weight, layer.bias) if p is not None]
            elif isinstance(layer, (nn.Conv2d, nn.Linear)):
                depthwise = isinstance(layer, nn.Conv2d) and layer.groups == layer.out_channels > 1
                if out or depthwise:
                    slices += [(p, 0, index) for p in (layer.weight, layer.bias) if p is not None]
                elif getattr(layer, "groups", 1) == 1:
                    slices.append((layer.weight, 1, index))
    return slices


def fade_train(model, data, teacher, *, epochs: float, slices, recipe: FinetuneConfig, seed: int) -> None:
    """Train `model` for `epochs` while the sliced weights shrink linearly to exactly zero."""
    steps = max(1, math.ceil(epochs * (len(data.train) // recipe.batch_size)))  # as `train` counts
    done = 0

    def shrink(module, args, output):  # a forward hook on the model: runs once per step
        nonlocal done
        if module.training:
            done += 1
            factor = max(0.0, (steps - done) / (steps - done + 1))  # s(t)/s(t-1), s(t) = 1 - t/T
            with torch.no_grad():
                for param, dim, index in slices:
                    param.index_copy_(dim, index, param.index_select(dim, index) * factor)
        return output

    handle = model.register_forward_pre_hook(lambda m, a: shrink(m, a, None))
    try:
        train(model, data.train, epochs=epochs, lr=recipe.lr, batch_size=recipe.batch_size,
              teacher=teacher, seed=seed)
    finally:
        handle.remove()
    with torch.no_grad():  # the last step's update moved them off zero a little
        for param, dim, index in slices:
            param.index_fill_(dim, index, 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/cifar10")
    parser.add_argument("--keep", type=float, default=0.625)
    parser.add_argument("--epochs", type=float, default=4.0, help="fade plus fine-tune epochs")
    parser.add_argument("--fade", default="0,1,2", help="comma-separated fade epochs to try")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    data, model = compare.side_setup(args.data, threads=args.threads)
    context = compare.side_context(model, data)
    plan = context.space.uniform(w_bits=8, a_bits=8, keep_ratio=args.keep)
    keep = context.space.group_keep(plan)
    round_to = context.target.accelerates.channel_multiple
    recipe = FinetuneConfig()
    print(json.dumps({"base_val": evaluate(model, data.val), "keep": args.keep}), flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for fade in [float(f) for f in args.fade.split(",")]:
            start = time.time()
            faded = copy.deepcopy(model)
            if fade > 0:
                fade_train(faded, data, model, epochs=fade, recipe=recipe, seed=seed,
                                    slices=fade_slices(faded, context.example_input, keep, round_to))
            compressed = apply_plan(faded, plan, context.example_input, calib_data=context.calib,
                                    round_to=round_to, reduce_range=context.reduce_range, space=context.space)
            before = evaluate(compressed, data.proxy)
            train(compressed, data.train, epochs=args.epochs - fade, lr=recipe.lr,
                  batch_size=recipe.batch_size, teacher=model, seed=seed)
            print(json.dumps({"fade": fade, "finetune": args.epochs - fade, "seed": seed,
                              "proxy_before_finetune": before, "val": evaluate(compressed, data.val),
                              "proxy": evaluate(compressed, data.proxy),
                              "seconds": round(time.time() - start)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
