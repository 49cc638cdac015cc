"""What one trial does: how it counts the others when deciding whether the study already has
enough, and how far its proxy scores a plan that cannot reach the front."""

from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgeopt import SearchSpace, model_cost
from edgeopt.budget import parse_budget
from edgeopt.hw_models.targets import get_target
from edgeopt.search.objective import (FAR_OVER, PROXY_STAGES, Context, HeldOutAccuracy, Objective,
                                      wilson_upper)
from edgeopt.search.study import PLAN_KEY, WORKER


def test_trials_ahead_count_signed_running_and_finished_ones_only():
    study = optuna.create_study(directions=["maximize", "minimize"])
    finished = study.ask()
    finished.set_user_attr(WORKER, "host:1")
    finished.set_user_attr(PLAN_KEY, "a")
    study.tell(finished, [1.0, 1.0])
    signed = study.ask()  # running, signed by its worker, plan not recorded yet: counts
    signed.set_user_attr(WORKER, "host:2")
    study.ask()  # running and unsigned: killed before its first line, or about to sign
    duplicate = study.ask()
    duplicate.set_user_attr(WORKER, "host:3")
    study.tell(duplicate, state=optuna.trial.TrialState.PRUNED)
    me = study.ask()
    counter = Objective(None, trials=10)  # the count needs no search context
    later = study.ask()  # numbered after this trial: never counts against it
    later.set_user_attr(WORKER, "host:4")
    assert counter._ahead(me) == 2
    assert counter._ahead(later) == 2  # `me` is running but unsigned
    me.set_user_attr(WORKER, "host:5")
    assert counter._ahead(later) == 3


class _Seen(nn.Module):
    """Predicts the class of the largest feature, and counts the images it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return x


def _right_every_third(n: int) -> TensorDataset:
    """`n` images of 4 features; the largest one is the label for every third image (33.3 %)."""
    labels = torch.arange(n) % 4
    predicted = torch.where(torch.arange(n) % 3 == 0, labels, (labels + 1) % 4)
    return TensorDataset(torch.nn.functional.one_hot(predicted, 4).float(), labels)


def test_the_proxy_stops_at_a_stage_only_when_the_trial_trails_its_bar_or_is_far_over():
    proxy = HeldOutAccuracy(_right_every_third(1200))
    cases = [  # (bar, rough) -> images scored
        ((None, False), 1200),  # nothing to compare with: every image
        ((80.0, False), PROXY_STAGES[0]),  # far behind: the first stage tells
        ((41.0, False), 500),  # 7.7 points behind: 250 images cannot say so at 3 sigma (bound 43.0), 500 can (40.0)
        ((38.5, False), 1000),  # bounds 43.0, 40.0, 38.0
        ((36.0, False), 1200),  # within reach at every stage
        ((None, True), PROXY_STAGES[0]),  # far over the budget
    ]
    for (bar, rough), images in cases:
        model = _Seen()
        accuracy, seen = proxy(model, None, bar=bar, rough=rough)
        assert (seen, model.images) == (images, images + 1), (bar, rough)  # + 1: the batch-size probe
        right = sum(1 for i in range(images) if i % 3 == 0)
        assert accuracy == pytest.approx(100.0 * right / images)
    # A proxy split smaller than the first stage is always scored whole.
    assert HeldOutAccuracy(_right_every_third(96))(_Seen(), None, rough=True) == (pytest.approx(100 / 3), 96)


def test_wilson_bound_lies_above_the_score_and_narrows_with_more_images():
    assert wilson_upper(0, 250) > 0.0
    assert 40.0 < wilson_upper(100, 250) and wilson_upper(400, 1000) < wilson_upper(100, 250)
    assert wilson_upper(1000, 1000) == pytest.approx(100.0)


class _Recorded:
    """A proxy that records what the search passed it."""

    needs_model = True

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, compressed, plan, *, bar=None, rough=False):
        self.calls.append((bar, rough))
        return 50.0, 10


def test_a_trial_is_compared_with_the_rivals_no_costlier_and_scored_roughly_far_over_budget(bundle, trained):
    example = bundle.example_input()
    space = SearchSpace.from_model(trained, example)
    proxy = _Recorded()
    context = Context(model=trained, space=space, example_input=example, calib=[bundle.train.tensors[0][:32]],
                      target=get_target("pi4"), budgets=(parse_budget("60%"),), base=model_cost(trained, example),
                      proxy=proxy)
    small = space.uniform(keep_ratio=0.5)
    metrics = context.measure(small)  # outside a search: scored in full, nothing passed
    assert proxy.calls[-1] == (None, False) and metrics["proxy_images"] == 10
    ms = metrics["latency_ms"]
    context.measure(small, rivals=[(70.0, (ms * 0.9,)), (75.0, (ms,)), (99.0, (ms * 1.1,))])
    assert proxy.calls[-1] == (75.0, False)  # the best of the rivals that cost no more
    context.measure(small, rivals=[(99.0, (ms * 1.1,))])
    assert proxy.calls[-1] == (None, False)
    whole = context.measure(space.uniform(), rivals=[])  # all MACs against a 60% budget: 67% over
    assert whole["violations"][0] > FAR_OVER and proxy.calls[-1] == (None, True)
