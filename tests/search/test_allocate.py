"""The latency-aware allocation: it spends a budget where the sensitivity table says it costs least."""

from __future__ import annotations

import torch
import torchvision

from edgeopt import SearchSpace, Surgery, apply_plan
from edgeopt.evaluators.cost import model_cost
from edgeopt.search.allocate import allocate, fit, restore
from edgeopt.search.sensitivity import (SensitivityTable, _activations_key, _keep_key, _keep_levels, _weights_key,
                                        input_key, surgery_changes, surgery_key)
from tests.conftest import TinyNet


def _setup():
    torch.manual_seed(0)
    model = TinyNet(num_classes=4).eval()
    example = torch.randn(2, 3, 16, 16)
    space = SearchSpace.from_model(model, example)

    def macs(plan) -> float:
        return float(model_cost(apply_plan(model, plan, example, space=space, calibrate_model=False), example).macs)

    return space, macs


def _table(space: SearchSpace, *, keep_drop, bits_drop, input_drop=lambda scale: 60.0) -> SensitivityTable:
    drops, levels = {}, {}
    for scale in space.input_scales[1:]:
        drops[input_key(scale)] = input_drop(scale)
    for group in space.prunable_groups:
        levels[group.root] = _keep_levels(space.keep_choices(group))
        for keep in levels[group.root]:
            drops[_keep_key(group.root, keep)] = keep_drop(group.root) * (1 - keep)
    for layer in space.layers:
        for bits in (4, 8):
            drops[_weights_key(layer.fqn, bits)] = drops[_activations_key(layer.fqn, bits)] = bits_drop(layer.fqn)
    return SensitivityTable(base_top1=90.0, drops=drops, chance=25.0, keep_levels=levels)


def test_the_budget_goes_where_a_change_costs_least_and_is_met_when_measured():
    space, macs = _setup()
    base = macs(space.uniform())
    limit = 0.6 * base
    # res1's group (the residual stream) is very sensitive, every other group cheap to prune.
    fragile = next(g.root for g in space.prunable_groups if "res1" in g.root or "stem" in g.root)
    table = _table(space, keep_drop=lambda root: 40.0 if root == fragile else 0.5, bits_drop=lambda fqn: 0.1)
    plans = allocate(space, table, metric=macs, limit=limit)
    assert plans, "no plan met the budget"
    assert all(macs(plan) <= limit for plan in plans)  # measured, not only by the additive model
    keep = space.group_keep(plans[0])
    assert fragile not in keep  # the fragile group is left whole
    uniform = next(space.uniform(keep_ratio=k) for k in sorted(space.knobs.keep_ratios, reverse=True)
                   if macs(space.uniform(keep_ratio=k)) <= limit)
    assert table.score(plans[0], space) > table.score(uniform, space)
    # With the fragile group the cheap one instead, the allocation moves with the table.
    other = _table(space, keep_drop=lambda root: 0.5 if root == fragile else 40.0, bits_drop=lambda fqn: 0.1)
    assert space.group_keep(allocate(space, other, metric=macs, limit=limit)[0]).get(fragile, 1.0) < 1.0


def test_a_smaller_input_is_taken_where_it_costs_least():
    space, macs = _setup()
    limit = 0.6 * macs(space.uniform())
    # Every keep ratio and bit width costs much; the input at 0.75 of its size (12x12 of 16x16:
    # 56% of the MACs) costs little.
    table = _table(space, keep_drop=lambda root: 40.0, bits_drop=lambda fqn: 5.0,
                   input_drop=lambda scale: 0.5 if scale >= 0.75 else 30.0)
    plans = allocate(space, table, metric=macs, limit=limit)
    assert plans and plans[0].input_scale == 0.75 and not space.group_keep(plans[0])
    assert all(macs(plan) <= limit for plan in plans)
    # Where the smaller input costs as much as anything else, it is left.
    costly = _table(space, keep_drop=lambda root: 0.5, bits_drop=lambda fqn: 0.1, input_drop=lambda scale: 60.0)
    assert allocate(space, costly, metric=macs, limit=limit)[0].input_scale == 1.0


def test_nothing_to_allocate_where_the_base_meets_the_budget_or_nothing_can():
    space, macs = _setup()
    table = _table(space, keep_drop=lambda root: 1.0, bits_drop=lambda fqn: 0.1)
    base = macs(space.uniform())
    assert allocate(space, table, metric=macs, limit=base * 1.01) == []
    assert allocate(space, table, metric=macs, limit=1.0) == []  # one MAC: no plan reaches it


def test_a_path_from_uniform_int8_finds_what_only_int8_with_pruning_buys():
    space, macs = _setup()
    int8 = space.uniform(w_bits=8, a_bits=8)

    def latency(plan) -> float:
        # Like float islands between int8 layers: int8 halves the time only where every layer
        # takes it; a single int8 layer among float ones costs its quantizers.
        bits = [(lp.w_bits, lp.a_bits) == (8, 8) for lp in plan.layers.values()]
        return macs(plan) * (0.5 if all(bits) else 1.0 + 0.02 * sum(bits))

    base = latency(space.uniform())
    limit = 0.4 * base
    table = _table(space, keep_drop=lambda root: 1.0, bits_drop=lambda fqn: 0.1)
    from_fp32 = allocate(space, table, metric=latency, limit=limit)
    from_int8 = allocate(space, table, metric=latency, limit=limit, start=int8)
    assert from_fp32 and from_int8
    assert all(latency(plan) <= limit for plan in from_fp32 + from_int8)
    # The path from fp32 never takes a single int8 layer (each one alone costs time) ...
    assert not any(lp.w_bits == 8 for plan in from_fp32 for lp in plan.layers.values())
    # ... the one from int8 keeps every layer int8 and so prunes less for the same budget.
    assert all(lp.w_bits == lp.a_bits == 8 for plan in from_int8 for lp in plan.layers.values())
    assert macs(from_int8[0]) > macs(from_fp32[0])
    # Where uniform int8 already meets the budget, there is nothing to allocate from it.
    assert allocate(space, table, metric=latency, limit=0.6 * base, start=int8) == []


def test_restore_spends_what_the_lite_model_leaves_on_the_replacements_that_cost_most():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    space = SearchSpace.from_model(model, torch.randn(1, 3, 32, 32))
    lite = space.uniform(w_bits=8, a_bits=8, surgery=Surgery(activation="relu", gate=False, kernel=3))
    keys = [surgery_key(block, kind, value) for block, s in lite.surgery.items() for kind, value in surgery_changes(s)]
    # Every replacement gives back 0.5 points but one gate 5 and one activation nothing; undoing
    # any costs 1 unit, the activation 4.
    costly, free = "gate=False features.4.block", "activation=relu features.5.block"
    drops = {key: 5.0 if key == costly else 0.0 if key == free else 0.5 for key in keys}
    table = SensitivityTable(base_top1=90.0, drops=drops, chance=25.0)

    def metric(plan) -> float:
        undone = [key for key in keys if key not in
                  [surgery_key(block, kind, value) for block, s in plan.surgery.items()
                   for kind, value in surgery_changes(s)]]
        return 10.0 + sum(4.0 if key == "activation=relu features.6.block" else 1.0 for key in undone)

    plans = restore(space, table, metric=metric, limit=13.0, start=lite)
    assert len(plans) == 2  # at 90% of the budget (11.7: one undone) and at all of it (three)
    assert [metric(plan) for plan in plans] == [11.0, 13.0]
    first = plans[0]
    assert first.surgery["features.4.block"].gate  # the costliest replacement is undone first ...
    # ... and the gate comes back in int8, as the rest of the plan, not as a float island.
    assert all((lp.w_bits, lp.a_bits) == (8, 8) for fqn, lp in first.layers.items()
               if fqn.startswith("features.4.block.2"))
    assert first.surgery["features.5.block"].activation == "relu"  # what gives nothing back stays
    assert plans[1].surgery["features.6.block"].activation == "relu"  # 4 units: does not fit
    # A lite model over the budget leaves nothing to restore.
    assert restore(space, table, metric=metric, limit=9.0, start=lite) == []


def test_a_lite_model_over_the_budget_is_the_start_of_a_path_that_keeps_its_replacements():
    space, macs = _setup()
    lite = space.uniform(surgery=Surgery(gate=False))  # TinyNet's one block open to surgery: its gate

    def latency(plan) -> float:
        # Like mobilenet_v3_small's gates on a CPU without VNNI: removing them halves the time.
        gated = any(s.gate for s in plan.surgery.values()) or not plan.surgery
        return macs(plan) * (1.0 if gated else 0.5)

    base = latency(space.uniform())
    table = _table(space, keep_drop=lambda root: 1.0, bits_drop=lambda fqn: 0.1)
    table.drops[surgery_key("se", "gate", False)] = 3.0
    limit = 0.35 * base
    assert latency(lite) > limit
    plans = fit(space, table, metric=latency, limit=limit, start=lite)
    assert plans and all(latency(plan) <= limit for plan in plans)
    # The path went on from the lite model: every plan keeps its gate removed, and prunes.
    assert all(plan.surgery["se"].gate is False and space.group_keep(plan) for plan in plans)
    # Where the lite model meets the budget, its replacements are given back instead.
    given_back = fit(space, table, metric=latency, limit=1.1 * base, start=lite)
    assert given_back and given_back[-1].surgery.get("se", Surgery()).gate and not space.group_keep(given_back[-1])
