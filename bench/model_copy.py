"""`copy.deepcopy` against `edgeopt.model_copy.copy_model` on models users bring: milliseconds per
copy, the median of `--repeats` copies each, the two alternated so that the machine's drift
touches both alike; one thread. Every model's copy is checked to hold the same weights.

    python bench/model_copy.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
import torchvision

from edgeopt.model_copy import copy_model

MODELS = {
    "timm mobileone_s0": lambda: timm.create_model("mobileone_s0", num_classes=10),
    "timm efficientvit_m0": lambda: timm.create_model("efficientvit_m0", num_classes=10),
    "timm ghostnet_100": lambda: timm.create_model("ghostnet_100", num_classes=10),
    "torchvision mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "torchvision efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "torchvision resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "torchvision inception_v3": lambda: torchvision.models.inception_v3(num_classes=10, aux_logits=False,
                                                                         init_weights=False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| model | modules | parameters | deepcopy, ms | copy_model, ms | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, build in MODELS.items():
        model = build().eval()
        times = {copy.deepcopy: [], copy_model: []}
        for _ in range(args.repeats):
            for copier, seconds in times.items():
                started = time.perf_counter()
                copied = copier(model)
                seconds.append(time.perf_counter() - started)
                assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), model.state_dict().values()))
        deep, ours = (statistics.median(times[f]) * 1e3 for f in (copy.deepcopy, copy_model))
        print(f"| {name} | {sum(1 for _ in model.modules())} | {sum(t.numel() for t in model.parameters()) / 1e6:.1f}M "
              f"| {deep:.1f} | {ours:.1f} | {deep / ours:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
