"""How much faster is one ONNX model than another on this CPU, on a machine whose speed drifts?

Both models run in one process, alternately (A, B, A, B, ...), one onnxruntime thread each, so
a slow stretch of the machine hits both alike; the figure is the median of B's time over A's,
run by run, with its interquartile range.

    python bench/paired_latency.py A.onnx B.onnx [--runs 4000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeopt.errors import EdgeoptError  # noqa: E402
from edgeopt.evaluators.latency import _feed, make_session  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--runs", type=int, default=4000)
    args = parser.parse_args()
    try:
        sessions = [make_session(path, threads=1) for path in (args.a, args.b)]
    except EdgeoptError as exc:
        sys.exit(f"error: {exc}")
    feeds = [_feed(session, 1) for session in sessions]
    for _ in range(100):  # warm-up: allocation, weight prepacking
        for session, feed in zip(sessions, feeds):
            session.run(None, feed)
    times = np.zeros((args.runs, 2))
    for i in range(args.runs):
        for j, (session, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            session.run(None, feed)
            times[i, j] = time.perf_counter() - start
    ratio = times[:, 1] / times[:, 0]
    q25, q50, q75 = np.percentile(ratio, [25, 50, 75])
    a_ms, b_ms = np.median(times, axis=0) * 1e3
    print(f"{args.b.name} / {args.a.name}: median time ratio {q50:.3f} (interquartile {q25:.3f}-{q75:.3f}); "
          f"medians {a_ms:.3f} ms and {b_ms:.3f} ms over {args.runs} alternating runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
