"""Measured latency: run an ONNX model with onnxruntime on this machine and time it.

A shared machine is noisy: another process on the same core (or its hyperthread sibling, or the
shared cache) slows some runs by 30-60% for seconds at a time, so single timings and even plain
medians drift. `measure_latency` therefore

- pins the thread count (one intra-op thread by default: a spinning thread pool on a busy 2-core
  machine measures the neighbour, not the model);
- warms up (first runs allocate, prepack weights and fault pages in);
- keeps sampling for a minimum time as well as a minimum count, so that a short burst of
  interference cannot own the whole measurement;
- treats runs more than `outlier_tol` above the 10th percentile as interference, drops them and
  says how many it dropped;
- reports the median of the rest with its spread (interquartile range), and the raw median too.

onnxruntime is imported lazily: `import edgeopt` stays free of it.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeopt.deploy.run import session_options
from edgeopt.errors import EdgeoptError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edgeopt.hw_models.estimate import LatencyEstimate


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """Timings of one model in ms. `median_ms` is over the runs kept after outlier removal."""

    median_ms: float
    spread_ms: float  # interquartile range of the kept runs
    p10_ms: float
    min_ms: float
    raw_median_ms: float  # over every timed run, interference included
    runs: int  # timed runs
    outliers: int  # runs dropped as interference
    threads: int

    @property
    def kept(self) -> int:
        return self.runs - self.outliers


def _numpy_dtype(ort_type: str) -> np.dtype:
    table = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
    if ort_type not in table:
        raise EdgeoptError(f"Cannot make a test input of type {ort_type}; pass `inputs=` yourself.")
    return np.dtype(table[ort_type])


def _feed(session, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in arg.shape]
        dtype = _numpy_dtype(arg.type)
        if np.issubdtype(dtype, np.floating):
            feed[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[arg.name] = np.zeros(shape, dtype=dtype)
    return feed


def make_session(model: str | Path | bytes, *, threads: int = 1):
    """An onnxruntime CPU session with a fixed thread count and every graph optimization on."""
    import onnxruntime as ort  # heavy: only when measuring

    if threads < 1:
        raise EdgeoptError(f"threads must be at least 1, got {threads}.")
    options = session_options(ort, threads)  # as the deployed model runs
    source = model if isinstance(model, bytes) else str(model)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise EdgeoptError(f"No ONNX file at {model}; export one first (edgeopt.export_onnx).")
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a bad file
        raise EdgeoptError(f"onnxruntime could not load the model ({type(exc).__name__}: "
                           f"{str(exc)[:300]}). Is it a valid ONNX file?") from None


def summarize(samples_ms: list[float] | np.ndarray, *, threads: int, outlier_tol: float = 0.3) -> Measurement:
    """Robust statistics of timed runs: runs above (1 + outlier_tol) x the 10th percentile are
    interference and are dropped (a small absolute margin keeps sub-0.1 ms runs from losing
    ordinary jitter)."""
    times = np.asarray(samples_ms, dtype=float)
    if times.size == 0:
        raise EdgeoptError("No timed runs to summarize.")
    p10 = float(np.percentile(times, 10))
    kept = times[times <= p10 * (1 + outlier_tol) + 0.005]
    q25, q75 = np.percentile(kept, [25, 75])
    return Measurement(
        median_ms=float(np.median(kept)), spread_ms=float(q75 - q25), p10_ms=p10,
        min_ms=float(times.min()), raw_median_ms=float(np.median(times)), runs=int(times.size),
        outliers=int(times.size - kept.size), threads=threads,
    )


def time_session(session, feed: dict[str, np.ndarray], *, repeats: int = 50, warmup: int = 5,
                 min_time_s: float = 0.3, max_time_s: float = 10.0) -> list[float]:
    """Wall-clock ms of each timed run: at least `repeats` runs and `min_time_s` seconds, unless
    `max_time_s` runs out first (at least 5 runs are always timed)."""
    run = session.run
    start = time.perf_counter()
    done = 0
    while done < warmup or (time.perf_counter() - start < 0.05 and done < 50):
        run(None, feed)
        done += 1
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run(None, feed)
        t1 = time.perf_counter()
        samples.append((t1 - t0) * 1e3)
        elapsed = t1 - start
        if len(samples) >= repeats and elapsed >= min_time_s:
            break
        if elapsed >= max_time_s and len(samples) >= 5:
            break
    return samples


def measure_latency(onnx_path: str | Path | bytes, *, threads: int = 1, repeats: int = 50,
                    warmup: int = 5, min_time_s: float = 0.3, max_time_s: float = 10.0,
                    batch: int = 1, inputs: dict[str, np.ndarray] | None = None,
                    outlier_tol: float = 0.3) -> Measurement:
    """Median latency of one inference of an ONNX model (path or serialized bytes) with
    onnxruntime on this CPU, its spread, and how many runs were dropped as interference."""
    if repeats < 1:
        raise EdgeoptError(f"repeats must be at least 1, got {repeats}.")
    session = make_session(onnx_path, threads=threads)
    feed = inputs if inputs is not None else _feed(session, batch)
    samples = time_session(session, feed, repeats=repeats, warmup=warmup,
                           min_time_s=min_time_s, max_time_s=max_time_s)
    return summarize(samples, threads=threads, outlier_tol=outlier_tol)


def measure_model_latency(model: nn.Module, example_input: torch.Tensor, *, threads: int = 1,
                          repeats: int = 50, min_time_s: float = 0.3) -> LatencyEstimate:
    """Export `model` (plain or made by apply_plan) to ONNX and measure it here: the
    "measured" latency source, for targets that can be measured on this machine (host)."""
    return exported_latency(model, example_input, lambda path: measure_latency(
        path, threads=threads, repeats=repeats, min_time_s=min_time_s))


def exported_latency(model: nn.Module, example_input: torch.Tensor,
                     measure: Callable[[Path], Measurement]) -> LatencyEstimate:
    """`model` exported to a temporary ONNX file and timed there by `measure`."""
    from edgeopt.evaluators.onnx_export import export_onnx
    from edgeopt.hw_models.estimate import LatencyEstimate

    with tempfile.TemporaryDirectory() as tmp:
        m = measure(export_onnx(model, example_input[:1], Path(tmp) / "model.onnx"))
    return LatencyEstimate(total_ms=m.median_ms, layers=(), source="measured", target="host",
                           spread_ms=m.spread_ms)


class ReferenceClock:
    """Latencies on this machine read against one reference model (the uncompressed base) run in
    turn with each candidate.

    A VM's clock is not steady: the same ONNX file measured 0.77 ms and 1.03 ms minutes apart here,
    and a search that timed its trials at different moments compared them across those phases
    (BENCHMARKS.md, "First run on the trained base models"). Slow phases last seconds, so the
    reference and the candidate, run in turn, see the same phase: the ratio of their times in a
    turn is steady where each time is not (bench/clock.py measures by how much).
    A second effect is not the clock's: an int8 model with float islands (edgeopt's residual sums)
    runs 0.75 or 1.1 ms here depending on where its input buffer lies, steadily for one buffer
    and at random across them, so the pairs are spread over `sessions` fresh sessions and inputs.
    A candidate's latency is the median of those ratios times the reference's time in a calm phase
    (`reference_ms`: the lowest median of several passes, measured once per study and shared by
    its workers), so every trial of a study, in any worker and at any moment, is read on one
    scale: what a quiet machine shows."""

    def __init__(self, reference: str | Path | bytes, *, threads: int = 1, reference_ms: float | None = None,
                 sessions: int = 3, min_pairs: int = 20, min_time_s: float = 0.1, max_time_s: float = 3.0) -> None:
        self.threads, self.sessions = threads, sessions
        self.min_pairs, self.min_time_s, self.max_time_s = min_pairs, min_time_s, max_time_s
        self._reference = make_session(reference, threads=threads)
        self._reference_feed = _feed(self._reference, 1)
        self.reference_ms = float(reference_ms) if reference_ms is not None else self.calibrate()

    def calibrate(self, passes: int = 5) -> float:
        """The reference's median in its fastest of `passes` passes: its time on a calm machine."""
        return min(summarize(time_session(self._reference, self._reference_feed, repeats=30, min_time_s=0.2),
                             threads=self.threads).median_ms for _ in range(passes))

    def ratios(self, session, feed, reference_feed) -> list[float]:
        """Candidate time over reference time, one turn of each model per ratio, for at least
        `min_pairs` ratios and `min_time_s` seconds (or until `max_time_s`)."""
        reference, candidate = self._reference.run, session.run
        time_session(session, feed, repeats=5, min_time_s=0.0)  # warm-up: allocation, prepacking
        ratios: list[float] = []
        start = time.perf_counter()
        while True:
            # Each model runs twice in its turn and the second run is timed: the first brings its
            # weights back into the caches the other model used, as a model run alone finds them.
            reference(None, reference_feed)
            t0 = time.perf_counter()
            reference(None, reference_feed)
            t1 = time.perf_counter()
            candidate(None, feed)
            t2 = time.perf_counter()
            candidate(None, feed)
            t3 = time.perf_counter()
            ratios.append((t3 - t2) / (t1 - t0))
            elapsed = t3 - start
            if (len(ratios) >= self.min_pairs and elapsed >= self.min_time_s) or elapsed >= self.max_time_s:
                return ratios

    def measure(self, model: str | Path | bytes) -> Measurement:
        """The model's latency on this machine's calm clock (median_ms) and the spread of its
        pairwise ratio on the same scale (spread_ms, interquartile)."""
        ratios: list[float] = []
        for i in range(self.sessions):
            session = make_session(model, threads=self.threads)
            ratios += self.ratios(session, _feed(session, 1, seed=i), _feed(self._reference, 1, seed=i))
        ratios = np.asarray(ratios) * self.reference_ms
        q25, median, q75 = np.percentile(ratios, [25, 50, 75])
        return Measurement(median_ms=float(median), spread_ms=float(q75 - q25),
                           p10_ms=float(np.percentile(ratios, 10)), min_ms=float(ratios.min()),
                           raw_median_ms=float(median), runs=int(ratios.size), outliers=0, threads=self.threads)

    def measure_model(self, model: nn.Module, example_input: torch.Tensor) -> LatencyEstimate:
        """Export `model` to ONNX and read its latency on this clock: the "measured" source."""
        return exported_latency(model, example_input, self.measure)


def export_calibration_plans(model: nn.Module, example_input: torch.Tensor, directory: str | Path, *,
                             precisions: Sequence[tuple[int, int]], keep_ratios: Sequence[float] = (1.0, 0.5),
                             random_plans: int = 12, round_to: int = 1,
                             seed: int = 10_000) -> list[tuple[list, Path]]:
    """The plans a profile is calibrated on, applied and exported to `directory`: uniform fp32
    and int8 plans at each keep ratio, plus `random_plans` random plans over the profiled
    precisions (layers mixing them, as a search visits), pruned with `round_to` as the target will
    prune. Uniform weight-only or activation-only int8 plans are left out: onnxruntime fuses them
    unlike any mixed plan, and fitting them biased the mixed ones (BENCHMARKS.md). Returns
    (traced layers, ONNX path) per plan."""
    import torch

    from edgeopt.evaluators.cpu import int8_needs_reduce_range
    from edgeopt.evaluators.onnx_export import export_onnx
    from edgeopt.layers import trace_layers
    from edgeopt.spaces.apply import apply_plan
    from edgeopt.spaces.space import Knobs, SearchSpace

    x = example_input[:1]
    space = SearchSpace.from_model(model, x)
    knobs = Knobs(w_bits=sorted({w for w, _ in precisions} | {32}), a_bits=sorted({a for _, a in precisions} | {32}),
                  keep_ratios=space.knobs.keep_ratios, nm=(None,), sparsities=(0.0,),  # zeros run dense
                  dynamic_kinds=())  # the profiled precisions are static ones
    space = space.restrict(knobs)
    uniform = [p for p in precisions if p in ((32, 32), (8, 8))] or list(precisions)[:1]
    plans = [space.uniform(w_bits=w, a_bits=a, keep_ratio=k) for w, a in uniform for k in keep_ratios]
    plans += [space.sample(seed + i) for i in range(random_plans)]
    generator = torch.Generator().manual_seed(seed)
    calib = [torch.randn((4, *x.shape[1:]), generator=generator) for _ in range(2)]
    out = []
    for i, plan in enumerate(plans):
        compressed = apply_plan(model, plan, x, calib_data=calib, round_to=round_to,
                                reduce_range=int8_needs_reduce_range(), space=space)
        out.append((trace_layers(compressed, x), export_onnx(compressed, x, Path(directory) / f"plan{i}.onnx")))
    return out


def calibration_samples(model: nn.Module, example_input: torch.Tensor, *,
                        precisions: Sequence[tuple[int, int]], keep_ratios: Sequence[float] = (1.0, 0.5),
                        random_plans: int = 12, round_to: int = 1, threads: int = 1, passes: int = 2,
                        seed: int = 10_000,
                        progress: Callable[[int, int], None] | None = None) -> list[tuple[list, float]]:
    """Whole-model latencies measured here for the calibration plans of `model`
    (`export_calibration_plans`), to calibrate a profile (`edgeopt.hw_models.calibrate_table`).
    Each plan is measured in `passes` passes over all plans and keeps its lowest median, as the
    profile does: a burst of load from another process then cannot bias one plan."""
    with tempfile.TemporaryDirectory() as tmp:
        plans = export_calibration_plans(model, example_input, tmp, precisions=precisions,
                                         keep_ratios=keep_ratios, random_plans=random_plans,
                                         round_to=round_to, seed=seed)
        total, done = len(plans) * passes, 0
        best = [math.inf] * len(plans)
        for _ in range(passes):
            for i, (_, path) in enumerate(plans):
                best[i] = min(best[i], measure_latency(path, threads=threads, repeats=30, min_time_s=0.3).median_ms)
                done += 1
                if progress is not None:
                    progress(done, total)
    return [(layers, ms) for (layers, _), ms in zip(plans, best)]
