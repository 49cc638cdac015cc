"""The per-layer sensitivity proxy: measured once, summed per plan, cached, used by a search."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

from edgeopt import ModelPlan
from edgeopt.errors import EdgeoptError
from edgeopt.evaluators.cost import model_cost
from edgeopt.plan import LayerPlan
from edgeopt.search import sensitivity
from edgeopt.search.finetune import FinetuneConfig
from edgeopt.search.optimize import SearchConfig, optimize
from edgeopt.search.sensitivity import SensitivityTable, changes, measure_sensitivity
from edgeopt.search.training import evaluate
from edgeopt.spaces.apply import apply_plan
from edgeopt.spaces.space import Knobs, SearchSpace

PI4_KNOBS = Knobs(w_bits=(32, 8), a_bits=(32, 8), nm=(None,), sparsities=(0.0,), dynamic_kinds=())  # as target_knobs gives pi4


@pytest.fixture(scope="module")
def setup(bundle, trained):
    example = torch.zeros(1, 3, 16, 16)
    calib = [bundle.train.tensors[0][i * 32:(i + 1) * 32] for i in range(2)]
    space = SearchSpace.from_model(trained, example).restrict(PI4_KNOBS)
    table = measure_sensitivity(trained, space, example, calib=calib, dataset=bundle.proxy, images=96,
                                progress=False)
    return example, calib, space, table


def test_every_single_change_is_measured(setup):
    _, _, space, table = setup
    keys = [key for key, _ in changes(space)]
    assert set(table.drops) == set(keys) and len(keys) == len(set(keys))
    # pi4's space: 8-bit weights and 8-bit activations per layer, 3 keep ratios per prunable group
    # (0.75, 0.5 and the smallest, 0.25), each smaller input size, each droppable block and each
    # replacement of each block open to surgery (TinyNet: its squeeze-excite gate, removed).
    assert len(space.input_scales) == 5
    surgery = sum(len(c) - 1 for b in space.surgery_blocks for c in space.surgery_choices(b).values())
    assert surgery == 1
    assert len(keys) == (2 * len(space.layers) + 3 * len(space.prunable_groups) + len(space.input_scales) - 1
                         + len(space.blocks) + surgery)
    assert all(0.0 <= d <= 100.0 for d in table.drops.values())


def test_a_plan_scores_base_top1_scaled_by_the_predictions_it_leaves_alone(setup, bundle, trained):
    _, _, space, table = setup
    assert table.base_top1 == pytest.approx(evaluate(trained, bundle.proxy))  # 96 images: all of them
    assert table.chance == pytest.approx(25.0)  # 4 classes
    assert table.score(space.uniform(), space) == table.base_top1
    layer = space.layers[0].fqn
    one = ModelPlan(layers={layer: LayerPlan(w_bits=8, a_bits=8)})
    untouched = (1 - table.drops[f"w8 {layer}"] / 100) * (1 - table.drops[f"a8 {layer}"] / 100)
    assert table.score(one, space) == pytest.approx(25.0 + (table.base_top1 - 25.0) * untouched)
    everything = space.uniform(w_bits=8, a_bits=8)
    expected = 1.0
    for key, drop in table.drops.items():
        if not key.startswith(("keep", "input", "drop", "gate")):  # int8 alone: no pruning, resizing or surgery
            expected *= 1 - drop / 100
    assert table.score(everything, space) == pytest.approx(25.0 + (table.base_top1 - 25.0) * expected)
    # A smaller input is one change of the whole model, measured as any other: half the size
    # alters predictions of the trained model.
    half = table.drops["input0.5"]
    assert half > 0 and table.score(space.uniform(input_scale=0.5), space) == pytest.approx(
        25.0 + (table.base_top1 - 25.0) * (1 - half / 100))
    # However much a plan changes, the estimate stays between chance and the base model.
    harshest = space.uniform(w_bits=8, a_bits=8, keep_ratio=0.25)
    assert 25.0 <= table.score(harshest, space) < table.base_top1


def test_unmeasured_keep_ratios_are_interpolated(setup):
    _, _, space, table = setup
    root = space.prunable_groups[0].root
    at = {k: table.drops[f"keep{k:g} {root}"] for k in (0.75, 0.5, 0.25)}
    assert table.keep_drop(root, 1.0) == 0.0
    assert table.keep_drop(root, 0.625) == pytest.approx((at[0.75] + at[0.5]) / 2)
    assert table.keep_drop(root, 0.875) == pytest.approx(at[0.75] / 2)
    assert table.keep_drop(root, 0.25) == pytest.approx(at[0.25])


def test_pruning_harder_costs_more(setup):
    _, _, space, table = setup
    drops = {k: sum(table.keep_drop(g.root, k) for g in space.prunable_groups) for k in (0.75, 0.25)}
    assert drops[0.25] > drops[0.75]


def test_it_ranks_random_plans_like_their_measured_accuracy(setup, bundle, trained):
    example, calib, space, table = setup
    plans = [space.sample(seed) for seed in range(24)]
    scores = [table.score(p, space) for p in plans]
    measured = [evaluate(apply_plan(trained, p, example, calib_data=calib, space=space), bundle.proxy)
                for p in plans]
    assert spearmanr(scores, measured).statistic > 0.6


def test_the_table_is_cached_and_refreshed_when_the_model_changes(setup, bundle, trained, tmp_path, monkeypatch):
    example, calib, space, _ = setup
    cache = tmp_path / "sensitivity.json"
    small = space.restrict(Knobs(w_bits=(32, 8), a_bits=(32,), keep_ratios=(1.0,), nm=(None,)))
    first = measure_sensitivity(trained, small, example, calib=calib, dataset=bundle.proxy, images=64,
                                cache=cache, progress=False)
    assert json.loads(cache.read_text())["drops"] == first.drops

    def no_measuring(*args, **kwargs):
        raise AssertionError("the cached table should have been used")

    monkeypatch.setattr(sensitivity, "apply_plan", no_measuring)
    again = measure_sensitivity(trained, small, example, calib=calib, dataset=bundle.proxy, images=64,
                                cache=cache, progress=False)
    assert again == first
    changed = type(trained)(num_classes=4)
    changed.load_state_dict(trained.state_dict())
    with torch.no_grad():
        changed.head.bias.add_(1.0)
    with pytest.raises(AssertionError, match="cached"):
        measure_sensitivity(changed.eval(), small, example, calib=calib, dataset=bundle.proxy, images=64,
                            cache=cache, progress=False)
    assert SensitivityTable.load(cache, "another fingerprint") is None
    # A release that changes the layers' arithmetic measures again too.
    monkeypatch.setattr(sensitivity.quantize, "NUMERICS_VERSION", sensitivity.quantize.NUMERICS_VERSION + 1)
    with pytest.raises(AssertionError, match="cached"):
        measure_sensitivity(trained, small, example, calib=calib, dataset=bundle.proxy, images=64,
                            cache=cache, progress=False)


def test_structure_only_apply_has_the_calibrated_costs(setup, trained):
    example, calib, space, _ = setup
    plan = space.sample(3)
    assert any(lp.a_bits == 8 for lp in plan.layers.values())
    calibrated = apply_plan(trained, plan, example, calib_data=calib, space=space)
    structure = apply_plan(trained, plan, example, space=space, calibrate_model=False)
    assert model_cost(structure, example) == model_cost(calibrated, example)


def test_unknown_proxy_is_refused():
    with pytest.raises(EdgeoptError, match="heldout, sensitivity"):
        SearchConfig(proxy="magic")


@pytest.mark.slow
def test_search_with_the_sensitivity_proxy(bundle, trained, tmp_path):
    result = optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path, progress=False,
                      search=SearchConfig(trials=6, seed=0, calib_batches=2, proxy="sensitivity",
                                          sensitivity_images=96),
                      finetune_config=FinetuneConfig(top=2, epochs=0.5, batch_size=32))
    table = json.loads((tmp_path / "sensitivity.json").read_text())
    # optimize keeps the complete table for other output folders too (EDGEOPT_CACHE: tests/conftest.py).
    assert (Path(os.environ["EDGEOPT_CACHE"]) / "sensitivity" / f"{table['fingerprint']}.json").is_file()
    space = SearchSpace.from_model(trained, torch.zeros(1, 3, 16, 16)).restrict(PI4_KNOBS)
    stored = SensitivityTable(**table)
    assert len(result.trials) == 6 and result.pareto
    # Every candidate's proxy accuracy is the stored table's score of its plan: no model was run.
    for candidate in result.pareto:
        assert candidate.proxy_accuracy == pytest.approx(stored.score(candidate.plan, space))
    assert result.summary["proxy"] == "sensitivity"
    assert "per-layer sensitivity" in (tmp_path / "report.md").read_text()


def test_a_measurement_cut_short_continues_where_it_stopped(setup, bundle, trained, tmp_path, monkeypatch):
    example, calib, space, _ = setup
    cache = tmp_path / "sensitivity.json"
    small = space.restrict(Knobs(w_bits=(32, 8), a_bits=(32, 8), keep_ratios=(1.0,), nm=(None,)))
    total = len(list(changes(small)))
    real_apply = sensitivity.apply_plan
    calls = []

    def interrupted_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "apply_plan", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        measure_sensitivity(trained, small, example, calib=calib, dataset=bundle.proxy, images=64, cache=cache,
                            progress=False)
    assert len(json.loads(cache.read_text())["drops"]) == 3

    def counted(*args, **kwargs):
        calls.append(1)
        return real_apply(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(sensitivity, "apply_plan", counted)
    table = measure_sensitivity(trained, small, example, calib=calib, dataset=bundle.proxy, images=64, cache=cache,
                                progress=False)
    assert len(calls) == total - 3 and len(table.drops) == total


def test_another_output_folder_reads_the_shared_table(setup, bundle, trained, tmp_path, monkeypatch, caplog):
    example, calib, space, _ = setup
    small = space.restrict(Knobs(w_bits=(32, 8), a_bits=(32, 8), keep_ratios=(1.0,), nm=(None,)))
    shared = tmp_path / "shared"
    real_apply = sensitivity.apply_plan

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # A table cut short stays in its own folder: only complete tables are shared.
    monkeypatch.setattr(sensitivity, "apply_plan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        measure_sensitivity(trained, small, example, calib=calib, dataset=bundle.proxy, images=64,
                            cache=tmp_path / "cut" / "sensitivity.json", shared_dir=shared, progress=False)
    assert not shared.exists() or not list(shared.iterdir())
    monkeypatch.setattr(sensitivity, "apply_plan", real_apply)
    (tmp_path / "a").mkdir()
    first = measure_sensitivity(trained, small, example, calib=calib, dataset=bundle.proxy, images=64,
                                cache=tmp_path / "a" / "sensitivity.json", shared_dir=shared, progress=False)
    assert json.loads((shared / f"{first.fingerprint}.json").read_text())["drops"] == first.drops

    def no_measuring(*args, **kwargs):
        raise AssertionError("the shared table should have been used")

    monkeypatch.setattr(sensitivity, "apply_plan", no_measuring)
    (tmp_path / "b").mkdir()
    again = measure_sensitivity(trained, small, example, calib=calib, dataset=bundle.proxy, images=64,
                                cache=tmp_path / "b" / "sensitivity.json", shared_dir=shared, progress=False)
    assert again == first
    # The new output folder gets its copy, for its workers and a resumed run.
    assert SensitivityTable.load(tmp_path / "b" / "sensitivity.json", first.fingerprint) == first
    # Another space is another fingerprint: measured, not read.
    other = space.restrict(Knobs(w_bits=(32, 8), a_bits=(32,), keep_ratios=(1.0,), nm=(None,)))
    with pytest.raises(AssertionError, match="shared table"):
        measure_sensitivity(trained, other, example, calib=calib, dataset=bundle.proxy, images=64,
                            cache=tmp_path / "c.json", shared_dir=shared, progress=False)
    # A shared folder that cannot be written costs only the reuse: the table is still returned.
    monkeypatch.setattr(sensitivity, "apply_plan", real_apply)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    with caplog.at_level("WARNING", logger=sensitivity.log.name):
        table = measure_sensitivity(trained, small, example, calib=calib, dataset=bundle.proxy, images=64,
                                    cache=tmp_path / "d.json", shared_dir=blocked, progress=False)
    assert table.drops == first.drops
    assert "EDGEOPT_CACHE" in caplog.text
