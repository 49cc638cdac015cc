"""Choosing a dynamic inference cascade from the fine-tuned candidates, and writing it.

A cascade (small, large, threshold) runs the small model on every input and the large one on
those where the small one's highest softmax probability is below the threshold. Its expected
latency on the target is t_small + share sent on x t_large, both on the target's clock (host:
measured whole, as the fine-tuned candidates are). The pair and threshold are chosen on the proxy
split, as the selection is; validation only reports the choice. A cascade is kept only where the
selection rule itself (`edgeopt.search.select.select`: the most accurate, or one within
`max_drop` points of it and `min_speedup` times faster), run over every single fine-tuned model
that meets the budgets and every cascade point whose expected latency meets a latency budget,
picks a cascade: then no single model is as accurate at no more latency.

A cascade pays only with a small member much faster than the large one (at 0.4x of it, 30% of
the inputs may go on for 0.7x of the large one's time), and the finalists all sit near the
budget; so a few fast candidates are screened for the role and the best is fine-tuned, longer
than the finalists (`small_members`). It joins the cascade's choice, not the selection: the
selected model stays the best of the finalists' one recipe. The device side is
`edgeopt.deploy.cascade.Cascade`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeopt.deploy.cascade import CASCADE_FILE
from edgeopt.evaluators.onnx_export import export_onnx
from edgeopt.search.finetune import Finetuned
from edgeopt.search.select import Candidate
from edgeopt.search.training import confidences

THRESHOLDS = tuple(round(t, 3) for t in np.linspace(0.1, 0.99, 90))  # the grid the threshold is chosen from
SMALL_MEMBER_SHARE = 0.4  # the small member's latency at most this share of the most accurate finalist's
SMALL_MEMBER_SCREENED = 4  # fast candidates screened for the role; the best screened is fine-tuned
# The small member's fine-tune, in multiples of the finalists' epochs. On issue 18's benchmark the
# fastest candidates lost 17-31 points in the finalists' 0.25 epoch (BENCHMARKS.md, "The cascade
# on the benchmark"), too many for a cascade; it is one model, and a fast one, so longer is cheap.
SMALL_MEMBER_EPOCHS = 4


@dataclass(frozen=True, kw_only=True)
class CascadeChoice:
    small: Finetuned
    large: Finetuned
    threshold: float
    accuracy: float  # proxy-split top-1 of the cascade
    share_sent_on: float  # of the proxy images
    expected_ms: float  # t_small + share x t_large
    worst_ms: float  # t_small + t_large: an input the small model is unsure of
    curve: tuple[tuple[float, float, float], ...]  # (threshold, proxy top-1, expected ms) of this pair

    def meets(self, budget_ms: float | None) -> bool:
        return budget_ms is None or self.expected_ms <= budget_ms


def points(confidence: np.ndarray, small_right: np.ndarray, large_right: np.ndarray, t_small: float,
           t_large: float, thresholds=THRESHOLDS) -> list[tuple[float, float, float]]:
    """(threshold, top-1 percent, expected ms) of one pair at each threshold."""
    out = []
    for t in thresholds:
        sent = confidence < t
        right = np.where(sent, large_right, small_right)
        out.append((float(t), 100.0 * float(right.mean()), t_small + float(sent.mean()) * t_large))
    return out


def small_members(candidates: list[Candidate], tuned: list[Finetuned], *, member_ok) -> list[Candidate]:
    """The candidates to screen for a cascade's small member, best first, or none where a
    fine-tuned one already is one: up to `SMALL_MEMBER_SCREENED` of the search's candidates at
    most `SMALL_MEMBER_SHARE` of the most accurate fine-tuned candidate's latency, those with a
    screening accuracy first (it ranks pruned plans well), then by the proxy's. Each member must
    meet the budgets other than latency (`member_ok`)."""
    if not tuned:
        return []
    large = max(tuned, key=lambda t: t.candidate.selection_accuracy).candidate
    limit = SMALL_MEMBER_SHARE * large.latency_ms
    if any(t.candidate.latency_ms <= limit and member_ok(t.candidate) for t in tuned):
        return []
    done = {t.candidate.trial for t in tuned}
    fast = [c for c in candidates if c.latency_ms <= limit and c.trial not in done and member_ok(c)]
    fast.sort(key=lambda c: (c.screened_accuracy is None, -(c.screened_accuracy or c.proxy_accuracy), c.latency_ms))
    return fast[:SMALL_MEMBER_SCREENED]


def choose_cascade(tuned: list[Finetuned], dataset, *, budget_ms: float | None, member_ok, max_drop: float,
                   min_speedup: float) -> CascadeChoice | None:
    """The cascade of two of `tuned` that the selection rule picks over every single one meeting
    the budgets (the module docstring says how), or None. A latency budget (`budget_ms`) is read
    on the expected latency, so the large member may exceed it alone; every other budget (MACs,
    size) each member must meet itself (`member_ok`)."""
    feasible = [t for t in tuned if member_ok(t.candidate)]
    singles = [(t.candidate.selection_accuracy, t.candidate.latency_ms, None) for t in feasible if t.candidate.feasible]
    if len(feasible) < 2 or not singles:
        return None
    scored = {t.candidate.trial: [x.numpy() for x in confidences(t.model, dataset)] for t in feasible}
    options: list[tuple[float, float, CascadeChoice | None]] = list(singles)
    for small in feasible:
        for large in feasible:
            ts, tl = small.candidate.latency_ms, large.candidate.latency_ms
            if ts >= tl or large.candidate.selection_accuracy <= small.candidate.selection_accuracy:
                continue
            conf, small_right = scored[small.candidate.trial]
            _, large_right = scored[large.candidate.trial]
            curve = tuple(points(conf, small_right, large_right, ts, tl))
            for t, acc, ms in curve:
                if budget_ms is None or ms <= budget_ms:
                    options.append((acc, ms, CascadeChoice(
                        small=small, large=large, threshold=t, accuracy=acc, share_sent_on=float((conf < t).mean()),
                        expected_ms=ms, worst_ms=ts + tl, curve=curve)))
    # The selection rule of edgeopt.search.select, over single models and cascade points alike.
    best = max(options, key=lambda o: (o[0], -o[1], o[2] is None))
    faster = [o for o in options if o[0] >= best[0] - max_drop and o[1] * min_speedup <= best[1]]
    pick = min(faster, key=lambda o: (o[1], -o[0], o[2] is not None)) if faster else best
    return pick[2]


def on_validation(choice: CascadeChoice, dataset) -> dict:
    """The chosen cascade's top-1, share sent on and expected latency on the validation images,
    and its curve over the thresholds there (reported and drawn only, never chosen on)."""
    conf, small_right = (x.numpy() for x in confidences(choice.small.model, dataset))
    _, large_right = (x.numpy() for x in confidences(choice.large.model, dataset))
    ts, tl = choice.small.candidate.latency_ms, choice.large.candidate.latency_ms
    share = float((conf < choice.threshold).mean())
    accuracy = 100.0 * float(np.where(conf < choice.threshold, large_right, small_right).mean())
    return {"accuracy": accuracy, "share_sent_on": share, "expected_ms": ts + share * tl,
            "curve": points(conf, small_right, large_right, ts, tl)}


def write_cascade(folder: Path, choice: CascadeChoice, *, example: torch.Tensor, preprocessing: dict,
                  validation: dict, latency_source: str) -> dict:
    """cascade/: both ONNX files and cascade.json. Returns what cascade.json holds."""
    folder.mkdir(parents=True, exist_ok=True)
    spec: dict = {"threshold": choice.threshold, "expected_latency_ms": validation["expected_ms"],
                  "worst_case_ms": choice.worst_ms, "accuracy": validation["accuracy"],
                  "share_sent_on": validation["share_sent_on"], "accuracy_of": "validation",
                  "proxy": {"accuracy": choice.accuracy, "share_sent_on": choice.share_sent_on,
                            "expected_latency_ms": choice.expected_ms},
                  "latency_source": latency_source,
                  "curve": [{"threshold": t, "accuracy": a, "expected_ms": m} for t, a, m in validation["curve"]]}
    for role, member in (("small", choice.small), ("large", choice.large)):
        file = f"{role}.onnx"
        export_onnx(member.model, example, folder / file, preprocessing=preprocessing)
        spec[role] = {"file": file, "trial": member.candidate.trial, "latency_ms": member.candidate.latency_ms,
                      "accuracy": member.candidate.accuracy, "plan": member.candidate.plan.to_dict()}
    (folder / CASCADE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return spec
