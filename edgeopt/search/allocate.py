"""Latency-aware allocation: starting plans that spend a budget where it costs the least accuracy.

A user prunes every layer alike and quantizes every layer or none. Layers differ twice over: in
what a change costs in accuracy (the sensitivity table, `edgeopt.search.sensitivity`: the share
of proxy predictions one change alone alters) and in what it buys on the target's clock (on x86
without VNNI an int8 dense convolution is faster than fp32, an int8 depthwise one is not; a
late layer at low resolution costs less per MAC than an early one). HALP (Shen et al., 2022)
allocates channels under a latency budget as a knapsack over importance and a latency table; HAWQ
chooses precisions by per-layer sensitivity. This module does both at once, greedily:

1. the budget's metric (latency on the target, or MACs) of the base with each single change
   (each prunable group at the sensitivity table's keep levels, each layer at w8a8, each smaller
   input size, each residual block dropped, each replacement of each block open to surgery)
   gives what that change saves; the other keep levels are interpolated;
2. from the unchanged model (and, by `optimize`, again from uniform int8: where int8 pays only
   with other changes, as when float gates or activations between int8 layers cost more than
   int8 saves, no single layer's int8 saves time and the path from fp32 never takes it), the
   move (one group to a lower keep ratio, one layer to int8, the input to a smaller size, one
   block dropped, or one block's activations, gates or kernels replaced) that saves the most
   metric per point of sensitivity is taken, again and again, until the sum of savings reaches
   the budget; and by `fit`, from TI's lite model where it is over the budget (on an x86 CPU
   without VNNI mobilenet_v3_small's lite model in fp32 took 0.56x the base's time at 64x64, and
   pruned to keep 0.75 0.38x: a path that starts from the lite model spends the rest of the
   budget on such moves, where a path from the base takes the blocks' replacements one by one);
3. the first plans on the path that meet the budget, and 10% under it, when measured for real,
   are the starting plans.

`restore` walks the other way, from a plan well under the budget that a user takes whole (TI's
lite model: every replacement in every block): it undoes the replacements that cost the most
accuracy per unit of metric they save, while the budget allows. On efficientnet_b0 at 64x64 on
host the lite int8 model took 0.45 ms of a 0.56 ms budget, and the path from fp32 or int8 never
reaches it (no single block's surgery pays alone there), so the slack was left unspent.

The savings are taken as additive, which they are not quite (a layer's cost depends on the
channels of its input and its output, and ops between layers do not shrink with them), so the
path is only a ranking of moves: each plan it proposes is measured before it is taken, and the
search measures it again and its sampler goes on from it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from edgeopt.plan import LayerPlan, ModelPlan, Surgery
from edgeopt.search.sensitivity import (SensitivityTable, _activations_key, _keep_levels, _weights_key, drop_key,
                                        input_key, surgery_changes, surgery_key)
from edgeopt.spaces.depth import inside
from edgeopt.spaces.space import SearchSpace

log = logging.getLogger(__name__)

INT8 = (8, 8)
MARGINS = (1.0, 0.9)  # starting plans at the budget and 10% under it (the savings are estimates)


def _interp(levels: dict[float, float], keep: float) -> float:
    xs = sorted(levels) + [1.0]
    return float(np.interp(keep, xs, [levels[k] for k in sorted(levels)] + [0.0]))


def allocate(space: SearchSpace, table: SensitivityTable, *, metric: Callable[[ModelPlan], float],
             limit: float, start: ModelPlan | None = None) -> list[ModelPlan]:
    """Plans whose metric (by the additive model) is at most `limit` times MARGINS, each with as
    little sensitivity as the greedy path finds from `start` (the unchanged model unless given; a
    start at full size without pruning: uniform int8, or TI's lite model, whose precision, surgery
    and dropped blocks the path keeps); [] when the start already meets `limit` or the space
    cannot reach it from there."""
    base_plan = start or space.uniform()
    if base_plan.input_scale != 1.0 or any(lp.keep_ratio != 1.0 for lp in base_plan.layers.values()):
        raise ValueError("allocate starts from a plan at full size without pruning")
    base = metric(base_plan)
    if base <= limit:
        return []
    groups = {g.root: g for g in space.prunable_groups if len(space.keep_choices(g)) > 1}
    # What each single change saves, measured where the table measured its drop.
    saved_keep: dict[str, dict[float, float]] = {}
    for root, group in groups.items():
        saved_keep[root] = {}
        for keep in _keep_levels(space.keep_choices(group)):
            plan = replace(base_plan, layers={**base_plan.layers, **{f: replace(base_plan[f], keep_ratio=keep)
                                                                     for f in group.layers}})
            saved_keep[root][keep] = base - metric(plan)
    saved_bits: dict[str, float] = {}
    keep_now = {root: 1.0 for root in groups}
    int8_now = {fqn for fqn, lp in base_plan.layers.items() if (lp.w_bits, lp.a_bits) == INT8}
    if INT8 in space.knobs.pairs:
        for layer in (layer for layer in space.layers if layer.fqn not in int8_now):
            plan = replace(base_plan, layers={**base_plan.layers,
                                              layer.fqn: replace(base_plan[layer.fqn], w_bits=8, a_bits=8)})
            saved_bits[layer.fqn] = base - metric(plan)

    # A smaller input: each scale the table measured, on the whole model.
    scales = [1.0, *(s for s in space.input_scales if input_key(s) in table.drops)]
    saved_scale = {scale: base - metric(replace(base_plan, input_scale=scale)) if scale != 1.0 else 0.0
                   for scale in scales}
    scale_drop = {scale: table.drops[input_key(scale)] if scale != 1.0 else 0.0 for scale in scales}

    # Dropping a residual block: each block the table measured.
    dropped_now = set(base_plan.dropped)
    saved_block = {block: base - metric(space.settled(replace(base_plan, dropped=base_plan.dropped | {block})))
                   for block in space.blocks if drop_key(block) in table.drops and block not in dropped_now}

    # A block's surgery: each replacement the table measured that the start has not made.
    surgery_now = {block: dict(surgery_changes(s)) for block, s in base_plan.surgery.items()}

    def with_surgery(block: str, kind: str, value) -> ModelPlan:
        return space.settled(replace(base_plan, surgery={
            **base_plan.surgery, block: Surgery(**{**surgery_now.get(block, {}), kind: value})}))

    saved_surgery = {(block.name, kind, value): base - metric(with_surgery(block.name, kind, value))
                     for block in space.surgery_blocks for kind, choices in space.surgery_choices(block).items()
                     for value in choices[1:] if surgery_key(block.name, kind, value) in table.drops
                     and kind not in surgery_now.get(block.name, {})}

    def bits_drop(fqn: str) -> float:
        return table.drops.get(_weights_key(fqn, 8), 0.0) + table.drops.get(_activations_key(fqn, 8), 0.0)

    scale_now = 1.0
    predicted = base
    plans: list[ModelPlan] = []
    targets = [limit * m for m in MARGINS]
    while targets:
        best = None  # (gain per drop, kind, name, value, gain)
        for root, group in groups.items():
            if all(inside(f, dropped_now) for f in group.layers):
                continue  # gone with a dropped block
            # Every lower keep ratio, not only the next: channel rounding makes some steps save
            # nothing (a layer of 24 channels rounded to multiples of 8 keeps 24 at 0.875).
            for lower in (k for k in space.keep_choices(group) if k < keep_now[root]):
                gain = _interp(saved_keep[root], lower) - _interp(saved_keep[root], keep_now[root])
                cost = table.keep_drop(root, lower) - table.keep_drop(root, keep_now[root])
                if gain > 0:
                    score = gain / max(cost, 1e-3)
                    if best is None or score > best[0]:
                        best = (score, "keep", root, lower, gain)
        for fqn, gain in saved_bits.items():
            if fqn not in int8_now and gain > 0 and not inside(fqn, dropped_now):
                score = gain / max(bits_drop(fqn), 1e-3)
                if best is None or score > best[0]:
                    best = (score, "bits", fqn, None, gain)
        for lower in (s for s in scales if s < scale_now):
            gain = saved_scale[lower] - saved_scale[scale_now]
            if gain > 0:
                score = gain / max(scale_drop[lower] - scale_drop[scale_now], 1e-3)
                if best is None or score > best[0]:
                    best = (score, "input", None, lower, gain)
        for block, gain in saved_block.items():
            if gain > 0 and not inside(block, dropped_now):
                score = gain / max(table.drops[drop_key(block)], 1e-3)
                if best is None or score > best[0]:
                    best = (score, "drop", block, None, gain)
        for (block, kind, value), gain in saved_surgery.items():
            if gain > 0 and kind not in surgery_now.get(block, {}) and not inside(block, dropped_now):
                score = gain / max(table.drops[surgery_key(block, kind, value)], 1e-3)
                if best is None or score > best[0]:
                    best = (score, "surgery", (block, kind), value, gain)
        if best is None:
            break  # nothing left that saves anything
        _, kind, name, value, gain = best
        if kind == "keep":
            keep_now[name] = value
        elif kind == "input":
            scale_now = value
        elif kind == "drop":
            dropped_now.add(name)
        elif kind == "surgery":
            surgery_now.setdefault(name[0], {})[name[1]] = value
        else:
            int8_now.add(name)
        predicted -= gain
        # Where the additive model says the budget is reached, the plan is measured for real;
        # short of it (the savings overlap), the path goes on.
        while targets and predicted <= targets[0]:
            plan = _plan(space, keep_now, int8_now, scale_now, dropped_now, surgery_now)
            if metric(plan) > targets[0]:
                break
            plans.append(plan)
            targets.pop(0)
    log.info("Allocated %d starting plan(s) for the budget %.4g (base %.4g).", len(plans), limit, base)
    return [p for i, p in enumerate(plans) if p not in plans[:i]]


def restore(space: SearchSpace, table: SensitivityTable, *, metric: Callable[[ModelPlan], float],
            limit: float, start: ModelPlan) -> list[ModelPlan]:
    """Plans that spend what `start` leaves of `limit` (10% under it, and all of it: MARGINS) on
    undoing its surgery: each replacement undone alone is measured, then they are undone in order
    of the sensitivity each gives back per unit of metric it adds, each one that still fits; each
    plan is measured before it is taken. [] when `start` does not meet `limit` or nothing fits."""
    base = metric(start)
    if base > limit:
        return []
    undo = []  # (sensitivity given back, metric added, block, kind)
    for block, surgery in start.surgery.items():
        for kind, value in surgery_changes(surgery):
            drop = table.drops.get(surgery_key(block, kind, value), 0.0)
            if drop > 0:
                undo.append((drop, metric(_undone(space, start, [(block, kind)])) - base, block, kind))
    # Those that add nothing first (the metric may even fall), then the best value per unit added.
    undo.sort(key=lambda u: u[0] / max(u[1], 1e-9), reverse=True)
    measured: dict[str, float] = {}  # the two targets often end on the same plan: time it once

    def fits(plan: ModelPlan, target: float) -> bool:
        if plan.key() not in measured:
            measured[plan.key()] = metric(plan)
        return measured[plan.key()] <= target

    plans: list[ModelPlan] = []
    for target in sorted(limit * m for m in MARGINS):
        chosen, predicted = [], base
        for drop, added, block, kind in undo:
            if predicted + added <= target:
                chosen.append((block, kind))
                predicted += added
        # The additive model is an estimate: give back the last undone until the plan measures in.
        while chosen and not fits(plan := _undone(space, start, chosen), target):
            chosen.pop()
        if chosen and plan not in plans:
            plans.append(plan)
    log.info("Restored %d plan(s) from a plan with surgery for the budget %.4g (it takes %.4g).",
             len(plans), limit, base)
    return plans


def fit(space: SearchSpace, table: SensitivityTable, *, metric: Callable[[ModelPlan], float],
        limit: float, start: ModelPlan) -> list[ModelPlan]:
    """Starting plans from a plan a user takes whole (TI's lite model): where it meets `limit`,
    its replacements undone while the budget allows (`restore`); where it does not, the greedy
    path from it (`allocate`). The start is measured once: each of those measures it first, and
    on a measured clock a second reading could disagree with the one that chose between them."""
    measured = metric(start)

    def once(plan: ModelPlan) -> float:
        return measured if plan is start else metric(plan)

    walk = restore if measured <= limit else allocate
    return walk(space, table, metric=once, limit=limit, start=start)


def _undone(space: SearchSpace, plan: ModelPlan, undo: list[tuple[str, str]]) -> ModelPlan:
    """`plan` with each (block, kind) of its surgery back as the block was. A gate that comes back
    gets its layers at the precision most of the plan's layers have (an int8 lite model's gate
    in int8, not a float island)."""
    surgery = {block: s.to_dict() for block, s in plan.surgery.items()}
    for block, kind in undo:
        surgery[block][kind] = Surgery().to_dict()[kind]
    out = replace(plan, surgery={block: Surgery(**fields) for block, fields in surgery.items()})
    gone_before, gone_now = space.gone(plan), space.gone(out)
    if gone_before == gone_now:
        return out
    precision = Counter((lp.w_bits, lp.a_bits) for fqn, lp in plan.layers.items()
                        if not inside(fqn, gone_before)).most_common(1)[0][0]
    return replace(out, layers={fqn: replace(lp, w_bits=precision[0], a_bits=precision[1])
                                if inside(fqn, gone_before) and not inside(fqn, gone_now) else lp
                                for fqn, lp in plan.layers.items()})


def _plan(space: SearchSpace, keep: dict[str, float], int8: set[str], input_scale: float,
          dropped: set[str], surgery: dict[str, dict[str, object]]) -> ModelPlan:
    ratios = {}
    for group in space.groups:
        for fqn in group.layers:
            ratios[fqn] = keep.get(group.root, 1.0)
    return space.settled(ModelPlan(layers={
        layer.fqn: LayerPlan(w_bits=8 if layer.fqn in int8 else 32, a_bits=8 if layer.fqn in int8 else 32,
                             keep_ratio=ratios.get(layer.fqn, 1.0))
        for layer in space.layers}, input_scale=input_scale, dropped=dropped,
        surgery={block: Surgery(**fields) for block, fields in surgery.items()}))
