"""Unstructured sparsity: magnitude masks, kept through training, counted in bytes, offered only
under a size budget, exported as zeros."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import pytest
import torch
from onnx import numpy_helper

from edgeopt import NM, EdgeoptError, LayerPlan, ModelPlan, SearchSpace, apply_plan
from edgeopt.evaluators.cost import layer_bytes, model_cost
from edgeopt.evaluators.onnx_export import export_onnx
from edgeopt.hw_models.targets import get_target
from edgeopt.search.optimize import _starting_plans, target_knobs
from edgeopt.search.study import plan_params, suggest_plan
from edgeopt.spaces.quantize import compressed_layers
from edgeopt.spaces.space import Knobs
from edgeopt.spaces.sparsity import kept_count, magnitude_mask


def test_the_mask_keeps_exactly_the_largest_weights():
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3)
    mask = magnitude_mask(weight, 0.75)
    kept = int(mask.sum())
    assert kept == kept_count(weight.numel(), 0.75) == 288
    # Every kept |w| is at least every zeroed one.
    assert weight.abs()[mask.bool()].min() >= weight.abs()[~mask.bool()].max()


def test_a_layer_takes_one_way_of_zeroing_and_known_shares_only():
    with pytest.raises(EdgeoptError, match="not both"):
        LayerPlan(nm=NM(n=2, m=4), sparsity=0.5)
    with pytest.raises(EdgeoptError, match="sparsity=0.3 is not allowed"):
        LayerPlan(sparsity=0.3)
    assert LayerPlan.from_dict(LayerPlan(w_bits=8, sparsity=0.9).to_dict()) == LayerPlan(w_bits=8, sparsity=0.9)


def test_a_plan_without_sparsity_keeps_its_old_digest():
    plan = ModelPlan(layers={"a": LayerPlan(w_bits=8, a_bits=8), "b": LayerPlan(keep_ratio=0.5)})
    # The digest as it was computed before the knob existed: the layer dicts without "sparsity"
    # (nor "dynamic", which came later).
    old = {"version": 1, "layers": {k: {f: v for f, v in d.items() if f not in ("sparsity", "dynamic")}
                                    for k, d in plan.to_dict()["layers"].items()}}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert plan.key() == digest
    sparse = ModelPlan(layers={**plan.layers, "a": LayerPlan(w_bits=8, a_bits=8, sparsity=0.5)})
    assert sparse.key() != plan.key()


def test_zeros_stay_zero_through_training_and_the_kept_weights_train(tiny, example, calib):
    space = SearchSpace.from_model(tiny, example)
    small = apply_plan(tiny, space.uniform(w_bits=8, a_bits=8, sparsity=0.75), example, calib_data=calib)
    layers = compressed_layers(small)
    before = {name: m.weight.detach().clone() for name, m in layers.items()}
    assert small.dw[0].sparsity == 0 and small.stem[0].sparsity == 0.75  # depthwise layers stay dense
    for name, m in layers.items():
        if m.sparsity:
            assert int((m.weight != 0).sum()) <= kept_count(m.weight.numel(), 0.75), name
    optimizer = torch.optim.SGD(small.parameters(), lr=0.05)
    small.train()
    for _ in range(3):
        optimizer.zero_grad()
        small(torch.randn(4, 3, 16, 16)).square().mean().backward()
        optimizer.step()
    small.eval()
    moved = 0
    for name, m in layers.items():
        zero = before[name] == 0
        assert torch.all(m.weight[zero] == 0), name
        moved += int((m.weight[~zero] != before[name][~zero]).sum())
    assert moved > 0


def test_bytes_count_the_kept_values_and_a_bitmask(tiny, example, calib):
    space = SearchSpace.from_model(tiny, example)
    dense = apply_plan(tiny, space.uniform(), example, calib_data=calib)
    sparse = apply_plan(tiny, space.uniform(sparsity=0.9), example, calib_data=calib)
    stem = sparse.stem[0]
    numel = stem.weight.numel()
    expected = -(-(kept_count(numel, 0.9) * 32 + numel) // 8) + 4 * (stem.bias.numel() if stem.bias is not None else 0)
    assert layer_bytes(stem) == expected
    # 90% zeros in fp32: each weight costs 0.1 x 32 + 1 bits instead of 32, so about 7x fewer bytes.
    ratio = model_cost(dense, example).bytes / model_cost(sparse, example).bytes
    assert 4 < ratio < 32 / 4.2 + 0.1


def test_offered_only_under_a_size_budget():
    pi4 = get_target("pi4")
    assert target_knobs(pi4, size_matters=False).sparsities == (0.0,)
    assert 0.75 in target_knobs(pi4, size_matters=True).sparsities


def test_the_search_suggests_sparsity_and_n_m_wins_a_tie(tiny, example):
    space = SearchSpace.from_model(tiny, example)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    plans = []
    for _ in range(8):
        trial = study.ask()
        plans.append(suggest_plan(trial, space))
        study.tell(trial, 0.0)
    layers = [lp for plan in plans for lp in plan.layers.values()]
    assert any(lp.sparsity for lp in layers) and any(lp.nm for lp in layers)
    assert not any(lp.sparsity and lp.nm for lp in layers)
    # A known plan is asked for by its parameters and comes back the same.
    plan = space.uniform(w_bits=8, a_bits=8, sparsity=0.5)
    study.enqueue_trial(plan_params(plan, space))
    assert suggest_plan(study.ask(), space) == plan
    assert plan in _starting_plans(space)
    no_sparsity = space.restrict(Knobs(sparsities=(0.0,)))
    assert not any(p.layers[f].sparsity for p in _starting_plans(no_sparsity) for f in p.layers)


def test_exported_zeros_agree_with_pytorch_and_compress(tiny, example, calib, tmp_path):
    space = SearchSpace.from_model(tiny, example)
    outputs = {}
    for share in (0.0, 0.9):
        small = apply_plan(tiny, space.uniform(sparsity=share), example, calib_data=calib)
        path = export_onnx(small, example, tmp_path / f"s{share}.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        images = torch.randn(16, 3, 16, 16)
        got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, small(images).numpy(), rtol=1e-4, atol=1e-4)
        weights = [numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer if t.dims and len(t.dims) >= 2]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
        outputs[share] = (zeros, len(gzip.compress(path.read_bytes())))
    assert outputs[0.9][0] > 0.85 and outputs[0.0][0] < 0.01
    assert outputs[0.9][1] < 0.4 * outputs[0.0][1]
