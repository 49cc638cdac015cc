"""Fine-tune the best candidates: QAT at their bit widths, N:M masks and pruned structure kept,
distilled from the original model; then measure them on data the search never saw.

Before that, a wider set is screened (successive halving): each gets a short fine-tune by the
same recipe and is scored on the proxy split, and only the best go on to the full fine-tune. The
proxy before any fine-tuning ranks pruned candidates poorly: fine-tuning recovers much of what
pruning costs it (on the issue-5 benchmark the hand plan's proxy was 52.9 %, 61.8 % after
fine-tuning), and a short fine-tune ranks them closer to the full one (BENCHMARKS.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from edgeopt.errors import EdgeoptError
from edgeopt.search.objective import Context
from edgeopt.search.select import Candidate
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
    max_drop: float = 1.0  # accuracy points a faster candidate may lose to the most accurate
    # ... and how much faster on the target it must be to be worth them (measured: without it the
    # rule gave 0.5 points away for 0.8 % of pi4 latency).
    min_speedup: float = 1.1
    # Proxy points below the most accurate candidate within which faster Pareto candidates are
    # fine-tuned too. Fine-tuning closes most of a pruned model's proxy gap: on edgenet-64 and the
    # CIFAR-10 subset (4 epochs) plans 8 proxy points apart ended 0.7 apart, 23 apart ended 2.7.
    proxy_spread: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.screen, bool) or not isinstance(self.screen, int) or self.screen < 0:
            raise EdgeoptError(f"--screen must be a whole number of candidates, 0 or more, got {self.screen!r}.")
        if self.screen_epochs is not None and not self.screen_epochs >= 0:
            raise EdgeoptError(f"--screen-epochs must be 0 or more, got {self.screen_epochs!r}.")

    @property
    def screen_length(self) -> float:
        return self.epochs / 8 if self.screen_epochs is None else self.screen_epochs


@dataclass(frozen=True)
class Finetuned:
    candidate: Candidate  # with .accuracy set to the validation accuracy after fine-tuning
    model: nn.Module


def _tuned(candidate: Candidate, context: Context, *, data, config: FinetuneConfig, epochs: float,
           seed: int, label: str, progress: bool) -> nn.Module | None:
    """The candidate's compressed model after `epochs` of fine-tuning, or None (with a warning)
    if its loss turned non-finite."""
    model = context.compress(candidate.plan)
    if epochs > 0:
        try:
            train(model, data.train, epochs=epochs, lr=config.lr, batch_size=config.batch_size,
                  teacher=context.model, seed=seed,
                  progress=f"{label} (trial {candidate.trial})" if progress else None)
        except NonFiniteLoss as exc:
            log.warning("Dropped trial %d from %s: %s", candidate.trial, label.split()[0], exc)
            return None
    return model


def screening(config: FinetuneConfig, available: int) -> bool:
    """Whether to screen `available` candidates: only when there are more than `top` of them
    and the short fine-tune is shorter than the full one."""
    return config.screen > config.top and available > config.top and 0 < config.screen_length < config.epochs


def screen(candidates: list[Candidate], context: Context, *, data, config: FinetuneConfig,
           seed: int = 0, progress: bool = True) -> list[Candidate]:
    """Each candidate with `screened_accuracy` set: proxy-split top-1 after `screen_length` epochs
    of fine-tuning (the proxy split, not validation, so that the final accuracy stays unbiased)."""
    out = []
    for i, candidate in enumerate(candidates, 1):
        model = _tuned(candidate, context, data=data, config=config, epochs=config.screen_length, seed=seed,
                       label=f"screen {i}/{len(candidates)}", progress=progress)
        if model is not None:
            out.append(candidate.screened(evaluate(model, data.proxy)))
    return out


def finetune(candidates: list[Candidate], context: Context, *, data, config: FinetuneConfig,
             seed: int = 0, progress: bool = True) -> list[Finetuned]:
    """Fine-tune each candidate in turn; one whose loss turns non-finite is dropped with a
    warning and the others go on."""
    results = []
    for i, candidate in enumerate(candidates, 1):
        model = _tuned(candidate, context, data=data, config=config, epochs=config.epochs, seed=seed,
                       label=f"fine-tune {i}/{len(candidates)}", progress=progress)
        if model is not None:
            results.append(Finetuned(candidate.finetuned(evaluate(model, data.val)), model))
    return results
