from __future__ import annotations

import pytest
import torch

from edgeopt import NM, EdgeoptError, Knobs, LayerPlan, ModelPlan, SearchSpace


def test_inventory_lists_every_conv_and_linear_with_shapes(tiny, example):
    space = SearchSpace.from_model(tiny, example)
    names = [layer.fqn for layer in space.layers]
    expected = [n for n, m in tiny.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(names) == sorted(expected)
    dw = space.layer("dw.0")
    assert dw.kind == "depthwise" and dw.groups == 32 and dw.input_hw == (16, 16) and dw.stride == (2, 2)
    assert dw.macs == 8 * 8 * 32 * 9
    stem = space.layer("stem.0")
    assert stem.kind == "conv" and stem.macs == 16 * 16 * 16 * 3 * 9 and stem.params == 16 * 27
    assert space.layer("head").kind == "linear" and space.layer("head").macs == 32 * 10


def test_coupled_layers_share_one_group(tiny, example):
    space = SearchSpace.from_model(tiny, example)
    group_of = {layer.fqn: layer.group for layer in space.layers}
    # Residual add: the stem and the block's last conv feed the same sum.
    assert group_of["stem.0"] == group_of["res1.3"] is not None
    # Depthwise chain and SE multiply: expand, depthwise and the SE's expanding conv are coupled.
    assert group_of["expand.0"] == group_of["dw.0"] == group_of["se.fc2"]
    # The concat's two branches are separate groups, and the classifier's outputs are never pruned.
    assert group_of["branch_a"] != group_of["branch_b"]
    assert group_of["head"] is None


def test_random_plans_are_valid_and_differ(tiny, example):
    space = SearchSpace.from_model(tiny, example)
    plans = [space.sample(seed=s) for s in range(5)]
    for plan in plans:
        space.validate(plan)
        for group in space.groups:
            assert len({plan[f].keep_ratio for f in group.layers}) == 1
        assert plan["dw.0"].nm is None  # depthwise never gets N:M
    assert len({p.key() for p in plans}) == 5
    assert space.sample(seed=3) == plans[3]


def test_uniform_applies_choices_where_they_apply(tiny, example):
    space = SearchSpace.from_model(tiny, example)
    plan = space.uniform(w_bits=8, a_bits=8, keep_ratio=0.5, nm=NM(n=2, m=4))
    assert plan["stem.0"] == LayerPlan(w_bits=8, a_bits=8, keep_ratio=0.5, nm=NM(n=2, m=4))
    assert plan["dw.0"].nm is None and plan["dw.0"].keep_ratio == 0.5
    assert plan["head"].keep_ratio == 1.0 and plan["head"].nm == NM(n=2, m=4)


def test_validate_names_each_problem(tiny, example):
    space = SearchSpace.from_model(tiny, example)
    plan = space.uniform()
    layers = dict(plan.layers)
    layers["nope"] = LayerPlan()
    layers["stem.0"] = LayerPlan(keep_ratio=0.5)  # coupled with res1.3 which stays at 1.0
    layers["dw.0"] = LayerPlan(nm=NM(n=2, m=4))
    layers["head"] = LayerPlan(keep_ratio=0.5)
    with pytest.raises(EdgeoptError) as err:
        space.validate(ModelPlan(layers=layers))
    text = str(err.value)
    assert "nope" in text and "stem.0" in text and "dw.0" in text and "head" in text


def test_restrict_narrows_choices_and_plans_follow(tiny, example):
    space = SearchSpace.from_model(tiny, example).restrict(Knobs(w_bits=(32, 8), a_bits=(32, 8), nm=(None,)))
    assert space.knobs.w_bits == (32, 8) and space.knobs.nm == (None,)
    for seed in range(10):
        plan = space.sample(seed=seed)
        assert {lp.w_bits for lp in plan.layers.values()} <= {32, 8}
        assert all(lp.nm is None for lp in plan.layers.values())
    with pytest.raises(EdgeoptError):
        space.uniform(w_bits=4)
    with pytest.raises(EdgeoptError):
        Knobs(w_bits=(8,))  # the float option must stay available


def test_precisions_narrow_the_weight_activation_pairs(tiny, example):
    pairs = ((32, 32), (8, 8))
    space = SearchSpace.from_model(tiny, example).restrict(Knobs(w_bits=(32, 8), a_bits=(32, 8), precisions=pairs,
                                                                   dynamic_kinds=()))
    assert space.knobs.pairs == pairs
    seen = {(lp.w_bits, lp.a_bits) for seed in range(20) for lp in space.sample(seed=seed).layers.values()}
    assert seen == set(pairs)  # both pairs drawn, no w8a32 or w32a8
    with pytest.raises(EdgeoptError, match="precision"):
        space.uniform(w_bits=8)  # w8a32: a pair outside the space
    layers = dict(space.uniform(w_bits=8, a_bits=8).layers)
    layers["stem.0"] = LayerPlan(w_bits=32, a_bits=8)
    with pytest.raises(EdgeoptError, match="stem.0: bits w32/a8"):
        space.validate(ModelPlan(layers=layers))
    # Restricting again keeps the narrowing; a second restriction narrows it further.
    assert space.restrict(Knobs()).knobs.pairs == pairs
    assert space.restrict(Knobs(w_bits=(32,), a_bits=(32,))).knobs.pairs == ((32, 32),)
    with pytest.raises(EdgeoptError, match="uncompressed"):
        Knobs(w_bits=(32, 8), a_bits=(32, 8), precisions=[(8, 8)])
    with pytest.raises(EdgeoptError, match="subset"):
        Knobs(w_bits=(32, 8), a_bits=(32, 8), precisions=[(32, 32), (4, 8)])


def test_target_searches_only_the_pairs_its_runtime_executes():
    from edgeopt.hw_models.targets import get_target
    from edgeopt.search.optimize import target_knobs

    assert target_knobs(get_target("pi4"), size_matters=False).pairs == ((32, 32), (8, 8))
    assert target_knobs(get_target("jetson-orin-nano"), size_matters=False).pairs == ((32, 32), (16, 16), (8, 8))
    # With a size budget, weight-only quantization shrinks the file, so every pair stays.
    assert (8, 32) in target_knobs(get_target("pi4"), size_matters=True).pairs


def test_untraceable_model_gets_a_clear_error():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(EdgeoptError, match="input"):
        SearchSpace.from_model(Bad(), torch.randn(1, 3, 8, 8))


def test_a_large_model_is_traced_on_the_meta_device_to_the_same_space(tiny, example, monkeypatch):
    """Models from META_FROM_PARAMETERS get structure copies without weights; the space they give
    is the one a real copy gives (the test lowers the threshold: no test model is that large)."""
    import edgeopt.spaces.space as space_module
    from edgeopt.spaces.space import structure_copy

    real = SearchSpace.from_model(tiny, example)
    work, x = structure_copy(tiny, example)
    assert x.device.type == "cpu" and all(p.device.type == "cpu" for p in work.parameters())
    monkeypatch.setattr(space_module, "META_FROM_PARAMETERS", 0)
    work, x = structure_copy(tiny, example)
    assert x.device.type == "meta" and all(p.device.type == "meta" for p in work.parameters())
    assert work(x).shape == tiny(example).shape
    on_meta = SearchSpace.from_model(tiny, example)
    assert on_meta.layers == real.layers and on_meta.input_sizes == real.input_sizes
    assert [g.layers for g in on_meta.groups] == [g.layers for g in real.groups]
    assert all(p.device.type == "cpu" for p in tiny.parameters())  # the model itself is untouched
