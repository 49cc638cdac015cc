from __future__ import annotations

import logging

import pytest

import edgeopt.search.finetune as finetune_module
from edgeopt.search.finetune import FinetuneConfig, finetune
from edgeopt.search.objective import Context, HeldOutAccuracy
from edgeopt.search.select import Candidate
from edgeopt.search.training import NonFiniteLoss
from edgeopt import SearchSpace, model_cost
from edgeopt.hw_models.targets import get_target


@pytest.mark.slow
def test_a_nan_loss_drops_that_candidate_and_the_others_go_on(bundle, trained, monkeypatch, caplog):
    example = bundle.example_input()
    space = SearchSpace.from_model(trained, example)
    context = Context(model=trained, space=space, example_input=example, calib=[bundle.train.tensors[0][:32]],
                      target=get_target("pi4"), budgets=(), base=model_cost(trained, example),
                      proxy=HeldOutAccuracy(bundle.proxy))
    plans = [space.uniform(w_bits=8, a_bits=8), space.uniform(keep_ratio=0.75), space.uniform(w_bits=16)]
    candidates = [Candidate(trial=i, plan=p, proxy_accuracy=90.0, latency_ms=1.0, macs=1, effective_macs=1, bytes=1)
                  for i, p in enumerate(plans)]
    real_train = finetune_module.train
    calls = []

    def train_that_diverges_once(model, dataset, **kwargs):
        calls.append(kwargs["progress"])
        if len(calls) == 2:
            raise NonFiniteLoss(step=3, total_steps=10, value=float("nan"), lr=0.005)
        return real_train(model, dataset, **kwargs)

    monkeypatch.setattr(finetune_module, "train", train_that_diverges_once)
    with caplog.at_level(logging.WARNING):
        results = finetune(candidates, context, data=bundle, config=FinetuneConfig(epochs=0.25, batch_size=32))
    assert [r.candidate.trial for r in results] == [0, 2]
    accuracies = [r.candidate.accuracy for r in results]
    assert all(a is not None and a > 50 for a in accuracies), accuracies
    assert "trial 1" in caplog.text


def test_screening_only_when_it_narrows_and_is_shorter_than_the_fine_tune():
    from edgeopt.search.finetune import screening

    config = FinetuneConfig(top=3, epochs=4.0)
    assert config.screen_length == 0.5  # an eighth of the fine-tune by default
    assert screening(config, 10) and screening(config, 4)
    assert not screening(config, 3)  # no more candidates than will be fine-tuned anyway
    assert not screening(FinetuneConfig(top=3, epochs=4.0, screen=3), 10)
    assert not screening(FinetuneConfig(top=3, epochs=1.0, screen_epochs=1.0), 10)
    assert not screening(FinetuneConfig(top=3, epochs=0), 10)


@pytest.mark.parametrize("bad", [{"screen": -1}, {"screen": 2.5}, {"screen_epochs": -0.1}])
def test_bad_screening_settings_are_refused(bad):
    from edgeopt.errors import EdgeoptError

    with pytest.raises(EdgeoptError, match="screen"):
        FinetuneConfig(**bad)


@pytest.mark.slow
def test_a_quantized_plan_is_tuned_in_float_then_quantized_at_its_size(bundle, trained, monkeypatch):
    from edgeopt.input_size import input_size
    from edgeopt.plan import LayerPlan, ModelPlan
    from edgeopt.spaces.quantize import compressed_layers

    example = bundle.example_input()
    space = SearchSpace.from_model(trained, example)
    context = Context(model=trained, space=space, example_input=example, calib=[bundle.train.tensors[0][:32]],
                      target=get_target("pi4"), budgets=(), base=model_cost(trained, example),
                      proxy=HeldOutAccuracy(bundle.proxy))
    plan = space.uniform(w_bits=8, a_bits=8, keep_ratio=0.75, input_scale=0.75)
    low = ModelPlan(layers={**plan.layers, "res1.0": LayerPlan(w_bits=4, a_bits=8, keep_ratio=0.75)},
                    input_scale=0.75)
    real_train = finetune_module.train
    trained_as = []

    def recording_train(model, dataset, **kwargs):
        trained_as.append(({(m.w_bits, m.a_bits) for m in compressed_layers(model).values()}, kwargs["epochs"]))
        return real_train(model, dataset, **kwargs)

    monkeypatch.setattr(finetune_module, "train", recording_train)
    candidates = [Candidate(trial=i, plan=p, proxy_accuracy=90.0, latency_ms=1.0, macs=1, effective_macs=1, bytes=1)
                  for i, p in enumerate((plan, low))]
    results = finetune(candidates, context, data=bundle, config=FinetuneConfig(epochs=0.5, batch_size=32))
    # int8: all of it in float (no layer compressed while training), then quantized; bits below
    # 8: a float part, then a QAT quarter at the plan's bit widths.
    assert trained_as == [(set(), 0.5), (set(), 0.375), ({(8, 8), (4, 8)}, 0.125)]
    for result, p in zip(results, (plan, low)):
        layers = compressed_layers(result.model)
        assert {f: (m.w_bits, m.a_bits) for f, m in layers.items()} == {
            f: (lp.w_bits, lp.a_bits) for f, lp in p.layers.items()}
        assert all(m.input_range.calibrated for m in layers.values())
        assert input_size(result.model) == space.input_size(0.75)
        direct = compressed_layers(context.compress(p))  # pruned as the plan says, as QAT throughout prunes
        assert {f: m.weight.shape for f, m in layers.items()} == {f: m.weight.shape for f, m in direct.items()}
        assert any(m.weight.shape != trained.get_submodule(f).weight.shape for f, m in layers.items())
        assert result.candidate.accuracy > 50
