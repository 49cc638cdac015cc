"""How long building a search space and applying a plan take (they bound a search's trial rate).

    python bench/space_apply.py --arch resnet18 --input-size 224 --repeats 7
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

from edgeopt import NM, SearchSpace, apply_plan


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calib-batches", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=1000).eval()
    example = torch.randn(1, 3, args.input_size, args.input_size)
    calib = [torch.randn(args.batch, 3, args.input_size, args.input_size) for _ in range(args.calib_batches)]

    space_s, space_max = _median_seconds(lambda: SearchSpace.from_model(model, example), args.repeats)
    space = SearchSpace.from_model(model, example)
    uniform = space.uniform(w_bits=8, a_bits=8, keep_ratio=0.75, nm=NM(n=2, m=4))
    apply_s, apply_max = _median_seconds(
        lambda: apply_plan(model, uniform, example, calib_data=calib, space=space), args.repeats)
    plans = iter([space.sample(seed=s) for s in range(args.repeats)])
    random_s, random_max = _median_seconds(
        lambda: apply_plan(model, next(plans), example, calib_data=calib, space=space), args.repeats)
    alone_s, alone_max = _median_seconds(
        lambda: apply_plan(model, uniform, example, calib_data=calib), args.repeats)

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    print(f"{args.arch} @ {args.input_size}px, {len(space.layers)} layers, {len(space.groups)} groups, "
          f"calib {args.calib_batches}x{args.batch}, {args.repeats} repeats (median / max seconds)")
    print(f"SearchSpace.from_model             {space_s:6.2f} / {space_max:.2f}")
    print(f"apply_plan uniform w8a8 0.75 2:4    {apply_s:6.2f} / {apply_max:.2f}   (space= given)")
    print(f"apply_plan random plans             {random_s:6.2f} / {random_max:.2f}   (space= given)")
    print(f"apply_plan uniform, no space=       {alone_s:6.2f} / {alone_max:.2f}")


if __name__ == "__main__":
    main()
