"""`edgeopt.optimize`: search, fine-tune, select and export, end to end."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from edgeopt.budget import Budget, parse_budget
from edgeopt.canonical import canonical
from edgeopt.deploy import write_bundle
from edgeopt.errors import EdgeoptError
from edgeopt.evaluators.cost import model_cost
from edgeopt.evaluators.cpu import int8_needs_reduce_range
from edgeopt.evaluators.latency import ReferenceClock, measure_latency
from edgeopt.evaluators.onnx_export import export_onnx
from edgeopt.evaluators.node_profile import profile_layers
from edgeopt.hw_models.estimate import LatencyEstimate, estimate_latency
from edgeopt.hw_models.targets import get_target
from edgeopt.plan import INPUT_SCALES, NM, SMALL_KERNEL, SURGERY_KINDS, ModelPlan, Surgery
from edgeopt.layers import trace_layers
from edgeopt.search.accounting import LAYERS_FILE, account_layers, report_lines, write_layers_csv
from edgeopt.search.allocate import INT8, allocate, fit
from edgeopt.search.finetune import FinetuneConfig, Finetuned, FinetuneStore, finetune, screen, screening
from edgeopt.search.tasks import FinetuneTasks
from edgeopt.search.objective import BEHIND_Z, FAR_OVER, Context, HeldOutAccuracy, Objective
from edgeopt.search.report import pareto_info, plot_pareto_html, plot_pareto_png, trials_frame, write_report
from edgeopt.search.models import default_cache_dir
from edgeopt.search.sensitivity import FILE_NAME as SENSITIVITY_FILE
from edgeopt.search.sensitivity import SHARED_FOLDER as SHARED_SENSITIVITY
from edgeopt.search.sensitivity import SensitivityProxy, measure_sensitivity
from edgeopt.search.cascade import SMALL_MEMBER_EPOCHS, choose_cascade, on_validation, small_members, write_cascade
from edgeopt.search.select import Candidate, closest, finalists, finetune_order, pareto_front, select
from edgeopt.search.study import (CONSTRAINTS, METRICS, fail_dead_trials, finished, fingerprint, make_sampler,
                                  make_storage, open_study, plan_params, trial_plan, worker_id)
from edgeopt.search.training import evaluate
from edgeopt.spaces.quantize import NUMERICS_VERSION, compressed_layers
from edgeopt.input_size import input_for, preprocessing_for, resize_text
from edgeopt.spaces.space import Knobs, SearchSpace

log = logging.getLogger(__name__)


PROXIES = ("heldout", "sensitivity")
STARTS = ("allocated", "hand", "none")
REFERENCE_MS = "host_reference_ms"  # study attribute: the reference clock's calm time of the base


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """How the Optuna search runs."""

    trials: int = 40
    sampler: str = "tpe"  # tpe, nsga2 or random (edgeopt.search.study says why tpe)
    seed: int = 0
    storage: str | None = None  # any Optuna storage URL; default: a journal file in the output folder
    study_name: str = "edgeopt"
    calib_batches: int = 4
    calib_batch_size: int = 32
    # "heldout": each candidate evaluated on the proxy split; "sensitivity": each layer's knobs
    # measured once, a candidate scored from them (cheap trials on large models).
    proxy: str = "heldout"
    sensitivity_images: int = 512
    # Where the search starts: "allocated" (the hand plans and the plans allocated for the budget),
    # "hand" (the hand plans only: the allocation's cost grows with the model, BENCHMARKS.md), or
    # "none" (the sampler alone, as a baseline).
    start: str = "allocated"
    # The shares of the given input size a plan may run at (edgeopt.spaces.resolution); (1.0,)
    # keeps the input size fixed.
    input_scales: tuple[float, ...] = INPUT_SCALES
    depth: bool = True  # residual blocks with an identity shortcut may be dropped
    surgery: bool = True  # the model surgery the target declares (activations, gates, kernels) is searched
    # host: the base model's calm time on this machine in ms, where it is already known (several
    # runs compared on one scale); None times it when the study is opened (ReferenceClock).
    reference_ms: float | None = None

    def __post_init__(self) -> None:
        if self.reference_ms is not None and not self.reference_ms > 0:
            raise EdgeoptError(f"reference_ms must be a time in ms above 0, got {self.reference_ms!r}.")
        try:
            scales = Knobs(input_scales=self.input_scales).input_scales
        except EdgeoptError as exc:
            raise EdgeoptError(f"--input-scales: {exc}") from None
        object.__setattr__(self, "input_scales", scales)
        if self.start not in STARTS:
            raise EdgeoptError(f"Unknown start {self.start!r}; choose one of {', '.join(STARTS)}.")
        if self.proxy not in PROXIES:
            raise EdgeoptError(f"Unknown proxy {self.proxy!r}; choose one of {', '.join(PROXIES)}.")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise EdgeoptError(f"--trials must be a whole number of at least 1, got {self.trials!r}; the "
                               "search starts with the plans a user would try by hand, so 6 or more is sensible.")


@dataclass(frozen=True)
class OptimizeResult:
    trials: pd.DataFrame
    pareto: list[Candidate]
    selected: Candidate | None  # None when no candidate met every budget
    model: nn.Module | None  # the selected compressed model
    plan: ModelPlan | None
    out_dir: Path
    summary: dict

    @property
    def met_budget(self) -> bool:
        return self.selected is not None


def target_knobs(target, *, size_matters: bool) -> Knobs:
    """A knob counts only where the target's runtime turns it into speed; with a size budget,
    everything that shrinks the stored model counts too."""
    if size_matters:
        return Knobs()
    fast = target.accelerates
    # Only pairs the runtime executes as they are: any other pair runs at a wider precision and
    # pays the quantization's accuracy for no speed (on pi4, w8a32 runs as float).
    pairs = [(w, a) for w in fast.w_bits for a in fast.a_bits if target.runs_as(w, a, None)[:2] == (w, a)]
    # Dynamic-range int8 only on the layer kinds where the target measured it to pay.
    return Knobs(w_bits=(32, *[b for b in fast.w_bits if b != 32]),
                 a_bits=(32, *[b for b in fast.a_bits if b != 32]),
                 nm=(None, *[p for p in fast.nm if p is not None]),
                 sparsities=(0.0,),  # unstructured sparsity runs no faster on any target here
                 precisions=pairs, dynamic_kinds=fast.dynamic_kinds,
                 surgery=fast.surgery, activations=(fast.activation,))


def _calibration_batches(dataset, *, batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[: batches * batch_size]
    images = torch.stack([dataset[int(i)][0] for i in order])
    return list(images.split(batch_size))


def _candidates(study: optuna.Study) -> list[Candidate]:
    out = []
    for trial in finished(study):
        m = trial.user_attrs[METRICS]
        out.append(Candidate(
            trial=trial.number, plan=trial_plan(trial), proxy_accuracy=m["proxy_accuracy"],
            latency_ms=m["latency_ms"], macs=m["macs"], effective_macs=m["effective_macs"],
            bytes=m["bytes"], violations=tuple(trial.user_attrs[CONSTRAINTS]), proxy_images=m.get("proxy_images"),
        ))
    return out


def _run_trials(study: optuna.Study, objective: Objective, trials: int, *, progress: bool) -> None:
    done = len(finished(study))
    if done >= trials:
        return
    bar = tqdm(total=trials, initial=done, desc="search", unit="trial", disable=not progress, file=sys.stderr)
    if done:
        bar.write(f"Resuming: {done} trials already in the study.")

    def stop_when_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        count = len(finished(study))
        bar.n = min(count, trials)
        if trial.state == optuna.trial.TrialState.COMPLETE and CONSTRAINTS in trial.user_attrs:
            m = trial.user_attrs[METRICS]
            bar.set_postfix(acc=f"{m['proxy_accuracy']:.1f}", ms=f"{m['latency_ms']:.2f}")
        bar.refresh()
        if count >= trials:
            study.stop()

    # Duplicates are pruned and not counted; the cap only guards against a space too small to
    # hold `trials` distinct plans.
    try:
        study.optimize(objective, n_trials=(trials - done) * 10, callbacks=[stop_when_done],
                       gc_after_trial=False, catch=())
    finally:
        bar.close()


def prepare(model: nn.Module, data, *, target, budgets: tuple[Budget, ...], search: SearchConfig,
            out_dir: Path, seed: int, progress: bool = False) -> tuple[Context, optuna.Study]:
    """The search's context and its study (opened or resumed); the same in every worker."""
    example = data.example_input()
    base = model_cost(model, example)
    size_matters = any(b.metric == "bytes" for b in budgets)
    space = (SearchSpace.from_model(model, example).restrict(target_knobs(target, size_matters=size_matters))
             .restrict(Knobs(input_scales=search.input_scales, depth=search.depth,
                             surgery=SURGERY_KINDS if search.surgery else ())))
    calib = _calibration_batches(data.train, batches=search.calib_batches, batch_size=search.calib_batch_size,
                                 seed=search.seed)
    reduce_range = target.measurable and int8_needs_reduce_range()
    if search.proxy == "sensitivity":
        table = _sensitivity_table(model, space, example, calib, target=target, reduce_range=reduce_range,
                                   data=data, search=search, out_dir=out_dir, progress=progress)
        proxy = SensitivityProxy(table, space)
    else:
        proxy = HeldOutAccuracy(data.proxy)
    directions = ["maximize", "minimize"] + (["minimize"] if size_matters else [])
    made_for = {
        "target": f"{target.name} ({target.latency_note()})", "budgets": [str(b) for b in budgets],
        "model": fingerprint(type(model).__name__, *model.state_dict().values()), "data": data.fingerprint,
        "input_size": list(example.shape[1:]), "knobs": repr(space.knobs), "proxy": search.proxy,
        "calibration": [search.seed, search.calib_batches, search.calib_batch_size],
        "numerics": NUMERICS_VERSION,  # what a quantized trial computes, and so its latency
    }
    study = open_study(storage=make_storage(search.storage, out_dir), study_name=search.study_name,
                       directions=directions, sampler=make_sampler(search.sampler, seed=seed, trials=search.trials),
                       made_for=made_for,
                       metric_names=["accuracy", "latency_ms"] + (["bytes"] if size_matters else []))
    clock = (_reference_clock(model, example, target, study, given_ms=search.reference_ms, progress=progress)
             if target.measurable else None)
    context = Context(model=model, space=space, example_input=example, calib=calib, target=target,
                      budgets=budgets, base=base, proxy=proxy, reduce_range=reduce_range, clock=clock)
    return context, study


def _sensitivity_table(model: nn.Module, space: SearchSpace, example: torch.Tensor, calib: list, *, target,
                       reduce_range: bool, data, search: SearchConfig, out_dir: Path, progress: bool):
    """The search's sensitivity table (`--proxy sensitivity` and the allocation use the same one):
    kept in `out_dir` for workers and a resumed run, and once complete in the shared cache, where
    a run in another output folder with the same fingerprint reads it."""
    return measure_sensitivity(model, space, example, calib=calib, dataset=data.proxy,
                               round_to=target.accelerates.channel_multiple, reduce_range=reduce_range,
                               images=search.sensitivity_images, cache=out_dir / SENSITIVITY_FILE,
                               shared_dir=default_cache_dir() / SHARED_SENSITIVITY, progress=progress)


def _reference_clock(model: nn.Module, example: torch.Tensor, target, study: optuna.Study, *,
                     given_ms: float | None, progress: bool) -> ReferenceClock:
    """The host clock every latency of this study is read on: the base model is its reference,
    timed in a calm phase once per study (the first process to open it, unless `given_ms` says
    its time) and kept in the study, so that resumed runs and other workers read on one scale."""
    with tempfile.TemporaryDirectory() as tmp:
        reference = export_onnx(model, example, Path(tmp) / "reference.onnx").read_bytes()
    stored = study.user_attrs.get(REFERENCE_MS, given_ms)
    if stored is None and progress:
        print("Timing the base model, the reference of every latency measured here ...", file=sys.stderr)
    clock = ReferenceClock(reference, threads=target.threads, reference_ms=stored)
    if REFERENCE_MS not in study.user_attrs:
        study.set_user_attr(REFERENCE_MS, clock.reference_ms)
    return clock


def run_search(context: Context, study: optuna.Study, trials: int, *, progress: bool) -> None:
    _run_trials(study, Objective(context, trials=trials), trials, progress=progress)


def _spawn_workers(count: int, spec: dict, out_dir: Path) -> list[subprocess.Popen]:
    """Extra local worker processes on the same study (each a fresh Python: no fork of torch)."""
    path = out_dir / "worker_spec.pt"
    torch.save(spec, path)
    return [subprocess.Popen([sys.executable, "-m", "edgeopt.search.worker", str(path), str(i)],
                             stdout=subprocess.DEVNULL) for i in range(1, count)]


def optimize(model: nn.Module, data, *, target="pi4", budget: str | Budget | Sequence[str | Budget] = "50%",
             search: SearchConfig | None = None, finetune_config: FinetuneConfig | None = None,
             out: str | Path = "edgeopt-out", model_name: str | None = None, workers: int = 1,
             search_only: bool = False, progress: bool = True,
             finetuned_dir: str | Path | None = None) -> OptimizeResult | None:
    """Search compressed versions of `model` for `target` under `budget`, fine-tune the best,
    select one and export it to `out`. `data` is an `edgeopt.search.data.DataBundle`.

    `workers` local processes search one study; with `search_only` this process only adds
    trials (a worker on another machine) and returns None. Fine-tuned results are kept in
    `finetuned_dir` (default `out`/finetuned): a resumed run, or another with the same model,
    data and seed, loads what was already fine-tuned instead of training it again.
    """
    search = search or SearchConfig()
    finetune_config = finetune_config or FinetuneConfig()
    target = get_target(target)
    texts = [budget] if isinstance(budget, (str, Budget)) else list(budget)
    if not texts:
        raise EdgeoptError("Give at least one budget, for example --budget 50% or --budget 30ms.")
    budgets = tuple(b if isinstance(b, Budget) else parse_budget(b) for b in texts)
    if workers < 1:
        raise EdgeoptError(f"--workers must be at least 1, got {workers}.")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgeoptError(f"--out {out_dir} is a file; give a folder for the outputs (it is created if missing).")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeoptError(f"--out {out_dir}: cannot create the folder ({exc.strerror or exc}).") from None
    # The form the plan names layers in (nn.MultiheadAttention split into Linear projections).
    model = canonical(model).eval()
    context, study = prepare(model, data, target=target, budgets=budgets, search=search, out_dir=out_dir,
                             seed=search.seed, progress=progress)
    base_cost = context.base
    base_latency = context.latency(model)
    base_violations = [b.violation({"macs": base_cost.macs, "latency_ms": base_latency.total_ms,
                                    "bytes": base_cost.bytes}[b.metric], base_cost.macs) for b in budgets]
    binds = any(v > 0 for v in base_violations)
    starting = _starting_plans(context.space)
    space_summary = context.space.summary()
    if progress:
        print(f"edgeopt: model {model_name or type(model).__name__}, {space_summary.headline()}; data "
              f"{data.description}; preprocessing {data.preprocessing_text()}; target {target.name}; budget "
              f"{', '.join(map(str, budgets))} ({'binds' if binds else 'does not bind'} on the base model: "
              f"{base_cost.macs / 1e6:.1f} MMACs, {base_latency.total_ms:.2f} ms, {base_cost.bytes / 1e6:.2f} MB)",
              file=sys.stderr)
    if not study.trials and search.start != "none":
        # Start from what a user would try by hand, so the search is never worse than that, and
        # from plans that spend each budget where it costs least (edgeopt.search.allocate).
        allocated = (_allocated_plans(context, data, search, budgets, out_dir, progress=progress)
                     if binds and search.start == "allocated" else [])
        for plan in starting + allocated:
            study.enqueue_trial(plan_params(plan, context.space), skip_if_exists=True)
    store = FinetuneStore(out_dir / "finetuned" if finetuned_dir is None else finetuned_dir)
    tasks = FinetuneTasks(study._storage, search.study_name)
    run = f"{worker_id()}:{uuid.uuid4().hex[:8]}"  # this call's local workers stop when it is marked done
    procs = []
    if workers > 1:
        procs = _spawn_workers(workers, {"model": model, "data": data, "target": target, "budgets": budgets,
                                         "search": search, "store": store.folder, "parent": worker_id(), "run": run,
                                         # the parent's threads: a fine-tune gives the same weights in any process
                                         "threads": torch.get_num_threads()}, out_dir)
    try:
        run_search(context, study, search.trials, progress=progress)
        if search_only:
            return None
        _wait_for_running_trials(study, progress=progress)
        return _finish(model, data, target=target, budgets=budgets, search=search, config=finetune_config,
                       context=context, study=study, starting=starting, store=store, tasks=tasks, out_dir=out_dir,
                       model_name=model_name, space_summary=space_summary, base_latency=base_latency, binds=binds,
                       progress=progress)
    finally:
        tasks.mark_done(run)
        for proc in procs:
            if proc.wait() != 0:
                log.warning("A worker process exited with status %s.", proc.returncode)


def _wait_for_running_trials(study: optuna.Study, *, progress: bool) -> None:
    """Wait until no trial of the search is still being measured by another process, so that every
    process of the study selects from the same trials (and so submits the same fine-tunes)."""
    said = False
    while True:
        fail_dead_trials(study)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running:
            return
        if progress and not said:
            print(f"Waiting for {len(running)} trial{'s' if len(running) > 1 else ''} other workers are measuring.",
                  file=sys.stderr)
            said = True
        time.sleep(0.5)


def _finish(model: nn.Module, data, *, target, budgets, search: SearchConfig, config: FinetuneConfig, context: Context,
            study: optuna.Study, starting: list[ModelPlan], store: FinetuneStore, tasks: FinetuneTasks,
            out_dir: Path, model_name: str | None, space_summary, base_latency: LatencyEstimate, binds: bool,
            progress: bool) -> OptimizeResult:
    """Screen, fine-tune, select and export, from the finished search."""
    base_cost = context.base
    candidates = _candidates(study)
    if not candidates:
        raise EdgeoptError(f"No trial finished in the study in {out_dir}, so there is nothing to select: every "
                           "trial was a duplicate or failed. Run with more --trials, or check the warnings above.")
    base_accuracy = evaluate(model, data.val)
    hand = _hand_candidate(candidates, starting)
    chosen = finetune_order(candidates, max(config.top, config.screen), spread=config.proxy_spread, hand=hand)
    screened: list[Candidate] = []
    if screening(config, len(chosen)):
        screened = screen(chosen, context, data=data, config=config, seed=search.seed, progress=progress,
                          store=store, tasks=tasks)
        chosen = finalists(screened, config.top, hand=hand, max_drop=config.max_drop,
                           min_speedup=config.min_speedup)
    chosen = chosen[:config.top]
    tuned: list[Finetuned] = finetune(chosen, context, data=data, config=config, seed=search.seed,
                                      progress=progress, store=store, tasks=tasks)
    if target.measurable:
        tuned = _measured_here(tuned, context)
    if not any(t.candidate.feasible for t in tuned):
        tuned += _tune_the_rest(candidates, tuned, context, data=data, config=config, seed=search.seed,
                                progress=progress, store=store, tasks=tasks)
    small = (_small_member(candidates, tuned, context, budgets, data=data, config=config, seed=search.seed,
                           progress=progress, store=store, tasks=tasks) if config.cascade else [])
    pool = [t.candidate for t in tuned]  # the selection's: the finalists, all fine-tuned by one recipe
    tuned += small
    by_trial = {t.candidate.trial: t for t in tuned}
    screened_by_trial = {c.trial: c for c in screened}
    candidates = [by_trial[c.trial].candidate if c.trial in by_trial else screened_by_trial.get(c.trial, c)
                  for c in candidates]
    pool = pool or candidates
    selected = select(pool, max_drop=config.max_drop, min_speedup=config.min_speedup)
    shown = selected or (closest(pool, 1) or closest(candidates, 1) or [None])[0]
    cascade = _cascade(tuned, budgets, data=data, config=config) if config.cascade else None

    model_out = by_trial[shown.trial].model if shown and shown.trial in by_trial else (
        context.compress(shown.plan) if shown else None)
    # What the saved model scores, and on what: a candidate that was not fine-tuned has only a
    # proxy score, which says little of the model saved (pruned and untrained).
    if shown is None:
        shown_accuracy = None
    elif shown.accuracy is not None:
        shown_accuracy = (shown.accuracy, "validation, fine-tuned")
    else:
        shown_accuracy = (evaluate(model_out, data.val), "validation, not fine-tuned")
    summary = _write_outputs(
        out_dir, candidates=candidates, budgets=budgets, selected=selected, shown=shown, model_out=model_out,
        shown_accuracy=shown_accuracy, context=context, tuned=tuned, cascade=cascade, data=data, progress=progress,
        base={"accuracy": base_accuracy, "macs": base_cost.macs, "bytes": base_cost.bytes,
              "latency_ms": base_latency.total_ms, "latency_source": base_latency.source},
        header={"model": model_name or type(model).__name__, "data": data.description,
                "preprocessing": data.preprocessing, "preprocessing_text": data.preprocessing_text(),
                "space": space_summary.lines(),
                "target": f"{target.name}: {target.description}", "target_is_here": target.measurable,
                "deploy_note": target.deploy_note(),
                "budgets": [str(b) for b in budgets],
                "binds": binds, "trials": len(candidates), "sampler": search.sampler, "seed": search.seed,
                "proxy": search.proxy, "proxy_images": len(data.proxy),
                "stopped_early": sum(c.proxy_images is not None and c.proxy_images < len(data.proxy)
                                     for c in candidates), "behind_z": BEHIND_Z, "far_over": FAR_OVER,
                "screened": len(screened), "screen_epochs": config.screen_length,
                "finetune_epochs": config.epochs,
                "finetuned": len(tuned), "max_drop": config.max_drop,
                "small_member": ({"trial": small[0].candidate.trial, "epochs": config.epochs * SMALL_MEMBER_EPOCHS}
                                 if small else None),
                "min_speedup": config.min_speedup,
                "proxy_spread": config.proxy_spread},
        base_model=model,
    )
    return OptimizeResult(trials=trials_frame(candidates, budgets), pareto=pareto_front(candidates),
                          selected=selected, model=model_out if selected else None,
                          plan=selected.plan if selected else None, out_dir=out_dir, summary=summary)


def _allocated_plans(context: Context, data, search: SearchConfig, budgets: tuple[Budget, ...], out_dir: Path, *,
                     progress: bool) -> list[ModelPlan]:
    """Starting plans from the latency-aware allocation, per latency or MAC budget. The sensitivity
    table it needs is the one `--proxy sensitivity` uses (same file, measured once)."""
    wanted = [b for b in budgets if b.metric in ("latency_ms", "macs")]
    if not wanted:
        return []
    table = _sensitivity_table(context.model, context.space, context.example_input, context.calib,
                               target=context.target, reduce_range=context.reduce_range, data=data, search=search,
                               out_dir=out_dir, progress=progress)

    macs_of: dict[str, float] = {}  # MACs by the plan at fp32

    def metric_of(budget: Budget):
        def metric(plan: ModelPlan) -> float:
            if budget.metric == "macs":
                # Precision changes no MAC: the path from uniform int8 asks again for each plan
                # the path from fp32 built (each build 0.2 s on the test suite's small models).
                key = plan.in_float().key()
                if key not in macs_of:
                    model = context.compress(plan, calibrate_model=False)
                    macs_of[key] = float(context.budget_macs(model_cost(model, context.example_input)))
                return macs_of[key]
            return context.latency(context.compress(plan, calibrate_model=False)).total_ms
        return metric

    # From fp32 and from uniform int8: on a model whose gates or activations run in float between
    # int8 layers, int8 pays only with the surgery or pruning around it, which a path of single
    # changes from fp32 never sees (mobilenet_v3_small at 64x64 on host: uniform int8 0.97x fp32's
    # time, with every gate and Hardswish replaced 0.45x).
    # Each path: (how it walks, what the progress says, where it starts). TI's lite model may leave
    # much of the budget unspent: its replacements are given back where they cost most accuracy per
    # millisecond; or it may be over the budget, and the path goes on from it (edgeopt.search.allocate.fit).
    paths = [(allocate, "Allocating starting plans from fp32", "each single change", None)]
    if INT8 in context.space.knobs.pairs:
        paths.append((allocate, "Allocating starting plans from uniform int8", "each single change",
                      context.space.uniform(w_bits=8, a_bits=8)))
    paths += [(fit, f"Fitting the {name} lite model", "each change", lite)
              for name, lite in _lite_plans(context.space).items()]
    plans: list[ModelPlan] = []
    for budget in wanted:
        for walk, what, unit, start in paths:
            if progress:
                print(f"{what} for {budget}: {'timing' if context.target.measurable else 'estimating'} {unit} ...",
                      file=sys.stderr)
            found = walk(context.space, table, metric=metric_of(budget), limit=budget.limit(context.base.macs),
                         start=start)
            plans += [p for p in found if p not in plans]
    return plans


def _lite_plans(space: SearchSpace) -> dict[str, ModelPlan]:
    """TI's "lite" model (every replacement the target declares, in every block), in int8 where
    the space offers it and in fp32; none where no block is open to surgery."""
    if not space.surgery_blocks:
        return {}
    lite = Surgery(activation=space.knobs.activations[0] if space.knobs.activations else None, gate=False,
                   kernel=SMALL_KERNEL)
    plans = {"int8": space.uniform(w_bits=8, a_bits=8, surgery=lite)} if INT8 in space.knobs.pairs else {}
    return plans | {"fp32": space.uniform(surgery=lite)}


def _starting_plans(space: SearchSpace) -> list[ModelPlan]:
    """What a user tries by hand: uniform int8, uniform L1 pruning at the usual steps in int8 and
    in fp32 (where int8 does not pay on the target's clock, as for depthwise convolutions on x86
    without VNNI, pruning alone is the hand answer), uniform 2:4 where the target runs it fast, and
    uniform int8 magnitude pruning at 50% and 75% (TF-MOT's recipe) where sparsity is offered (under
    a size budget), and where surgery is offered, TI's "lite" model (every replacement the target
    declares, in every block) in fp32 and in int8."""
    plans = []
    keeps = [k for k in (0.875, 0.75, 0.625, 0.5) if k in space.knobs.keep_ratios]
    lite = _lite_plans(space)
    if (8, 8) in space.knobs.pairs:
        plans.append(space.uniform(w_bits=8, a_bits=8))
        if "int8" in lite:
            plans.append(lite["int8"])
        plans += [space.uniform(w_bits=8, a_bits=8, keep_ratio=keep) for keep in keeps]
        if NM(n=2, m=4) in space.knobs.nm:
            plans.append(space.uniform(w_bits=8, a_bits=8, nm=NM(n=2, m=4)))
        plans += [space.uniform(w_bits=8, a_bits=8, sparsity=share) for share in (0.5, 0.75)
                  if share in space.knobs.sparsities]
    plans += [space.uniform(keep_ratio=keep) for keep in keeps]
    if "fp32" in lite:
        plans.append(lite["fp32"])
    return [p for i, p in enumerate(plans) if p not in plans[:i]]


def _hand_candidate(candidates: list[Candidate], starting: list[ModelPlan]) -> Candidate | None:
    """The starting plan a user would pick by hand: of those that meet every budget, the one that
    compresses least: it prunes least, and of plans pruned alike (the same MACs) it keeps the most
    bytes, so float before int8 where both fit. Before fine-tuning the proxy cannot tell such a pair
    apart (it picked the int8 one on the edgenet at 70% on a host without VNNI, where int8 was the
    slower and, fine-tuned, the less accurate of the two: BENCHMARKS.md)."""
    fits = [c for c in candidates if c.feasible and any(c.plan == plan for plan in starting)]
    return max(fits, key=lambda c: (c.macs, c.bytes, c.proxy_accuracy), default=None)


def _measured_here(tuned: list[Finetuned], context: Context) -> list[Finetuned]:
    """Where the target is this machine, the finalists are timed whole again before the selection
    rule compares them: one more measurement each, taken side by side after the search, so that a
    burst of load during one trial's timing does not decide between close plans."""
    measured = []
    for t in tuned:
        ms = context.latency(t.model).total_ms
        violations = tuple(context.violations(model_cost(t.model, context.example_input), ms))
        candidate = replace(t.candidate, latency_ms=ms, violations=violations, latency_measured=True)
        measured.append(Finetuned(candidate=candidate, model=t.model))
    return measured


def _tune_the_rest(candidates: list[Candidate], tuned: list[Finetuned], context: Context, *, data,
                   config: FinetuneConfig, seed: int, progress: bool, store: FinetuneStore,
                   tasks: FinetuneTasks) -> list[Finetuned]:
    """Fine-tune (and where the target is this machine, time) the candidates the estimate put
    within every budget that have not been yet, when none of those fine-tuned met the budgets:
    the run must not say that no candidate met them before it has tried every one that might.
    On the host each is timed first (fine-tuning does not change a model's time) and only those
    that meet the budgets are fine-tuned, at most `config.top` of them."""
    done = {t.candidate.trial for t in tuned}
    rest = [c for c in finetune_order(candidates, len(candidates), spread=config.proxy_spread)
            if c.feasible and c.trial not in done]
    if not rest:
        return []
    if progress:
        print(f"None of the fine-tuned candidates met the budget{' when timed here' if context.target.measurable else ''}; "
              f"trying the {len(rest)} other{'s' if len(rest) > 1 else ''} the estimate puts within it.", file=sys.stderr)
    if context.target.measurable:
        timed = []
        for c in rest:
            model = context.compress(c.plan)
            ms = context.latency(model).total_ms
            if all(v <= 0 for v in context.violations(model_cost(model, context.example_input), ms)):
                timed.append(c)
        rest = timed
    more = finetune(rest[:config.top], context, data=data, config=config, seed=seed, progress=progress, store=store,
                    tasks=tasks)
    return _measured_here(more, context) if context.target.measurable else more


def _host_latency(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[float, float]:
    m = measure_latency(path, threads=1)
    return m.median_ms, m.spread_ms


def _host_outputs_exact(model: nn.Module, context: Context) -> bool:
    """Whether onnxruntime on this machine computes what the exported model computes on its
    target: not where the model keeps full-range 8-bit weights (its target's int8 kernels take
    them) and this machine's kernels saturate on them (x86 without VNNI)."""
    full_range = not context.reduce_range and any(
        layer.integer and layer.w_bits == 8 for layer in compressed_layers(model).values())
    return not (full_range and int8_needs_reduce_range())


def _other_budgets_met(budgets: tuple[Budget, ...]):
    """Whether a candidate meets every budget but latency: what each cascade member must meet
    alone (a latency budget is read on the cascade's expected latency)."""
    others = [i for i, b in enumerate(budgets) if b.metric != "latency_ms"]
    return lambda c: all(c.violations[i] <= 0 for i in others)


def _small_member(candidates: list[Candidate], tuned: list[Finetuned], context: Context, budgets, *, data,
                  config: FinetuneConfig, seed: int, progress: bool, store: FinetuneStore,
                  tasks: FinetuneTasks) -> list[Finetuned]:
    """A cascade's small member, where no finalist is one: the fast candidates screened, and the
    best of them fine-tuned `SMALL_MEMBER_EPOCHS` times longer than the finalists
    (`edgeopt.search.cascade.small_members`)."""
    choices = small_members(candidates, tuned, member_ok=_other_budgets_met(budgets))
    if not choices:
        return []
    if progress:
        print(f"Screening {len(choices)} fast candidate{'s' if len(choices) > 1 else ''} for a cascade's small member.",
              file=sys.stderr)
    screened = screen(choices, context, data=data, config=config, seed=seed, progress=progress, store=store,
                      tasks=tasks)
    if not screened:
        return []
    pick = max(screened, key=lambda c: (c.screened_accuracy, -c.latency_ms))
    if progress:
        print(f"Fine-tuning trial {pick.trial} as the small member ({pick.latency_ms:.3g} ms, "
              f"{SMALL_MEMBER_EPOCHS}x the finalists' epochs).", file=sys.stderr)
    longer = replace(config, epochs=config.epochs * SMALL_MEMBER_EPOCHS)
    more = finetune([pick], context, data=data, config=longer, seed=seed, progress=progress, store=store, tasks=tasks)
    return _measured_here(more, context) if context.target.measurable else more


def _cascade(tuned: list[Finetuned], budgets: tuple[Budget, ...], *, data, config: FinetuneConfig):
    """The cascade of two fine-tuned candidates that the selection rule picks over every single
    one under the budgets, or None: a latency budget is read on its expected latency, the others
    on each member."""
    latency = [b.value for b in budgets if b.metric == "latency_ms"]
    return choose_cascade(tuned, data.proxy, budget_ms=min(latency) if latency else None,
                          member_ok=_other_budgets_met(budgets), max_drop=config.max_drop,
                          min_speedup=config.min_speedup)


def _write_outputs(out_dir: Path, *, candidates, budgets, selected, shown, model_out, shown_accuracy, context,
                   tuned, base: dict, header: dict, base_model: nn.Module, cascade=None, data=None,
                   progress: bool = False) -> dict:
    example = context.example_input
    trials_frame(candidates, budgets).to_csv(out_dir / "trials.csv", index=False)
    base_onnx = export_onnx(base_model, example, out_dir / "base.onnx", preprocessing=header["preprocessing"])
    base["host_ms"], base["host_spread_ms"] = _host_latency(base_model, example, base_onnx)
    summary = {**header, "base": base, "selected": None, "closest": []}
    layer_section: list[str] = []
    if shown is not None and model_out is not None:
        sel_dir = out_dir / "selected"
        sel_dir.mkdir(exist_ok=True)
        onnx_path = export_onnx(model_out, example, sel_dir / "model.onnx", preprocessing=header["preprocessing"])
        (sel_dir / "plan.json").write_text(shown.plan.to_json())
        torch.save(model_out, sel_dir / "model.pt")
        if shown.latency_measured:  # the timing the selection rule compared
            latency_ms, latency_source = shown.latency_ms, "measured"
        else:
            estimate = context.latency(model_out)
            latency_ms, latency_source = estimate.total_ms, estimate.source
        host_ms, host_spread = _host_latency(model_out, example, onnx_path)
        # run.py and the device README beside the model: selected/ is what goes to the device.
        write_bundle(sel_dir, target=context.target, model=header["model"],
                     preprocessing=preprocessing_for(model_out, header["preprocessing"]),
                     preprocessing_text=header["preprocessing_text"] + resize_text(model_out),
                     latency=f"{latency_ms:.2f} ms ({latency_source})", budgets=header["budgets"])
        row = {"accuracy": shown_accuracy[0], "accuracy_of": shown_accuracy[1], "macs": shown.macs, "bytes": shown.bytes,
               "latency_ms": latency_ms, "latency_source": latency_source,
               "host_ms": host_ms, "host_spread_ms": host_spread, "trial": shown.trial,
               "host_outputs_exact": _host_outputs_exact(model_out, context),
               "input_size": list(input_for(model_out, example).shape[-2:]), "input_scale": shown.plan.input_scale,
               "dropped_blocks": sorted(shown.plan.dropped),
               "surgery": {block: surgery.describe() for block, surgery in shown.plan.surgery.items()}}
        if selected is not None:
            summary["selected"] = row
        layer_section = _account_layers(out_dir, base_model, model_out, shown.plan, base_onnx, onnx_path, context,
                                        progress=progress)
    if selected is None:
        # The saved one first, with the accuracy of what was saved.
        listed = ([shown] if shown is not None else []) + [c for c in closest(candidates, 3)
                                                           if shown is None or c.trial != shown.trial]
        summary["closest"] = [
            {"trial": c.trial, "saved": c is shown,
             "accuracy": shown_accuracy[0] if c is shown else c.best_accuracy,
             "accuracy_of": shown_accuracy[1] if c is shown else (
                 "validation, fine-tuned" if c.accuracy is not None else "proxy split, not fine-tuned"),
             "latency_ms": c.latency_ms, "latency_measured": c.latency_measured, "macs": c.macs,
             "bytes": c.bytes, "excess": ", ".join(f"{b.text}: +{max(v, 0) * 100:.0f}%"
                                                   for b, v in zip(budgets, c.violations))}
            for c in listed[:3]
        ]
    if len(tuned) >= 2:
        from scipy.stats import kendalltau

        tau = kendalltau([t.candidate.proxy_accuracy for t in tuned], [t.candidate.accuracy for t in tuned])
        summary["kendall_tau"] = None if tau.statistic != tau.statistic else float(tau.statistic)
    curve = None
    if cascade is not None:
        validation = on_validation(cascade, data.val)
        latency = [b.value for b in budgets if b.metric == "latency_ms"]
        source = "measured" if cascade.small.candidate.latency_measured else "estimated"
        spec = write_cascade(out_dir / "cascade", cascade, example=example,
                             preprocessing=header["preprocessing"], validation=validation, latency_source=source)
        spec["budget_ms"] = min(latency) if latency else None
        spec["worst_case_meets_budget"] = None if not latency else spec["worst_case_ms"] <= min(latency)
        summary["cascade"] = {k: v for k, v in spec.items() if k != "curve"}
        curve = [(m, a) for _, a, m in validation["curve"]]
    info = pareto_info(candidates, budgets=budgets, selected=selected,
                       base=(base["latency_ms"], base["accuracy"]), cascade_curve=curve,
                       cascade_point=(summary["cascade"]["expected_latency_ms"], summary["cascade"]["accuracy"])
                       if cascade is not None else None)
    plot_pareto_png(info, out_dir / "pareto.png", target=context.target.name)
    plot_pareto_html(info, out_dir / "pareto.html", target=context.target.name)
    write_report(out_dir / "report.md", summary=summary, layer_section=layer_section)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _account_layers(out_dir: Path, base_model: nn.Module, model_out: nn.Module, plan: ModelPlan, base_onnx: Path,
                    onnx_path: Path, context: Context, *, progress: bool) -> list[str]:
    """layers.csv and report.md's per-layer section: the saved model against the base, layer by
    layer, with onnxruntime's per-node profile of both exported models on this machine."""
    example, target = context.example_input, context.target
    if progress:
        print("Profiling the base and the saved model layer by layer ...", file=sys.stderr)
    base_layers = trace_layers(canonical(base_model), example[:1])
    names = [spec.fqn for spec in base_layers]
    try:
        base_profile, profile = profile_layers(base_onnx, names), profile_layers(onnx_path, names)
    except Exception as exc:  # the accounting explains the result; it must not lose it
        log.warning("onnxruntime's profiler could not time the models layer by layer (%s: %s); layers.csv "
                    "has the estimates only", type(exc).__name__, exc)
        base_profile = profile = None
    rows = account_layers(
        plan=plan, base_layers=base_layers, layers=trace_layers(canonical(model_out), input_for(model_out, example[:1])),
        modules=compressed_layers(model_out), base_estimate=estimate_latency(base_model, example, target=target),
        estimate=estimate_latency(model_out, example, target=target), base_profile=base_profile, profile=profile,
        measured_clock=target.measurable, target=target.name, simd=target.channel_multiple)
    write_layers_csv(rows, out_dir / LAYERS_FILE)
    between = (sum(base_profile.between.values()), sum(profile.between.values())) if profile else None
    overhead = max(base_profile.overhead_ms, profile.overhead_ms) if profile else None
    return report_lines(rows, target=target.name, measured_clock=target.measurable, between=between,
                        overhead_ms=overhead)
