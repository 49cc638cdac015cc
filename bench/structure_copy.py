"""What a structure copy costs on the meta device and as a real copy (edgeopt.spaces.space.structure_copy).

A structure copy serves work that needs shapes only (the input sizes a model runs at, the windows
of its residual blocks, test-pruning its groups). On the meta device no weight is copied or
computed, but every op runs through PyTorch's Python decompositions; a real copy copies the
weights and computes. For each model: copy plus one forward pass of batch 1, both ways, the
median of `--repeats`, one thread; then `SearchSpace.from_model` as the library runs it (which
picks by `META_FROM_PARAMETERS`, and for a large model whose copy serves many passes, such as
test-pruning its groups one by one, by which pass took less).

    python bench/structure_copy.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
import torchvision
from torch import nn

from edgeopt import SearchSpace
from edgeopt.spaces.space import META_FROM_PARAMETERS, meta_copy

MODELS = {  # name: (builder, input size)
    "timm mobileone_s0 at 32x32": (lambda: timm.create_model("mobileone_s0", num_classes=10), 32),
    "timm rexnet_100 at 32x32": (lambda: timm.create_model("rexnet_100", num_classes=10), 32),
    "timm cspresnet50 at 32x32": (lambda: timm.create_model("cspresnet50", num_classes=10), 32),
    "torchvision efficientnet_b0 at 224x224": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 224),
    "torchvision resnet50 at 224x224": (lambda: torchvision.models.resnet50(num_classes=10), 224),
    "timm vit_base_patch16_224 at 224x224": (lambda: timm.create_model("vit_base_patch16_224", num_classes=10), 224),
}


def on_meta(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        meta_copy(model)(x.to("meta"))


def real_copy(model: nn.Module, x: torch.Tensor) -> None:
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        work(x)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | parameters | meta copy + run (s) | real copy + run (s) | from_model (s) |")
    print("|---|---|---|---|---|")
    for name, (build, size) in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        x = torch.randn(1, 3, size, size)
        params = sum(p.numel() for p in model.parameters())
        meta = median_seconds(lambda: on_meta(model, x), args.repeats)
        real = median_seconds(lambda: real_copy(model, x), args.repeats)
        started = time.perf_counter()
        SearchSpace.from_model(model, x)
        space_s = time.perf_counter() - started
        way = "meta" if params >= META_FROM_PARAMETERS else "real"
        print(f"| {name} | {params / 1e6:.1f}M ({way}) | {meta:.2f} | {real:.2f} | {space_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
