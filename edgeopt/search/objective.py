"""What one search trial does: apply the plan, score accuracy, estimate latency, check budgets."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from typing import Protocol

import optuna
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgeopt.budget import Budget
from edgeopt.evaluators.cost import Cost, model_cost
from edgeopt.evaluators.latency import ReferenceClock, measure_model_latency
from edgeopt.hw_models.estimate import LatencyEstimate, estimate_latency
from edgeopt.plan import ModelPlan
from edgeopt.search.study import CONSTRAINTS, METRICS, PLAN, PLAN_KEY, WORKER, suggest_plan, worker_id
from edgeopt.errors import EdgeoptError
from edgeopt.search.training import default_device, evaluation_batch_size, predict
from edgeopt.spaces.apply import apply_plan
from edgeopt.spaces.depth import inside
from edgeopt.spaces.space import SearchSpace

log = logging.getLogger(__name__)


class AccuracyProxy(Protocol):
    """Scores a compressed candidate; higher is better (top-1 percent on held-out data).
    `needs_model` is False for a proxy that scores the plan alone: the candidate is then built
    without calibration, for its costs and latency only.

    A search passes `bar`, the accuracy of the best trial measured so far that meets the budgets
    and costs no more than this one, and `rough`, true for a trial far over a budget: a proxy
    that scores images may then stop early (`HeldOutAccuracy`). It returns the accuracy and
    how many images it scored (None for a proxy that scores no images)."""

    needs_model: bool

    def __call__(self, compressed: nn.Module, plan: ModelPlan, *, bar: float | None = None,
                 rough: bool = False) -> tuple[float, int | None]: ...


# Most plans a sampler draws trail a cheaper plan already measured by many points, or are far
# over the budget; a few hundred images tell that. So a trial is scored on the first images of the
# proxy split (every prefix of it is a stratified sample: edgeopt.search.data) and goes on to the
# next stage only while it could still match `bar`; all images go to the plans that can. Replayed
# on nine fixed-size searches of 40 trials (prove.py's edgenet and ResNet-20 runs, each trial's
# images drawn from its recorded score), the proxy scored 18-64% of the images it scored before,
# and one trial of the 360 stopped while ahead of its bar (by 0.35 points: a near tie).
PROXY_STAGES = (250, 500, 1000)  # images scored before each look; then the rest
BEHIND_Z = 3.0  # stop when the Wilson bound this many standard errors above the score is below `bar`
# Over a budget by more than this share, a trial's accuracy does not steer the samplers (they rank
# infeasible trials by their violation alone) and it is never fine-tuned while nearer ones exist:
# the first stage scores it. Nearer ones may be, so they are scored in full.
FAR_OVER = 0.10


def wilson_upper(correct: int, seen: int, z: float = BEHIND_Z) -> float:
    """The upper end of the Wilson score interval for `correct` of `seen`, in percent."""
    p = correct / seen
    centre = p + z * z / (2 * seen)
    half = z * math.sqrt(p * (1 - p) / seen + z * z / (4 * seen * seen))
    return 100.0 * (centre + half) / (1 + z * z / seen)


@dataclass(frozen=True)
class HeldOutAccuracy:
    """Top-1 on the proxy split (held out from training, never the validation split), measured
    after apply_plan's BatchNorm re-estimation and activation calibration; in stages where the
    search says a trial may stop early (`PROXY_STAGES`)."""

    dataset: TensorDataset
    needs_model = True

    def __call__(self, compressed: nn.Module, plan: ModelPlan, *, bar: float | None = None,
                 rough: bool = False) -> tuple[float, int]:
        x, y = self.dataset.tensors[:2]
        total = len(y)
        if total == 0:
            raise EdgeoptError("There are no images to evaluate on; check --data.")
        with torch.no_grad():
            batch_size = evaluation_batch_size(compressed.eval(), x[0], default_device())
        correct = seen = 0
        for stop in [s for s in PROXY_STAGES if s < total] + [total]:
            predicted, labels = predict(compressed, TensorDataset(x[seen:stop], y[seen:stop]), batch_size=batch_size)
            correct += int((predicted == labels).sum())
            seen = stop
            if seen < total and (rough or (bar is not None and wilson_upper(correct, seen) < bar)):
                break
        return 100.0 * correct / seen, seen


def target_latency(model: nn.Module, example: torch.Tensor, target,
                   clock: ReferenceClock | None = None) -> LatencyEstimate:
    """The model's latency on the target: measured whole where the target is this machine (host),
    so that a latency budget in ms is judged on the clock the user reads, through every op
    and every float/int8 boundary a per-layer table would have to model (against the search's
    reference model where a `clock` is given); estimated elsewhere."""
    if target.measurable:
        if clock is not None:
            return clock.measure_model(model, example)
        return measure_model_latency(model, example, threads=target.threads)
    return estimate_latency(model, example, target=target)


@dataclass(frozen=True, kw_only=True)
class Context:
    """Everything a trial needs, built once per search."""

    model: nn.Module
    space: SearchSpace
    example_input: torch.Tensor
    calib: list
    target: object  # a HardwareTarget
    budgets: tuple[Budget, ...]
    base: Cost
    proxy: AccuracyProxy
    reduce_range: bool = False
    clock: ReferenceClock | None = None  # host: every latency of the study on one scale

    def latency(self, model: nn.Module) -> LatencyEstimate:
        return target_latency(model, self.example_input, self.target, self.clock)

    @property
    def size_objective(self) -> bool:
        return any(b.metric == "bytes" for b in self.budgets)

    def compress(self, plan: ModelPlan, *, calibrate_model: bool = True) -> nn.Module:
        return apply_plan(self.model, plan, self.example_input, calib_data=self.calib,
                          round_to=self.target.accelerates.channel_multiple, reduce_range=self.reduce_range,
                          space=self.space, calibrate_model=calibrate_model)

    def quantize(self, model: nn.Module, plan: ModelPlan) -> nn.Module:
        """`model`, already of `plan`'s structure (pruned, at its input size and depth, its surgery
        done: a fine-tuned float stage), given `plan`'s bit widths, N:M patterns and sparsity, and
        calibrated on its own weights."""
        gone = self.space.gone(plan)
        layers = {f: replace(lp, keep_ratio=1.0) for f, lp in plan.layers.items() if not inside(f, gone)}
        return apply_plan(model, ModelPlan(layers=layers), self.example_input, calib_data=self.calib,
                          reduce_range=self.reduce_range)

    def budget_macs(self, cost: Cost) -> int:
        # N:M only lowers the work on a target whose runtime has N:M kernels.
        return cost.effective_macs if any(self.target.accelerates.nm) else cost.macs

    def violations(self, cost: Cost, latency_ms: float) -> list[float]:
        measured = {"macs": self.budget_macs(cost), "latency_ms": latency_ms, "bytes": cost.bytes}
        return [b.violation(measured[b.metric], self.base.macs) for b in self.budgets]

    def measure(self, plan: ModelPlan, rivals: list[tuple[float, tuple[float, ...]]] | None = None) -> dict:
        """Apply and score one plan: the metrics a trial records. Within a search, `rivals` are
        the (accuracy, `costs`) of the trials measured so far that meet every budget; the proxy
        may then stop early on a plan that trails a rival no costlier, or that is far over a
        budget (`PROXY_STAGES`). Without `rivals` every plan is scored in full."""
        compressed = self.compress(plan, calibrate_model=self.proxy.needs_model)
        cost = model_cost(compressed, self.example_input)
        estimate = self.latency(compressed)
        latency_ms = float(estimate.total_ms)
        violations = self.violations(cost, latency_ms)
        bar, rough = None, False
        if rivals is not None:
            costs = self.costs(latency_ms, cost.bytes)
            bar = max((acc for acc, theirs in rivals if all(t <= c for t, c in zip(theirs, costs))), default=None)
            rough = max(violations, default=0.0) > FAR_OVER
        accuracy, images = self.proxy(compressed, plan, bar=bar, rough=rough)
        return {
            "proxy_accuracy": float(accuracy), "proxy_images": images, "latency_ms": latency_ms,
            "latency_source": estimate.source, "macs": cost.macs, "effective_macs": cost.effective_macs,
            "budget_macs": self.budget_macs(cost), "bytes": cost.bytes, "params": cost.params,
            "violations": violations,
        }

    def costs(self, latency_ms: float, size_bytes: int) -> list[float]:
        """The objectives after the accuracy, all minimized: latency, and bytes under a size budget."""
        return [latency_ms] + ([float(size_bytes)] if self.size_objective else [])

    def values(self, metrics: dict) -> list[float]:
        return [metrics["proxy_accuracy"], *self.costs(metrics["latency_ms"], metrics["bytes"])]


class Objective:
    """The Optuna objective: a plan per trial, each plan evaluated once.

    A plan already in the study (finished, or being measured by another worker) is pruned as a
    duplicate: it costs nothing and is not counted. A trial numbered after `trials` others that
    are finished or under way is pruned too, so parallel workers end with exactly `trials`.
    """

    def __init__(self, context: Context, *, trials: int) -> None:
        self.context = context
        self.trials = trials

    def __call__(self, trial: optuna.Trial) -> list[float]:
        # First thing: fail_orphans and the trial count below go by it.
        trial.set_user_attr(WORKER, worker_id())
        plan = suggest_plan(trial, self.context.space)
        key = plan.key()
        twin = self._twin(trial, key)
        if twin is not None:
            trial.set_user_attr("duplicate_of", twin)
            raise optuna.TrialPruned(f"plan {key} is trial {twin}'s")
        trial.set_user_attr(PLAN_KEY, key)  # visible to other workers while this one measures
        if self._ahead(trial) >= self.trials:
            raise optuna.TrialPruned(f"the study already has {self.trials} trials")
        metrics = self.context.measure(plan, rivals=self._rivals(trial))
        if not all(math.isfinite(v) for v in self.context.values(metrics)):
            raise optuna.TrialPruned(f"non-finite score for plan {key}")
        trial.set_user_attr(PLAN, json.dumps(plan.to_dict()))
        trial.set_user_attr(METRICS, {k: v for k, v in metrics.items() if k != "violations"})
        trial.set_user_attr(CONSTRAINTS, metrics["violations"])
        return self.context.values(metrics)

    @staticmethod
    def _others(trial: optuna.Trial) -> list[optuna.trial.FrozenTrial]:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        return [t for t in trial.study.get_trials(deepcopy=False, states=states) if t.number != trial.number]

    @staticmethod
    def _rivals(trial: optuna.Trial) -> list[tuple[float, tuple[float, ...]]]:
        """(accuracy, costs) of the finished trials that meet every budget, from the storage, so
        that parallel workers see each other's."""
        finished = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return [(t.values[0], tuple(t.values[1:])) for t in finished
                if CONSTRAINTS in t.user_attrs and all(v <= 0 for v in t.user_attrs[CONSTRAINTS])]

    def _twin(self, trial: optuna.Trial, key: str) -> int | None:
        return next((t.number for t in self._others(trial) if t.user_attrs.get(PLAN_KEY) == key), None)

    def _ahead(self, trial: optuna.Trial) -> int:
        """Finished or running trials numbered before this one. A running trial counts as soon
        as its worker has signed it, before it records its plan: left out, it and this trial could
        both go on and the study end one over (seen: 13 of 12). Counting one that then turns out a
        duplicate only prunes this trial too early, and the worker draws another. An unsigned
        one was killed before its first line, or is a moment from signing."""
        return sum(1 for t in self._others(trial) if t.number < trial.number
                   and (WORKER in t.user_attrs if t.state == optuna.trial.TrialState.RUNNING
                        else PLAN_KEY in t.user_attrs))
