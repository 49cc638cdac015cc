"""Fine-tune the best candidates: QAT at their bit widths, N:M masks and pruned structure kept,
distilled from the original model; then measure them on data the search never saw."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from edgeopt.search.objective import Context
from edgeopt.search.select import Candidate
from edgeopt.search.training import NonFiniteLoss, evaluate, train

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How the top candidates are fine-tuned, and how close to the best a faster one may be."""

    top: int = 3
    epochs: float = 1.0
    lr: float = 5e-4  # AdamW (edgeopt.search.training): larger rates knock BN-folded, quantized weights off
    batch_size: int = 64
    max_drop: float = 1.0  # accuracy points a faster candidate may lose to the most accurate
    # ... and how much faster on the target it must be to be worth them (measured: without it the
    # rule gave 0.5 points away for 0.8 % of pi4 latency).
    min_speedup: float = 1.1
    # Proxy points below the most accurate candidate within which faster Pareto candidates are
    # fine-tuned too. Fine-tuning closes most of a pruned model's proxy gap: on edgenet-64 and the
    # CIFAR-10 subset (4 epochs) plans 8 proxy points apart ended 0.7 apart, 23 apart ended 2.7.
    proxy_spread: float = 10.0


@dataclass(frozen=True)
class Finetuned:
    candidate: Candidate  # with .accuracy set to the validation accuracy after fine-tuning
    model: nn.Module


def finetune(candidates: list[Candidate], context: Context, *, data, config: FinetuneConfig,
             seed: int = 0) -> list[Finetuned]:
    """Fine-tune each candidate in turn; one whose loss turns non-finite is dropped with a
    warning and the others go on."""
    results = []
    for i, candidate in enumerate(candidates, 1):
        model = context.compress(candidate.plan)
        if config.epochs > 0:
            try:
                train(model, data.train, epochs=config.epochs, lr=config.lr,
                      batch_size=config.batch_size, teacher=context.model, seed=seed,
                      progress=f"fine-tune {i}/{len(candidates)} (trial {candidate.trial})")
            except NonFiniteLoss as exc:
                log.warning("Dropped trial %d from fine-tuning: %s", candidate.trial, exc)
                continue
        accuracy = evaluate(model, data.val)
        results.append(Finetuned(candidate.finetuned(accuracy), model))
    return results
