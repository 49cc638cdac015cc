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
from edgeopt.search.cascade import choose_cascade, on_validation, points, write_cascade
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


def test_a_cascade_is_chosen_where_it_beats_every_single_model():
    data, small, large = _two_models()
    choice = choose_cascade([small, large], data, budget_ms=2.5, selected=small.candidate, member_ok=lambda c: True)
    assert choice is not None and choice.small is small and choice.large is large
    assert choice.expected_ms <= 2.5 and choice.accuracy > small.candidate.selection_accuracy
    # The threshold's figures are the data's own.
    conf = torch.softmax(small.model.logits, 1).max(1).values.numpy()
    sent = conf < choice.threshold
    assert choice.share_sent_on == sent.mean()
    assert choice.expected_ms == 1.0 + sent.mean() * 4.0
    # Without a latency budget, the cascade must still beat the selected (large) model: near its
    # accuracy at a lower expected latency.
    free = choose_cascade([small, large], data, budget_ms=None, selected=large.candidate, member_ok=lambda c: True)
    assert free is not None and free.expected_ms < 4.0 and free.accuracy >= large.candidate.selection_accuracy
    # A budget only the small model meets, with too little room for the large one: no cascade.
    assert choose_cascade([small, large], data, budget_ms=1.05, selected=small.candidate,
                          member_ok=lambda c: True) is None
    # Members must meet the other budgets themselves.
    assert choose_cascade([small, large], data, budget_ms=2.5, selected=small.candidate,
                          member_ok=lambda c: c.trial != 1) is None


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
