"""Candidates of a finished search and the documented rule that selects one.

The rule: among candidates that meet every budget, find the most accurate; among those within
`max_drop` accuracy points of it and at least `min_speedup` times faster on the target, take the
fastest; if there is none, the most accurate. Accuracy is top-1 on the proxy split (held out from
training): after fine-tuning where a candidate was fine-tuned, else before. The validation
accuracy of a fine-tuned candidate is reported, never selected on, so that it stays an unbiased
figure of the model the rule picked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from edgeopt.plan import ModelPlan

# The rule's defaults: accuracy points a faster candidate may lose to the most accurate, and how
# much faster on the target it must be to be worth them. A budget is what the user can afford, so
# speed beyond it buys little: the trade is the one issue 18 counts as a win (1.25x faster within
# 0.3 points). With 1 point for 1.1x, the edgenet's pi4 run at 50% gave 0.70 validation points
# away (McNemar p = 0.18) for 1.105x under the budget (BENCHMARKS.md); without a speed-up floor,
# 0.5 points for 0.8% of pi4 latency.
MAX_DROP = 0.3
MIN_SPEEDUP = 1.25


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One evaluated plan, with what the search measured and (maybe) what fine-tuning gave."""

    trial: int
    plan: ModelPlan
    proxy_accuracy: float
    latency_ms: float
    macs: int
    effective_macs: int
    bytes: int
    violations: tuple[float, ...] = ()  # one per budget; <= 0 means met
    screened_accuracy: float | None = None  # proxy-split top-1 after the short screening fine-tune
    accuracy: float | None = None  # validation top-1 after fine-tuning (reported only)
    tuned_proxy_accuracy: float | None = None  # proxy-split top-1 after fine-tuning (what selection compares)
    latency_measured: bool = False  # latency_ms measured whole on this machine, not estimated
    proxy_images: int | None = None  # proxy images scored (fewer where the search stopped early; None: no images)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.violations)

    @property
    def best_accuracy(self) -> float:
        return self.accuracy if self.accuracy is not None else self.proxy_accuracy

    @property
    def selection_accuracy(self) -> float:
        """What the selection rule compares: proxy-split top-1, after fine-tuning where there was one."""
        return self.tuned_proxy_accuracy if self.tuned_proxy_accuracy is not None else self.proxy_accuracy

    @property
    def total_violation(self) -> float:
        return sum(max(v, 0.0) for v in self.violations)

    def finetuned(self, accuracy: float, proxy_accuracy: float | None = None) -> Candidate:
        return replace(self, accuracy=accuracy, tuned_proxy_accuracy=proxy_accuracy)

    def screened(self, accuracy: float) -> Candidate:
        return replace(self, screened_accuracy=accuracy)


def pareto_front(candidates: list[Candidate], *, accuracy=lambda c: c.proxy_accuracy) -> list[Candidate]:
    """Candidates no other beats on both accuracy (higher) and target latency (lower)."""
    front = []
    for c in candidates:
        dominated = any(
            accuracy(o) >= accuracy(c) and o.latency_ms <= c.latency_ms
            and (accuracy(o) > accuracy(c) or o.latency_ms < c.latency_ms)
            for o in candidates
        )
        if not dominated:
            front.append(c)
    return sorted(front, key=lambda c: c.latency_ms)


def finetune_order(candidates: list[Candidate], top: int, *, spread: float,
                   hand: Candidate | None = None) -> list[Candidate]:
    """Which candidates to fine-tune, in order.

    First the most accurate feasible candidate on the Pareto front; then `hand`, the plan a user
    would make by hand (so the answer is never worse than it after fine-tuning); then faster front
    candidates whose proxy accuracy is within `spread` points of the most accurate, spaced evenly
    in latency from the fastest of them (fine-tuning recovers much of what pruning costs the
    proxy, so a faster candidate may end within the selection rule's `max_drop`); then the other
    feasible ones within the spread, front first; then the rest of the front and the other
    feasible ones; then the infeasible closest to the budget.
    """
    feasible = [c for c in candidates if c.feasible]
    front = pareto_front(feasible)  # fastest first
    chosen: list[Candidate] = []
    floor = float("-inf")  # proxy accuracy below which a plan is outside the spread
    if front:
        best = max(front, key=lambda c: (c.proxy_accuracy, -c.latency_ms))
        floor = best.proxy_accuracy - spread
        chosen.append(best)
        if hand is not None and hand.trial != best.trial:
            chosen.append(hand)
        faster = [c for c in front if c.trial not in {x.trial for x in chosen} and c.proxy_accuracy >= floor]
        slots = min(top - len(chosen), len(faster))
        picks: list[int] = []
        if slots == 1:
            picks = [0]
        elif slots > 1:
            picks = sorted({round(i * (len(faster) - 1) / (slots - 1)) for i in range(slots)})
        chosen += [faster[i] for i in picks]
    taken = {c.trial for c in chosen}
    on_front = {c.trial for c in front}
    # Plans within the spread first, on or off the front: a fast front plan far below it would
    # only take a screening slot (measured: five of ten went to plans with a 15-40 % proxy).
    chosen += sorted((c for c in feasible if c.trial not in taken),
                     key=lambda c: (c.proxy_accuracy < floor, c.trial not in on_front, -c.proxy_accuracy,
                                    c.latency_ms))
    if len(chosen) < top:
        chosen += closest(candidates, top - len(chosen))
    return chosen[:top]


def select(candidates: list[Candidate], *, max_drop: float, min_speedup: float,
           accuracy=lambda c: c.selection_accuracy) -> Candidate | None:
    """The selected candidate by the rule in this module's docstring, or None if none is feasible."""
    feasible = [c for c in candidates if c.feasible]
    if not feasible:
        return None
    best = max(feasible, key=lambda c: (accuracy(c), -c.latency_ms))
    faster = [c for c in feasible if accuracy(c) >= accuracy(best) - max_drop
              and c.latency_ms * min_speedup <= best.latency_ms]
    return min(faster, key=lambda c: (c.latency_ms, -accuracy(c))) if faster else best


def finalists(screened: list[Candidate], top: int, *, hand: Candidate | None, max_drop: float,
              min_speedup: float) -> list[Candidate]:
    """Which screened candidates to fine-tune fully: the one the selection rule picks on the
    screened accuracy, the hand plan (the answer is never worse than it), then the most accurate
    screened ones."""
    scored = [c for c in screened if c.screened_accuracy is not None]
    pick = select(scored, max_drop=max_drop, min_speedup=min_speedup, accuracy=lambda c: c.screened_accuracy)
    hand = next((c for c in scored if hand is not None and c.trial == hand.trial), None)
    ranked = sorted(scored, key=lambda c: (not c.feasible, -c.screened_accuracy, c.latency_ms))
    chosen: list[Candidate] = []
    for c in [pick, hand, *ranked]:
        if c is not None and c.trial not in {x.trial for x in chosen}:
            chosen.append(c)
    return chosen[:top]


def closest(candidates: list[Candidate], n: int = 3) -> list[Candidate]:
    """The infeasible candidates that miss the budget by the least (relative violation)."""
    infeasible = [c for c in candidates if not c.feasible]
    return sorted(infeasible, key=lambda c: (c.total_violation, -c.best_accuracy))[:n]
