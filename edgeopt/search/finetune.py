"""Fine-tune the best candidates: their pruned structure and zeroed weights kept, distilled from
the original model, in float first and then quantized (calibrated on the fine-tuned weights; a
plan with bits below 8 is fine-tuned on at its bit widths, QAT, for the last quarter); then
measure them on data the search never saw.

Before that, a wider set is screened (successive halving): each gets a short fine-tune by the
same recipe and is scored on the proxy split, and only the best go on to the full fine-tune. The
proxy before any fine-tuning ranks pruned candidates poorly: fine-tuning recovers much of what
pruning costs it (on the issue-5 benchmark the hand plan's proxy was 52.9 %, 61.8 % after
fine-tuning), and a short fine-tune ranks them closer to the full one (BENCHMARKS.md).

Every result can be kept in a `FinetuneStore`, a folder keyed by everything that made it (the
base model, the data, the calibration, the plan, the recipe, the seed): a run that is resumed
after a crash, or another run on the same model and data, never trains the same thing twice."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeopt.errors import EdgeoptError
from edgeopt.plan import ModelPlan
from edgeopt.search.objective import Context
from edgeopt.search.select import MAX_DROP, MIN_SPEEDUP, Candidate
from edgeopt.search.study import fingerprint
from edgeopt.search.tasks import FinetuneTasks
from edgeopt.search.training import NonFiniteLoss, evaluate, train

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How the top candidates are fine-tuned, and how close to the best a faster one may be."""

    top: int = 3
    epochs: float = 1.0
    # Screening: this many candidates get `screen_epochs` of fine-tuning first (default: an eighth
    # of `epochs`, so ten of them cost about one more full fine-tune), and the `top` of them are
    # fine-tuned fully. No screening when screen <= top or screen_epochs >= epochs.
    screen: int = 10
    screen_epochs: float | None = None
    lr: float = 5e-4  # AdamW (edgeopt.search.training): larger rates knock BN-folded, quantized weights off
    batch_size: int = 64
    # The share of a quantized plan's fine-tuning spent in float before it is quantized (calibrated
    # on the fine-tuned weights) and fine-tuned on at its bit widths (QAT) for the rest; 0: QAT
    # from the first step; None: by the plan's bit widths (`float_share_for`). See `_tuned`.
    float_share: float | None = None
    # The selection rule's trade (edgeopt.search.select says why these defaults).
    max_drop: float = MAX_DROP
    min_speedup: float = MIN_SPEEDUP
    # Proxy points below the most accurate candidate within which faster Pareto candidates are
    # fine-tuned too. Fine-tuning closes most of a pruned model's proxy gap: on edgenet-64 and the
    # CIFAR-10 subset (4 epochs) plans 8 proxy points apart ended 0.7 apart, 23 apart ended 2.7.
    proxy_spread: float = 10.0
    # A dynamic inference cascade of two fine-tuned candidates (one more fine-tuned as its small
    # member), kept where the selection rule picks it over every single one (edgeopt.search.cascade).
    cascade: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.screen, bool) or not isinstance(self.screen, int) or self.screen < 0:
            raise EdgeoptError(f"--screen must be a whole number of candidates, 0 or more, got {self.screen!r}.")
        if self.screen_epochs is not None and not self.screen_epochs >= 0:
            raise EdgeoptError(f"--screen-epochs must be 0 or more, got {self.screen_epochs!r}.")
        if self.float_share is not None and not 0.0 <= self.float_share <= 1.0:
            raise EdgeoptError(f"The float share of fine-tuning must be from 0 to 1, got {self.float_share!r}.")

    @property
    def screen_length(self) -> float:
        return self.epochs / 8 if self.screen_epochs is None else self.screen_epochs


# Bump when what a stored result means changes: old entries are then ignored. 2: compressed layers
# keep their zeroed weights as `weight_mask` (N:M or unstructured), not `nm_mask`; 3: integer residual
# sums (`edgeopt.spaces.residual`).
STORE_VERSION = 3


class FinetuneStore:
    """Fine-tuned results in a folder, one file per (context, plan, recipe, seed).

    A screening result keeps only its proxy score; a full fine-tune keeps the whole model (its
    compressed structure and fake-quantized weights, pickled: only load a store you made) and its
    validation accuracy. Files are written aside and renamed, so a crash mid-write leaves no half
    entry, and processes sharing the folder never read one.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._contexts: dict[int, str] = {}

    def key(self, context: Context, data, plan: ModelPlan, *, epochs: float, config: FinetuneConfig,
            seed: int, kind: str) -> str:
        made = self._contexts.get(id(context))
        if made is None:
            # Everything but the plan and recipe that decides what fine-tuning produces and scores.
            made = fingerprint(STORE_VERSION, type(context.model).__name__, *context.model.state_dict().values(),
                               *context.calib, context.target.accelerates.channel_multiple, context.reduce_range,
                               data.fingerprint, *data.proxy.tensors, *data.val.tensors)
            self._contexts[id(context)] = made
        # The float share joins the key only where it is not 0: results of the QAT-only recipe keep theirs.
        share = float_share_for(plan, config)
        share = (share,) if share else ()
        return fingerprint(made, kind, plan.key(), float(epochs), config.lr, config.batch_size, seed, *share)

    def has(self, key: str) -> bool:
        return (self.folder / f"{key}.pt").is_file()

    def load(self, key: str) -> dict | None:
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)  # our own file: a pickled model
        except Exception as exc:  # noqa: BLE001 -- an unreadable entry is trained again, not fatal
            log.warning("Ignoring the unreadable fine-tune result %s (%s); training it again.", path, exc)
            return None

    def save(self, key: str, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f"{key}.{os.getpid()}.partial"
        torch.save(record, partial)
        os.replace(partial, self.folder / f"{key}.pt")


@dataclass(frozen=True)
class Finetuned:
    candidate: Candidate  # with .accuracy (validation) and .tuned_proxy_accuracy set after fine-tuning
    model: nn.Module


# Measured on the edgenet's uniform int8 plans (bench/two_stage.py, 0.25 epoch, 5,000 validation
# images): all in float and then quantized beat QAT throughout by 0.38 points at keep 0.75
# (McNemar p = 0.05) and 2.62 at keep 0.5 (p = 7e-12), and a QAT quarter after the float part
# lost 0.44 and 0.34 of that again. Bits below 8 are where QAT is known to be needed (not
# measured here), so such plans keep a QAT quarter.
INT8_FLOAT_SHARE = 1.0
LOW_BIT_FLOAT_SHARE = 0.75


def float_share_for(plan: ModelPlan, config: FinetuneConfig) -> float:
    """The float share of fine-tuning `plan` by `config`: 0 where nothing is quantized, else the
    config's, or by default the one measured for the plan's bit widths."""
    if all((lp.w_bits, lp.a_bits) == (32, 32) for lp in plan.layers.values()):
        return 0.0
    if config.float_share is not None:
        return config.float_share
    return LOW_BIT_FLOAT_SHARE if any(lp.w_bits < 8 for lp in plan.layers.values()) else INT8_FLOAT_SHARE


def _tuned(plan: ModelPlan, context: Context, *, data, lr: float, batch_size: int, epochs: float,
           seed: int, label: str, progress: bool, float_share: float = 0.0) -> nn.Module | None:
    """The plan's compressed model after `epochs` of fine-tuning, or None (with a warning) if its
    loss turned non-finite.

    With `float_share`, a quantized plan is first fine-tuned in float (its pruning, zeroed
    weights, input size and depth, all bit widths 32) for that share of the epochs, then quantized
    as `apply_plan` quantizes (BatchNorm already folded; activation ranges calibrated on the
    fine-tuned weights) and fine-tuned at its bit widths for the rest: the quantizers then start
    from weights that no longer move by what pruning cost them."""
    stages = [(plan, epochs)]
    if float_share > 0 and epochs > 0:
        stages = [(plan.in_float(), epochs * float_share), (plan, epochs * (1 - float_share))]
    model = None
    for i, (stage, length) in enumerate(stages):
        model = context.compress(stage) if model is None else context.quantize(model, stage)
        if length > 0:
            try:
                train(model, data.train, epochs=length, lr=lr, batch_size=batch_size, teacher=context.model,
                      seed=seed + i, progress=label if progress else None)
            except NonFiniteLoss as exc:
                log.warning("Dropped %s: %s", label, exc)
                return None
    return model


def _result(spec: dict, context: Context, *, data, store: FinetuneStore | None, progress: bool) -> dict:
    """What the task `spec` asks for: loaded from the store, or trained, scored and stored.
    A screening is scored on the proxy split and keeps no weights; a full fine-tune is scored on
    the proxy split (what the selection compares) and on validation (what is reported), and keeps
    the model. A stored full result from before the proxy score was kept gets it on loading."""
    record = store.load(spec["task"]) if store else None
    if record is None:
        started = time.perf_counter()
        plan = ModelPlan.from_json(spec["plan"])
        model = _tuned(plan, context, data=data, lr=spec["lr"], batch_size=spec["batch_size"], epochs=spec["epochs"],
                       seed=spec["seed"], label=spec["label"], progress=progress,
                       float_share=spec.get("float_share", 0.0))
        full = spec["kind"] == "full"
        score = None if model is None else evaluate(model, data.val if full else data.proxy)
        record = {"diverged": model is None, "seconds": time.perf_counter() - started, "accuracy": score,
                  "model": model if full else None,
                  "proxy_accuracy": evaluate(model, data.proxy) if full and model is not None else None}
        if store:
            store.save(spec["task"], record)
    elif record.get("model") is not None and record.get("proxy_accuracy") is None:
        record["proxy_accuracy"] = evaluate(record["model"], data.proxy)
    return record


def task_work(context: Context, *, data, store: FinetuneStore, progress: bool) -> Callable[[dict], tuple[dict, float]]:
    """What a process does with a fine-tune task it claimed: the result's attributes for the
    study (accuracy, whether it diverged, training seconds) and its value."""
    def work(spec: dict) -> tuple[dict, float]:
        record = _result(spec, context, data=data, store=store, progress=progress)
        return ({"accuracy": record["accuracy"], "diverged": record["diverged"],
                 "train_seconds": round(record["seconds"], 3)}, record["accuracy"] or 0.0)
    return work


def task_specs(candidates: list[Candidate], kind: str, context: Context, *, data, config: FinetuneConfig,
               seed: int, store: FinetuneStore | None) -> list[dict]:
    """One fine-tune task per candidate: what to train, by which recipe, and its key in the store."""
    epochs = config.screen_length if kind == "screen" else config.epochs
    word = "screen" if kind == "screen" else "fine-tune"
    return [{"task": store.key(context, data, c.plan, epochs=epochs, config=config, seed=seed, kind=kind) if store else None,
             "kind": kind, "plan": c.plan.to_json(), "epochs": float(epochs), "lr": config.lr,
             "float_share": float_share_for(c.plan, config),
             "batch_size": config.batch_size, "seed": seed, "trial": c.trial,
             "label": f"{word} {i}/{len(candidates)} (trial {c.trial})"} for i, c in enumerate(candidates, 1)]


def _results(candidates: list[Candidate], kind: str, context: Context, *, data, config: FinetuneConfig,
             seed: int, progress: bool, store: FinetuneStore | None, tasks: FinetuneTasks | None) -> list[dict]:
    """The result of fine-tuning each candidate (`kind` "screen" or "full"), in order. With
    `tasks` (and a store all workers reach), the fine-tunes are queued in the study and done by
    whichever process of it takes each; this one works on them too until all it needs are in."""
    specs = task_specs(candidates, kind, context, data=data, config=config, seed=seed, store=store)
    if tasks is None or store is None:
        return [_result(spec, context, data=data, store=store, progress=progress) for spec in specs]

    def on_wait(running: int) -> None:
        if progress:
            print(f"Waiting for {running} fine-tune{'s' if running != 1 else ''} other workers are running.",
                  file=sys.stderr)

    tasks.do(specs, stored=store.has, work=task_work(context, data=data, store=store, progress=progress),
             on_wait=on_wait)
    return [_result(spec, context, data=data, store=store, progress=progress) for spec in specs]  # loads them


def screening(config: FinetuneConfig, available: int) -> bool:
    """Whether to screen `available` candidates: only when there are more than `top` of them
    and the short fine-tune is shorter than the full one."""
    return config.screen > config.top and available > config.top and 0 < config.screen_length < config.epochs


def screen(candidates: list[Candidate], context: Context, *, data, config: FinetuneConfig,
           seed: int = 0, progress: bool = True, store: FinetuneStore | None = None,
           tasks: FinetuneTasks | None = None) -> list[Candidate]:
    """Each candidate with `screened_accuracy` set: proxy-split top-1 after `screen_length` epochs
    of fine-tuning (the proxy split, not validation, so that the final accuracy stays unbiased).
    One whose loss turned non-finite is left out."""
    records = _results(candidates, "screen", context, data=data, config=config, seed=seed, progress=progress,
                       store=store, tasks=tasks)
    return [c.screened(r["accuracy"]) for c, r in zip(candidates, records) if not r["diverged"]]


def finetune(candidates: list[Candidate], context: Context, *, data, config: FinetuneConfig,
             seed: int = 0, progress: bool = True, store: FinetuneStore | None = None,
             tasks: FinetuneTasks | None = None) -> list[Finetuned]:
    """Fine-tune each candidate; one whose loss turns non-finite is dropped with a warning and
    the others go on. With `store`, a result already there is loaded instead."""
    records = _results(candidates, "full", context, data=data, config=config, seed=seed, progress=progress,
                       store=store, tasks=tasks)
    return [Finetuned(c.finetuned(r["accuracy"], r.get("proxy_accuracy")), r["model"]) for c, r in zip(candidates, records)
            if not r["diverged"]]
