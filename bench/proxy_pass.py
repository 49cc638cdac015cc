"""Seconds of one proxy pass of a search trial on the trained edgenet: a uniform int8 plan at keep
0.75 (pi4's full-range weights), scored on the 2,000 proxy images, as `HeldOutAccuracy` scores
every trial. Run it on two commits in turn (ABBA) to compare the integer layers' emulation.

    python bench/proxy_pass.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prove_base import DEFAULT_CACHE, cifar_data, load_base  # noqa: E402
from edgeopt import SearchSpace  # noqa: E402
from edgeopt.spaces.apply import apply_plan  # noqa: E402
from edgeopt.search.training import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    data = cifar_data(args.cache)
    model = load_base("edgenet").eval()
    example = data.example_input()
    space = SearchSpace.from_model(model, example)
    calib = [data.train.tensors[0][i:i + 64] for i in range(0, 256, 64)]
    plan = space.uniform(w_bits=8, a_bits=8, keep_ratio=0.75)
    compressed = apply_plan(model, plan, example, calib_data=calib, space=space)
    accuracy = evaluate(compressed, data.proxy)  # also the warm-up
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        evaluate(compressed, data.proxy)
        seconds.append(time.perf_counter() - started)
    print(f"proxy top-1 {accuracy:.2f}%, one pass median {statistics.median(seconds):.3f} s "
          f"({', '.join(f'{s:.3f}' for s in seconds)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
