"""Choosing a dynamic inference cascade from the fine-tuned candidates, and writing it.

A cascade (small, large, threshold) runs the small model on every input and the large one on
those where the small one's highest softmax probability is below the threshold. Its expected
latency on the target is t_small + share sent on x t_large, both on the target's clock (host:
measured whole, as the fine-tuned candidates are). The pair and threshold are chosen on the proxy
split, as the selection is; validation only reports the choice. A cascade is kept only where it
beats every single fine-tuned model that meets the budget: none of them is at least as accurate
at no more latency, and it is more accurate than the selected model within the latency budget
(without one: at no more latency than the selected model), or as accurate and faster. The device
side is `edgeopt.deploy.cascade.Cascade`.
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


def choose_cascade(tuned: list[Finetuned], dataset, *, budget_ms: float | None, member_ok,
                   selected: Candidate | None) -> CascadeChoice | None:
    """The best cascade of two of `tuned` that beats every single one meeting the budgets (the
    module docstring says how), or None. A latency budget (`budget_ms`) is read on the expected
    latency, so the large member may exceed it alone; every other budget (MACs, size) each member
    must meet itself (`member_ok`)."""
    feasible = [t for t in tuned if member_ok(t.candidate)]
    if len(feasible) < 2 or selected is None:
        return None
    scored = {t.candidate.trial: [x.numpy() for x in confidences(t.model, dataset)] for t in feasible}
    singles = [(t.candidate.selection_accuracy, t.candidate.latency_ms) for t in feasible if t.candidate.feasible]
    rival = (selected.selection_accuracy, selected.latency_ms)
    # Under a latency budget the cascade may spend all of it: more accurate than the selected
    # model within the budget, or as accurate and faster. Without one, at no more latency than it.
    room = budget_ms if budget_ms is not None else rival[1]
    best: CascadeChoice | None = None
    for small in feasible:
        for large in feasible:
            ts, tl = small.candidate.latency_ms, large.candidate.latency_ms
            if ts >= tl or large.candidate.selection_accuracy <= small.candidate.selection_accuracy:
                continue
            conf, small_right = scored[small.candidate.trial]
            _, large_right = scored[large.candidate.trial]
            curve = points(conf, small_right, large_right, ts, tl)
            for t, acc, ms in curve:
                if budget_ms is not None and ms > budget_ms:
                    continue
                if any(a >= acc and m <= ms for a, m in singles):
                    continue  # a single model is as good
                if not ((acc > rival[0] and ms <= room) or (ms < rival[1] and acc >= rival[0])):
                    continue
                if best is None or (acc, -ms) > (best.accuracy, -best.expected_ms):
                    share = float((conf < t).mean())
                    best = CascadeChoice(small=small, large=large, threshold=t, accuracy=acc, share_sent_on=share,
                                         expected_ms=ms, worst_ms=ts + tl, curve=tuple(curve))
    return best


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
