"""How much faster is one ONNX model than another on this CPU, on a machine whose speed drifts?

Both models run in one process, alternately (A, B, A, B, ...), one onnxruntime thread each, so
a slow stretch of the machine hits both alike; the figure is the median of B's time over A's,
run by run, with its interquartile range. With `turn=2` each model runs twice in its turn and
the second run is timed, as `edgeopt.evaluators.latency.ReferenceClock` times: then each model
finds its weights in the caches as a model run alone in a loop does. Single alternating runs
(`turn=1`, the default, as the figures of BENCHMARKS.md before 2026-12-03 were taken) time each
model just after the other has evicted it, which costs a small model relatively more.

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


def paired_ratio(a: Path, b: Path, *, runs: int = 4000, turn: int = 1) -> dict:
    """B's time over A's: median and interquartile range of the run-by-run ratio, and each
    model's median ms; each model runs `turn` times in its turn, the last one timed. Raises
    EdgeoptError for a missing or unreadable model."""
    sessions = [make_session(path, threads=1) for path in (a, b)]
    feeds = [_feed(session, 1) for session in sessions]
    for _ in range(100):  # warm-up: allocation, weight prepacking
        for session, feed in zip(sessions, feeds):
            session.run(None, feed)
    times = np.zeros((runs, 2))
    for i in range(runs):
        for j, (session, feed) in enumerate(zip(sessions, feeds)):
            for _ in range(turn - 1):
                session.run(None, feed)
            start = time.perf_counter()
            session.run(None, feed)
            times[i, j] = time.perf_counter() - start
    q25, q50, q75 = np.percentile(times[:, 1] / times[:, 0], [25, 50, 75])
    a_ms, b_ms = np.median(times, axis=0) * 1e3
    return {"ratio": round(float(q50), 3), "interquartile": [round(float(q25), 3), round(float(q75), 3)],
            "a_ms": round(float(a_ms), 3), "b_ms": round(float(b_ms), 3), "runs": runs, "turn": turn}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--turn", type=int, default=1, help="runs of each model per turn, the last timed (2: warm, "
                                                             "as a model run alone in a loop)")
    args = parser.parse_args()
    try:
        r = paired_ratio(args.a, args.b, runs=args.runs, turn=args.turn)
    except EdgeoptError as exc:
        sys.exit(f"error: {exc}")
    print(f"{args.b.name} / {args.a.name}: median time ratio {r['ratio']:.3f} (interquartile "
          f"{r['interquartile'][0]:.3f}-{r['interquartile'][1]:.3f}); medians {r['a_ms']:.3f} ms and "
          f"{r['b_ms']:.3f} ms over {args.runs} alternating runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
