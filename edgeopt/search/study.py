"""The Optuna side of the search: storage, sampler, and how a trial turns into a plan.

Each trial's plan and measured costs are stored as user attributes, so the study in its storage
is the whole record: a restarted run, another worker or a report reads everything from it.
"""

from __future__ import annotations

import json
import os
import warnings
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from edgeopt.errors import EdgeoptError
from edgeopt.plan import NM, LayerPlan, ModelPlan, Surgery

if TYPE_CHECKING:  # the space (and torch) load where a plan is drawn, not where the CLI lists the samplers
    from edgeopt.spaces.space import SearchSpace

PLAN = "plan"
PLAN_KEY = "plan_key"
CONSTRAINTS = "constraints"
METRICS = "metrics"
WORKER = "worker"  # host:pid of the process measuring the trial
# A trial is signed (WORKER) by its objective's first line, milliseconds after Optuna starts it;
# one still unsigned after this long belongs to a process killed in between, which nothing else
# would ever fail: a resumed run waited for it forever.
UNSIGNED_GRACE_S = 60.0
JOINED = "joined "  # study attribute per process that opened the study: JOINED + host:pid -> time
MADE_FOR = "made for"  # study attribute: what the study's trials were measured for (see open_study)


def _nm_label(nm: NM | None) -> str:
    return "dense" if nm is None else str(nm)


def _nm_from_label(label: str) -> NM | None:
    if label == "dense":
        return None
    n, m = label.split(":")
    return NM(n=int(n), m=int(m))


def _precision_label(precision: tuple[int, int, bool]) -> str:
    """w8a8, w32a32, ...; dynamic-range int8 is w8dyn."""
    w_bits, a_bits, dynamic = precision
    return f"w{w_bits}dyn" if dynamic else f"w{w_bits}a{a_bits}"


DEPTH = ("keep", "drop")  # each droppable residual block's choices


def _surgery_label(value: str | bool | int | None) -> str:
    """A surgery choice as a parameter value: "keep" (None, or a gate kept), "remove" (a gate),
    "3x3" (a kernel), or the activation's name."""
    if value is None or value is True:
        return "keep"
    if value is False:
        return "remove"
    return f"{value}x{value}" if isinstance(value, int) else value


def _surgery_params(space: SearchSpace):
    """(parameter name, block, kind, {label: value}) for each surgery choice of the space."""
    for block in space.surgery_blocks:
        for kind, choices in space.surgery_choices(block).items():
            yield f"{kind}/{block.name}", block, kind, {_surgery_label(c): c for c in choices}


def suggest_plan(trial: optuna.Trial, space: SearchSpace) -> ModelPlan:
    """One categorical parameter per prune group and per layer knob (fixed names, so every
    sampler, NSGA-II included, sees the same space in every trial)."""
    from edgeopt.spaces.space import zeroing_fields

    keep = {}
    for group in space.groups:
        choices = space.keep_choices(group)
        ratio = trial.suggest_categorical(f"keep/{group.root}", choices) if len(choices) > 1 else 1.0
        keep.update({fqn: ratio for fqn in group.layers})
    layers = {}
    for layer in space.layers:
        precisions = {_precision_label(p): p for p in space.precision_choices(layer)}
        nm = [_nm_label(p) for p in space.nm_choices(layer)]
        label = (trial.suggest_categorical(f"q/{layer.fqn}", list(precisions)) if len(precisions) > 1
                 else next(iter(precisions)))
        w_bits, a_bits, dynamic = precisions[label]
        shares = space.sparsity_choices(layer)
        zeroing = zeroing_fields(
            _nm_from_label(trial.suggest_categorical(f"nm/{layer.fqn}", nm)) if len(nm) > 1 else None,
            trial.suggest_categorical(f"sparse/{layer.fqn}", shares) if len(shares) > 1 else 0.0)
        layers[layer.fqn] = LayerPlan(w_bits=w_bits, a_bits=a_bits, dynamic=dynamic,
                                      keep_ratio=keep.get(layer.fqn, 1.0), **zeroing)
    scales = space.input_scales
    scale = trial.suggest_categorical("input_scale", scales) if len(scales) > 1 else 1.0
    dropped = {block for block in space.blocks if trial.suggest_categorical(f"depth/{block}", DEPTH) == "drop"}
    surgery: dict[str, dict] = {}
    for name, block, kind, choices in _surgery_params(space):
        surgery.setdefault(block.name, {})[kind] = choices[trial.suggest_categorical(name, list(choices))]
    return space.settled(ModelPlan(layers=layers, input_scale=scale, dropped=dropped,
                                   surgery={b: Surgery(**fields) for b, fields in surgery.items()}))


def plan_params(plan: ModelPlan, space: SearchSpace) -> dict[str, object]:
    """The parameters `suggest_plan` would read for `plan` (to enqueue a known plan)."""
    params: dict[str, object] = {}
    for group in space.groups:
        if len(space.keep_choices(group)) > 1:
            params[f"keep/{group.root}"] = plan[group.layers[0]].keep_ratio
    for layer in space.layers:
        lp = plan[layer.fqn]
        if len(space.precision_choices(layer)) > 1:
            params[f"q/{layer.fqn}"] = _precision_label((lp.w_bits, lp.a_bits, lp.dynamic))
        if len(space.nm_choices(layer)) > 1:
            params[f"nm/{layer.fqn}"] = _nm_label(lp.nm)
        if len(space.sparsity_choices(layer)) > 1:
            params[f"sparse/{layer.fqn}"] = lp.sparsity
    if len(space.input_scales) > 1:
        params["input_scale"] = plan.input_scale
    for block in space.blocks:
        params[f"depth/{block}"] = "drop" if block in plan.dropped else "keep"
    for name, block, kind, _ in _surgery_params(space):
        params[name] = _surgery_label(getattr(plan.surgery.get(block.name, Surgery()), kind))
    return params


def trial_plan(trial: optuna.trial.FrozenTrial) -> ModelPlan:
    return ModelPlan.from_dict(json.loads(trial.user_attrs[PLAN]))


def constraints_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    return list(trial.user_attrs.get(CONSTRAINTS, []))


def _nsga2(seed: int, trials: int) -> optuna.samplers.BaseSampler:
    # A population of about a sixth of the trials: NSGA-II gains from generations, not from a
    # large first one (which is random sampling). With searches of tens of trials it did no
    # better than random search on the issue-5 benchmark (BENCHMARKS.md), hence TPE by default.
    population = max(8, min(50, trials // 6))
    return optuna.samplers.NSGAIISampler(population_size=population, seed=seed, constraints_func=constraints_of)


def _tpe(seed: int, trials: int) -> optuna.samplers.BaseSampler:
    # The default. On the issue-5 benchmark (edgenet-64, pi4, 40 % budget, 60 trials, seeds 0-5)
    # its mean hypervolume was 137.05 against NSGA-II's 128.67 and random search's 128.42, and it
    # beat random at every seed; Optuna's GPSampler took 38 s per trial to propose on these 23
    # categorical parameters, against 1.5 s for the trial itself.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=constraints_of,
                                      n_startup_trials=max(5, min(20, trials // 4)))


def _random(seed: int, trials: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


SAMPLERS: dict[str, Callable[[int, int], optuna.samplers.BaseSampler]] = {
    "nsga2": _nsga2, "tpe": _tpe, "random": _random,
}


def make_sampler(name: str, *, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    if name not in SAMPLERS:
        raise EdgeoptError(f"Unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}.")
    with warnings.catch_warnings():
        # Optuna 5 deprecates constraints_func (removal planned for 7) in favour of
        # Trial.set_constraint; it still works and we support Optuna 4 too.
        warnings.simplefilter("ignore", FutureWarning)
        return SAMPLERS[name](seed, trials)


def make_storage(storage: str | None, out_dir: Path) -> optuna.storages.BaseStorage | str:
    """An Optuna storage URL as given, or by default a journal file in the output folder (safe
    for several processes, unlike SQLite under concurrent writers)."""
    if storage:
        if "://" in storage:
            # A database: heartbeats let any worker fail the trials of one that died.
            try:
                return optuna.storages.RDBStorage(storage, heartbeat_interval=30, grace_period=120)
            except Exception as exc:  # bad URL, unreachable server, driver not installed
                raise EdgeoptError(f"Could not open the storage {storage!r}: {exc}. Give an Optuna "
                                   "storage URL such as postgresql://user:pass@host/db.") from None
        return storage
    from optuna.storages.journal import JournalFileBackend

    out_dir.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(out_dir / "study.journal")))


def fingerprint(*parts: object) -> str:
    """A short stable digest of tensors, bytes and reprs (a model's weights, say)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def _made_for_mismatch(stored: dict, wanted: dict) -> list[str]:
    return [f"{key}: the study has {stored.get(key)!r}, this run {value!r}"
            for key, value in wanted.items() if stored.get(key) != value]


def open_study(*, storage, study_name: str, directions: list[str],
               sampler: optuna.samplers.BaseSampler, made_for: dict | None = None,
               metric_names: list[str] | None = None) -> optuna.Study:
    """Open (or create) the study. `made_for` says what its trials are measured for (target,
    budgets, model and data fingerprints, knobs, input size): a study made for something else is
    refused, so that a resumed run never mixes trials of two setups. `metric_names` name the
    objectives (optuna-dashboard shows them)."""
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                    sampler=sampler, load_if_exists=True)
    except Exception as exc:  # bad URL, unreachable database, driver missing
        raise EdgeoptError(f"Could not open the Optuna study {study_name!r} in storage "
                           f"{storage!r}: {exc}. Check --storage (any Optuna storage URL).") from None
    if list(study.directions) != [optuna.study.StudyDirection.MAXIMIZE if d == "maximize"
                                  else optuna.study.StudyDirection.MINIMIZE for d in directions]:
        raise EdgeoptError(f"Study {study_name!r} exists with other objectives (a size budget "
                           "adds one); use another --study name or --out folder.")
    if made_for is not None:
        stored = study.user_attrs.get(MADE_FOR)
        if stored is None:
            study.set_user_attr(MADE_FOR, made_for)
        elif differences := _made_for_mismatch(stored, made_for):
            where = storage if isinstance(storage, str) else getattr(
                getattr(storage, "_backend", None), "_file_path", "its storage")
            raise EdgeoptError(
                f"The study {study_name!r} in {where} was made for another search ("
                + "; ".join(differences) + "). Its trials cannot be mixed with this run's: give another "
                "--out folder (or --study name), or delete the old study to start afresh.")
    if metric_names is not None and study.metric_names != metric_names:
        with warnings.catch_warnings():  # experimental in Optuna 4 and 5, stable in use since 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names)
    fail_dead_trials(study)
    # Which processes (machines) worked on the study, even those that found it already done.
    study.set_user_attr(JOINED + worker_id(), datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return study


def joined(study: optuna.Study) -> list[str]:
    """host:pid of every process that opened the study."""
    return sorted(key.removeprefix(JOINED) for key in study.user_attrs if key.startswith(JOINED))


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if PLAN in t.user_attrs]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_worker_gone(worker: str) -> bool:
    """Whether `worker` (a worker_id) is a process of this machine that no longer exists; a
    worker of another machine, or an unsigned one, is never said to be gone."""
    name, _, pid = worker.rpartition(":")
    return name == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail the running trials whose worker is gone: stale heartbeats in a database storage (any
    machine), vanished processes of this machine (any storage)."""
    with warnings.catch_warnings():  # experimental in Optuna 4 and 5; it skips storages without heartbeats
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    fail_orphans(study)


def fail_orphans(study: optuna.Study) -> int:
    """Mark as failed the running trials whose worker process on this machine is gone (a run
    killed mid-trial), and those never signed by a worker within UNSIGNED_GRACE_S of their start
    (killed before its objective began): their plans become free again and they stop counting.
    Signed trials of other machines are left alone; an RDB storage's heartbeat covers those."""
    failed = 0
    now = datetime.now()  # Optuna stamps a trial's start in its process's local time
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER)
        if worker is None:
            gone = trial.datetime_start is not None and (now - trial.datetime_start).total_seconds() > UNSIGNED_GRACE_S
        else:
            gone = local_worker_gone(worker)
        if gone:
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            failed += 1
    return failed
