"""Where one search trial's time goes on host: the plans of one of prove.py's searches, each
compressed (apply_plan with its BatchNorm re-estimation and calibration), costed, timed on the
reference clock and scored on the 2,000 proxy images, as `edgeopt.search.objective.Context.measure`
does, part by part: a trial scored in full (since 224d92b a search stops the proxy early on a trial
that cannot reach the front; `bench/search_cost.py` measures that). Medians over the plans, in
seconds; the CPU's name and whether int8 takes reduce_range there (x86 without VNNI) are printed.

    python bench/trial_parts.py --study ~/.cache/edgeopt-bench/prove/edgenet-host-no-vnni/edgeopt-70 --plans 12

Run it alone: it is a timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import _cpu_name  # noqa: E402
from bench.prove_base import DEFAULT_CACHE, cifar_data, load_base  # noqa: E402
from edgeopt import ModelPlan, SearchSpace  # noqa: E402
from edgeopt.evaluators.cost import model_cost  # noqa: E402
from edgeopt.evaluators.cpu import int8_needs_reduce_range  # noqa: E402
from edgeopt.evaluators.latency import ReferenceClock  # noqa: E402
from edgeopt.evaluators.onnx_export import export_onnx  # noqa: E402
from edgeopt.search.optimize import SearchConfig, _calibration_batches  # noqa: E402
from edgeopt.search.study import finished, make_storage, trial_plan  # noqa: E402
from edgeopt.search.training import evaluate  # noqa: E402
from edgeopt.spaces.apply import apply_plan  # noqa: E402


def study_plans(folder: Path, count: int) -> list[ModelPlan]:
    """The plans of the first `count` finished trials of the study in `folder` (duplicates are
    pruned, so each is measured once), in trial order."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="edgeopt", storage=make_storage(None, folder))
    return [trial_plan(t) for t in finished(study)][:count]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, required=True, help="a prove.py search folder (holds study.journal)")
    p.add_argument("--base", default="edgenet", choices=("edgenet", "resnet20"))
    p.add_argument("--plans", type=int, default=12)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)
    data = cifar_data(args.cache)
    model = load_base(args.base).eval()
    example = data.example_input()
    space = SearchSpace.from_model(model, example)
    search = SearchConfig()  # the search's own calibration images: its default count, drawn by seed 0
    calib = _calibration_batches(data.train, batches=search.calib_batches, batch_size=search.calib_batch_size,
                                 seed=0)
    reduce_range = int8_needs_reduce_range()
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, example, Path(tmp) / "base.onnx")
        clock = ReferenceClock(Path(tmp) / "base.onnx", threads=1)
    rows = []
    for i, plan in enumerate(study_plans(args.study, args.plans)):
        t0 = time.perf_counter()
        compressed = apply_plan(model, plan, example, calib_data=calib, space=space, reduce_range=reduce_range)
        t1 = time.perf_counter()
        model_cost(compressed, example)
        t2 = time.perf_counter()
        latency = clock.measure_model(compressed, example).total_ms
        t3 = time.perf_counter()
        accuracy = evaluate(compressed, data.proxy)
        t4 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))
        print(f"plan {i}: compress {t1 - t0:.2f}, cost {t2 - t1:.2f}, latency {t3 - t2:.2f}, proxy {t4 - t3:.2f}, "
              f"whole {t4 - t0:.2f} s ({accuracy:.1f}% proxy, {latency:.3f} ms)", flush=True)
    medians = [statistics.median(column) for column in zip(*rows)]
    print(f"medians over {len(rows)} plans: compress {medians[0]:.2f}, cost {medians[1]:.2f}, latency {medians[2]:.2f}, "
          f"proxy {medians[3]:.2f}, whole {medians[4]:.2f} s")
    print(f"machine: {_cpu_name()}, reduce_range {reduce_range}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
