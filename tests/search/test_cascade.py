"""The dynamic inference cascade: its expected latency and accuracy per threshold, the choice of
pair and threshold (only where it beats every single model), and the device-side runner."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgeopt import ModelPlan, SearchSpace, apply_plan
from edgeopt.search.cascade import choose_cascade, on_validation, points, small_members, write_cascade
from edgeopt.search.finetune import Finetuned
from edgeopt.search.select import Candidate


def test_points_give_expected_latency_and_accuracy_per_threshold():
    confidence = np.array([0.95, 0.9, 0.6, 0.4])
    small_right = np.array([True, True, False, False])
    large_right = np.array([True, False, True, True])
    (t1, a1, m1), (t2, a2, m2) = points(confidence, small_right, large_right, 1.0, 4.0, thresholds=(0.5, 0.92))
    assert (t1, a1, m1) == (0.5, 75.0, 1.0 + 0.25 * 4.0)  # only 0.4 sent on: small right twice, large once
    assert (t2, a2, m2) == (0.92, 75.0, 1.0 + 0.75 * 4.0)  # 0.9 sent on too, which the large model gets wrong


class _Table(nn.Module):
    """Logits read from a table by the image's index (stored in its first pixel)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def _member(trial: int, logits: torch.Tensor, labels: torch.Tensor, ms: float) -> Finetuned:
    accuracy = 100.0 * float((logits.argmax(1) == labels).double().mean())
    candidate = Candidate(trial=trial, plan=ModelPlan(layers={}), proxy_accuracy=accuracy, latency_ms=ms, macs=1,
                          effective_macs=1, bytes=1, violations=(-0.1,), tuned_proxy_accuracy=accuracy,
                          accuracy=accuracy, latency_measured=True)
    return Finetuned(candidate, _Table(logits))


def _two_models(n: int = 400, seed: int = 0):
    """A small model that is right and confident on the easy 70% and unsure on the rest, a large one
    right on 95%: a cascade gets near the large one's accuracy at much less than its latency."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    easy = torch.rand(n, generator=g) < 0.7
    small = torch.randn(n, 10, generator=g) * 0.1
    small[torch.arange(n), labels] += torch.where(easy, 6.0, 0.05)  # unsure where hard: often wrong
    large = torch.randn(n, 10, generator=g) * 0.1
    right = torch.rand(n, generator=g) < 0.95
    large[torch.arange(n), torch.where(right, labels, (labels + 1) % 10)] += 5.0
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return TensorDataset(images, labels), _member(0, small, labels, 1.0), _member(1, large, labels, 4.0)


RULE = {"max_drop": 0.3, "min_speedup": 1.25}  # the selection rule's defaults


def test_a_cascade_is_chosen_where_the_selection_rule_takes_it_over_every_single_model():
    data, small, large = _two_models()
    choice = choose_cascade([small, large], data, budget_ms=2.5, member_ok=lambda c: True, **RULE)
    assert choice is not None and choice.small is small and choice.large is large
    assert choice.expected_ms <= 2.5 and choice.accuracy > small.candidate.selection_accuracy
    # The threshold's figures are the data's own.
    conf = torch.softmax(small.model.logits, 1).max(1).values.numpy()
    sent = conf < choice.threshold
    assert choice.share_sent_on == sent.mean()
    assert choice.expected_ms == 1.0 + sent.mean() * 4.0
    # Where the large model meets the budget too, the cascade must be near its accuracy (within
    # max_drop of the best option) at least min_speedup times faster: the selection rule's trade.
    free = choose_cascade([small, large], data, budget_ms=None, member_ok=lambda c: True, **RULE)
    assert free is not None and free.expected_ms * 1.25 <= 4.0
    assert free.accuracy >= large.candidate.selection_accuracy - 0.3
    # It is the fastest such point of the curve: one threshold lower loses more than max_drop, or
    # is not faster.
    best = max(max(a for _, a, _ in free.curve), large.candidate.selection_accuracy)
    assert all(a < best - 0.3 or m >= free.expected_ms for _, a, m in free.curve)
    # A budget only the small model meets, with too little room for the large one: no cascade.
    assert choose_cascade([small, large], data, budget_ms=1.05, member_ok=lambda c: True, **RULE) is None
    # Members must meet the other budgets themselves.
    assert choose_cascade([small, large], data, budget_ms=2.5, member_ok=lambda c: c.trial != 1, **RULE) is None
    # A stricter trade (no point may be given up) keeps the large model: the cascade is not as accurate.
    strict = choose_cascade([small, large], data, budget_ms=None, member_ok=lambda c: True, max_drop=0.0,
                            min_speedup=1.25)
    assert strict is None or strict.accuracy >= large.candidate.selection_accuracy


def _candidate(trial: int, ms: float, proxy: float, screened: float | None = None, bytes_: int = 1) -> Candidate:
    return Candidate(trial=trial, plan=ModelPlan(layers={}), proxy_accuracy=proxy, latency_ms=ms, macs=1,
                     effective_macs=1, bytes=bytes_, violations=(-0.1,), screened_accuracy=screened)


def test_the_small_members_to_screen_are_the_best_fast_enough_and_only_where_no_finalist_is_one():
    data, small, large = _two_models()
    large_only = [large]  # 4 ms: a small member must take at most 0.4 x 4 = 1.6 ms
    candidates = [_candidate(5, 1.0, 60.0), _candidate(6, 1.5, 70.0), _candidate(7, 1.7, 90.0),
                  _candidate(8, 1.2, 40.0, screened=55.0), _candidate(9, 0.5, 20.0), _candidate(10, 0.6, 10.0)]
    # A screened accuracy ranks first (the screening ranks pruned plans well), then the proxy's;
    # 1.7 ms is too slow; at most four.
    trials = [c.trial for c in small_members(candidates, large_only, member_ok=lambda c: True)]
    assert trials == [8, 6, 5, 9]
    # One that misses another budget (here: trial 6) is not a member.
    assert [c.trial for c in small_members(candidates[:3], large_only, member_ok=lambda c: c.trial != 6)] == [5]
    # A finalist at 1 ms already is one: nothing more to fine-tune.
    assert small_members(candidates, [small, large], member_ok=lambda c: True) == []
    assert small_members([_candidate(7, 1.7, 90.0)], large_only, member_ok=lambda c: True) == []


def test_the_device_runner_gives_the_cascades_answers_without_torch(tiny, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    labels = torch.randint(0, 10, (64,))
    space = SearchSpace.from_model(tiny, x[:1])
    models = [apply_plan(tiny, space.uniform(keep_ratio=0.5, input_scale=0.75), x[:1], space=space, calib_data=[x]),
              apply_plan(tiny, space.uniform(), x[:1], space=space, calib_data=[x])]
    members = []
    for trial, (model, ms) in enumerate(zip(models, (1.0, 3.0))):
        candidate = Candidate(trial=trial, plan=ModelPlan(layers={}), proxy_accuracy=50.0, latency_ms=ms, macs=1,
                              effective_macs=1, bytes=1, violations=(-0.1,), accuracy=50.0 + trial)
        members.append(Finetuned(candidate, model))
    from edgeopt.search.cascade import CascadeChoice

    with torch.no_grad():
        conf = torch.softmax(models[0](x), 1).max(1).values
    threshold = float(conf.median())
    choice = CascadeChoice(small=members[0], large=members[1], threshold=threshold, accuracy=0.0, share_sent_on=0.5,
                           expected_ms=2.5, worst_ms=4.0, curve=())
    data = TensorDataset(x, labels)
    validation = on_validation(choice, data)
    prep = {"input_size": [16, 16], "mean": [0.0] * 3, "std": [1.0] * 3}
    write_cascade(tmp_path / "cascade", choice, example=x[:1], preprocessing=prep, validation=validation,
                  latency_source="measured")
    spec = json.loads((tmp_path / "cascade" / "cascade.json").read_text())
    assert spec["small"]["file"] == "small.onnx" and spec["threshold"] == threshold
    assert abs(spec["share_sent_on"] - 0.5) < 0.05 and spec["curve"]
    np.save(tmp_path / "x.npy", x.numpy())
    script = ("import sys, numpy as np\n"
              "for name in ('torch', 'torchvision'):\n"
              "    sys.modules[name] = None\n"
              "import edgeopt\n"
              f"cascade = edgeopt.Cascade.load({str(tmp_path / 'cascade')!r})\n"
              f"scores, sent = cascade.scores(np.load({str(tmp_path / 'x.npy')!r}))\n"
              f"np.save({str(tmp_path / 'scores.npy')!r}, scores); np.save({str(tmp_path / 'sent.npy')!r}, sent)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        small_scores, large_scores = models[0](x), models[1](x)
    want_sent = (torch.softmax(small_scores, 1).max(1).values < threshold).numpy()
    want = torch.where(torch.from_numpy(want_sent)[:, None], large_scores, small_scores).numpy()
    sent = np.load(tmp_path / "sent.npy")
    # Where the small model's confidence is not a hair from the threshold, the runner sends the
    # same inputs on and gives the same scores (fp32 models: float rounding apart).
    clear = np.abs(conf.numpy() - threshold) > 1e-5
    assert (sent[clear] == want_sent[clear]).all() and 20 <= sent.sum() <= 44
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy")[clear], want[clear], atol=1e-4)
