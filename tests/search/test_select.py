from __future__ import annotations

from edgeopt import LayerPlan, ModelPlan
from edgeopt.search.select import Candidate, closest, finalists, finetune_order, pareto_front, select


def _c(trial, acc, ms, violations=(-0.1,), tuned=None, val=None):
    """`tuned`: proxy-split top-1 after fine-tuning; `val`: validation top-1 after it."""
    plan = ModelPlan(layers={"x": LayerPlan(w_bits=(32, 16, 8, 6, 4, 2)[trial % 6])})
    return Candidate(trial=trial, plan=plan, proxy_accuracy=acc, latency_ms=ms, macs=1000 - trial,
                     effective_macs=900, bytes=100, violations=tuple(violations), tuned_proxy_accuracy=tuned,
                     accuracy=val if val is not None else tuned)


def test_pareto_front_keeps_only_undominated_points_sorted_by_latency():
    cands = [_c(0, 90, 10), _c(1, 85, 5), _c(2, 84, 6), _c(3, 91, 12), _c(4, 85, 5.5)]
    assert [c.trial for c in pareto_front(cands)] == [1, 0, 3]


def test_select_takes_fastest_within_max_drop_of_the_most_accurate_feasible():
    cands = [_c(0, 90, 10), _c(1, 89.5, 6), _c(2, 88, 3), _c(3, 95, 2, violations=(0.2,))]
    assert select(cands, max_drop=1.0, min_speedup=1.0).trial == 1  # 3: faster, better, over budget
    assert select(cands, max_drop=0.0, min_speedup=1.0).trial == 0
    assert select(cands, max_drop=5.0, min_speedup=1.0).trial == 2


def test_select_gives_accuracy_away_only_for_enough_speed():
    # Trial 1 is 0.5 points less accurate and 1 % faster; trial 2 is 0.9 less and 1.25x faster.
    cands = [_c(0, 90, 10), _c(1, 89.5, 9.9), _c(2, 89.1, 8)]
    assert select(cands, max_drop=1.0, min_speedup=1.0).trial == 2
    assert select(cands, max_drop=1.0, min_speedup=1.2).trial == 2
    assert select(cands, max_drop=1.0, min_speedup=1.3).trial == 0  # none is fast enough: the best
    assert select(cands[:2], max_drop=1.0, min_speedup=1.1).trial == 0


def test_select_prefers_fine_tuned_accuracy():
    cands = [_c(0, 90, 10, tuned=80.0), _c(1, 85, 8, tuned=88.0)]
    assert select(cands, max_drop=0.5, min_speedup=1.1).trial == 1


def test_select_never_looks_at_validation_accuracy():
    # Trial 0 is better on validation, trial 1 on the proxy split after fine-tuning: the rule goes
    # by the proxy split, so that the validation figure reported for its pick stays unbiased.
    cands = [_c(0, 90, 10, tuned=84.0, val=89.0), _c(1, 85, 10.5, tuned=86.0, val=85.0)]
    assert select(cands, max_drop=0.5, min_speedup=1.1).trial == 1


def test_no_feasible_candidate_gives_none_and_closest_by_violation():
    cands = [_c(0, 90, 10, violations=(0.5,)), _c(1, 80, 5, violations=(0.1,)), _c(2, 70, 4, violations=(0.1, 0.3))]
    assert select(cands, max_drop=1, min_speedup=1.1) is None
    assert [c.trial for c in closest(cands, 2)] == [1, 2]


def test_finetune_order_puts_feasible_front_first_then_fills_with_closest():
    cands = [_c(0, 90, 10), _c(1, 85, 5), _c(2, 80, 9), _c(3, 99, 1, violations=(0.05,))]
    assert [c.trial for c in finetune_order(cands, 2, spread=10)] == [0, 1]
    assert [c.trial for c in finetune_order(cands, 5, spread=10)] == [0, 1, 2, 3]
    # Trial 1 is 5 proxy points below the best: outside a spread of 3 it waits behind nothing
    # faster, and still comes next as the next most accurate front candidate.
    assert [c.trial for c in finetune_order(cands, 2, spread=3)] == [0, 1]


def test_finetune_order_spreads_over_the_faster_front_within_the_proxy_spread():
    # Front, fastest first: 4 (50%, 1 ms, far below), 3 (82%, 2 ms), 2 (85%, 4 ms), 1 (88%, 6 ms),
    # 0 (90%, 10 ms, the most accurate); trial 5 is dominated.
    cands = [_c(0, 90, 10), _c(1, 88, 6), _c(2, 85, 4), _c(3, 82, 2), _c(4, 50, 1), _c(5, 80, 8)]
    order = [c.trial for c in finetune_order(cands, 3, spread=10)]
    assert order == [0, 3, 1]  # the best, then the fastest and the slowest of 1-3 (within 10 points)
    assert [c.trial for c in finetune_order(cands, 2, spread=10)] == [0, 3]
    assert [c.trial for c in finetune_order(cands, 4, spread=10)] == [0, 3, 2, 1]
    # With no spread, the most accurate front candidates in turn (the former order).
    assert [c.trial for c in finetune_order(cands, 3, spread=0)] == [0, 1, 2]


def test_finetune_order_always_includes_the_hand_plan():
    cands = [_c(0, 90, 10), _c(1, 88, 6), _c(2, 85, 4), _c(3, 82, 2), _c(7, 70, 9)]  # 7: dominated
    hand = cands[-1]
    assert [c.trial for c in finetune_order(cands, 3, spread=10, hand=hand)] == [0, 7, 3]
    assert [c.trial for c in finetune_order(cands, 2, spread=10, hand=hand)] == [0, 7]
    # The hand plan is the most accurate: it is not fine-tuned twice.
    assert [c.trial for c in finetune_order(cands, 3, spread=10, hand=cands[0])] == [0, 3, 1]


def _screened(trial, acc, ms, screened, violations=(-0.1,)):
    return _c(trial, acc, ms, violations).screened(screened)


def test_finalists_take_the_rules_pick_on_screened_accuracy_then_the_hand_plan_then_the_best():
    # Screened accuracies reorder the proxy's: trial 2 (proxy 80) scores best after screening.
    cands = [_screened(0, 90, 10, 70.0), _screened(1, 85, 5, 78.5), _screened(2, 80, 9, 79.0),
             _screened(3, 70, 8, 60.0), _screened(4, 99, 1, 99.0, violations=(0.3,))]
    hand = cands[3]
    # The rule on screened accuracy: best is 2 (79.0); 1 is within 1 point and 1.8x faster.
    order = [c.trial for c in finalists(cands, 3, hand=hand, max_drop=1.0, min_speedup=1.1)]
    assert order == [1, 3, 2]
    assert [c.trial for c in finalists(cands, 4, hand=hand, max_drop=0.0, min_speedup=1.1)] == [2, 3, 1, 0]
    assert [c.trial for c in finalists(cands, 2, hand=None, max_drop=0.0, min_speedup=1.1)] == [2, 1]
    # A candidate whose screening diverged (no screened accuracy) is never a finalist.
    assert 5 not in [c.trial for c in finalists([*cands, _c(5, 95, 2)], 6, hand=None, max_drop=1.0,
                                                min_speedup=1.1)]


def test_select_on_another_accuracy():
    cands = [_screened(0, 90, 10, 50.0), _screened(1, 80, 5, 60.0)]
    assert select(cands, max_drop=0.0, min_speedup=1.1).trial == 0
    assert select(cands, max_drop=0.0, min_speedup=1.1, accuracy=lambda c: c.screened_accuracy).trial == 1


def test_finetune_order_fills_with_plans_within_the_spread_before_weak_front_plans():
    # Front: 0 (90 %, 10 ms), 1 (88 %, 6 ms), 4 (30 %, 1 ms). Trial 2 (86 %, 7 ms) and 3 (84 %,
    # 9 ms) are dominated by 1 but within 10 points of the best; 4 is on the front far below.
    cands = [_c(0, 90, 10), _c(1, 88, 6), _c(2, 86, 7), _c(3, 84, 9), _c(4, 30, 1)]
    assert [c.trial for c in finetune_order(cands, 5, spread=10)] == [0, 1, 2, 3, 4]
    # With no spread, the front comes first as before.
    assert [c.trial for c in finetune_order(cands, 5, spread=0)] == [0, 1, 4, 2, 3]
