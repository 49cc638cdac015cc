"""Whole searches on a tiny model and tiny synthetic data (slow: seconds each, not minutes)."""

from __future__ import annotations

import onnxruntime as ort
import pandas as pd
import pytest
import torch

from edgeopt import EdgeoptError, ModelPlan
from edgeopt.evaluators.cpu import int8_needs_reduce_range
from edgeopt.input_size import input_for
from edgeopt.search.finetune import FinetuneConfig
from edgeopt.search.optimize import SearchConfig, optimize
from edgeopt.search.training import evaluate


FAST_FT = FinetuneConfig(top=2, epochs=0.5, batch_size=32)


@pytest.mark.slow
def test_search_writes_every_output_and_resumes(bundle, trained, tmp_path):
    out = tmp_path / "run"
    result = optimize(trained, bundle, target="pi4", budget="60%", out=out, progress=False,
                      search=SearchConfig(trials=10, seed=0, calib_batches=2), finetune_config=FAST_FT)
    assert result.met_budget and result.plan is not None
    frame = result.trials
    assert len(frame) == 10 and frame["plan_key"].is_unique
    for name in ("trials.csv", "pareto.png", "pareto.html", "report.md", "selected/model.onnx",
                 "selected/plan.json", "selected/model.pt", "selected/run.py", "selected/README.md"):
        assert (out / name).exists(), name
    plan = ModelPlan.from_json((out / "selected" / "plan.json").read_text())
    assert plan == result.plan
    # The selected model meets the budget: at most 60% of the base MACs.
    assert result.selected.macs <= 0.6 * result.summary["base"]["macs"]
    # On pi4 without a size budget, only what the Pi accelerates is searched: no N:M, and each
    # layer int8 (w8a8) or float (w32a32), never a pair the Pi would run as float anyway.
    for frame_plan in [plan, *(c.plan for c in result.pareto)]:
        assert all(lp.nm is None and (lp.w_bits, lp.a_bits) in ((32, 32), (8, 8))
                   for lp in frame_plan.layers.values())
    session = ort.InferenceSession(str(out / "selected" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = input_for(result.model, bundle.val.tensors[0][:8]).numpy()  # at the plan's input size
    assert session.run(None, {"input": x})[0].shape == (8, 4)
    if result.summary.get("cascade"):  # a cascade beat every single model: it runs as written
        import edgeopt

        cascade = edgeopt.Cascade.load(out / "cascade")
        assert cascade.predict(bundle.val.tensors[0][:8].numpy()).shape == (8,)
        assert "## Cascade" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    assert "Selection rule" in report and "pi4" in report
    # Layer by layer, the selected model against the base (layers.csv, and a section of report.md):
    # a row per base layer, whose MACs are what the selected model's layers do.
    import pandas as pd

    from edgeopt.layers import trace_layers

    layers = pd.read_csv(out / "layers.csv")
    base_layers = trace_layers(trained, bundle.val.tensors[0][:1])
    assert list(layers["layer"]) == [spec.fqn for spec in base_layers]
    now = {spec.fqn: spec.macs for spec in trace_layers(result.model, input_for(result.model, bundle.val.tensors[0][:1]))}
    assert layers.set_index("layer")["macs"].to_dict() == {spec.fqn: now.get(spec.fqn, 0) for spec in base_layers}
    # Measured for every layer (a layer faster than the profiler's own cost per node reads 0).
    assert layers["base_measured_ms"].ge(0).all() and layers["measured_ms"].ge(0).all()
    assert "## Per layer: what paid" in report
    # pi4's figures are for ncnn and the bundle runs onnxruntime: the report and the device README say so.
    assert "figures are for ncnn" in report and "runs onnxruntime" in report
    assert "optimize profile" in (out / "selected" / "README.md").read_text()
    # pi4 takes full-range int8 weights; where this machine's int8 kernels saturate on them (x86
    # without VNNI, as on CI) the summary and the report say the host figure is a timing only.
    int8 = any((lp.w_bits, lp.a_bits) == (8, 8) for lp in plan.layers.values())
    exact = not (int8 and int8_needs_reduce_range())
    assert result.summary["selected"]["host_outputs_exact"] is exact
    assert ("saturating" in report) is (not exact)
    # Started again with more trials, it continues the stored study instead of starting over.
    again = optimize(trained, bundle, target="pi4", budget="60%", out=out, progress=False,
                     search=SearchConfig(trials=13, seed=0, calib_batches=2), finetune_config=FAST_FT)
    assert len(again.trials) == 13
    assert set(frame["plan_key"]) <= set(again.trials["plan_key"])
    # The study names its objectives and remembers what it was made for; started again for
    # another target or budget, it refuses instead of mixing trials measured for two setups.
    import optuna

    study = optuna.load_study(study_name="edgeopt", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    assert study.metric_names == ["accuracy", "latency_ms"]
    assert study.user_attrs["made for"]["target"].startswith("pi4")
    for target, budget, word in (("host", "60%", "target"), ("pi4", "50%", "budgets")):
        with pytest.raises(EdgeoptError, match=f"made for another search.*{word}.*another --out"):
            optimize(trained, bundle, target=target, budget=budget, out=out, progress=False,
                     search=SearchConfig(trials=13, seed=0, calib_batches=2), finetune_config=FAST_FT)
    assert len(study.trials) == len(optuna.load_study(study_name="edgeopt", storage=study._storage).trials)


@pytest.mark.slow
def test_a_rerun_loads_every_fine_tune_instead_of_training_it_again(bundle, trained, tmp_path, monkeypatch):
    import edgeopt.search.finetune as finetune_module

    config = FinetuneConfig(top=2, epochs=0.5, batch_size=32, screen=4, screen_epochs=0.25)
    # From the hand plans: how the search starts does not matter here, and each new folder would
    # measure the allocation's sensitivity table and paths again.
    search = SearchConfig(trials=8, seed=0, calib_batches=2, start="hand")
    first = optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path / "a", progress=False,
                     search=search, finetune_config=config, finetuned_dir=tmp_path / "store")
    stored = sorted((tmp_path / "store").glob("*.pt"))
    assert len(stored) == 4 + 2  # four screenings, two full fine-tunes; no partial files left
    assert not list((tmp_path / "store").glob("*.partial"))

    def no_training(*args, **kwargs):
        raise AssertionError("a stored fine-tune was trained again")

    monkeypatch.setattr(finetune_module, "train", no_training)
    # Another output folder (a fresh study, so the search runs again) sharing the store.
    again = optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path / "b", progress=False,
                     search=search, finetune_config=config, finetuned_dir=tmp_path / "store")
    assert again.plan == first.plan and again.selected.accuracy == first.selected.accuracy
    assert sorted((tmp_path / "store").glob("*.pt")) == stored
    # Another recipe is another result: it trains (here: reaches the patched train and fails).
    with pytest.raises(AssertionError, match="trained again"):
        optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path / "c", progress=False, search=search,
                 finetune_config=FinetuneConfig(top=2, epochs=0.5, batch_size=32, screen=4, screen_epochs=0.25,
                                                lr=1e-3),
                 finetuned_dir=tmp_path / "store")


@pytest.mark.slow
def test_screening_fine_tunes_the_best_screened_candidates_fully(bundle, trained, tmp_path, capsys):
    config = FinetuneConfig(top=2, epochs=0.5, batch_size=32, screen=4, screen_epochs=0.25)
    result = optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path, progress=False,
                      search=SearchConfig(trials=10, seed=0, calib_batches=2, start="hand"), finetune_config=config)
    frame = result.trials
    screened = frame[frame["screened_accuracy"].notna()]
    tuned = frame[frame["finetuned_accuracy"].notna()]
    assert len(screened) == 4 and result.summary["screened"] == 4
    assert len(tuned) == 2 and set(tuned["trial"]) <= set(screened["trial"])
    # The selection rule's pick on the screened scores is among the fully fine-tuned.
    feasible = screened[screened["feasible"]]
    best = feasible.sort_values(["screened_accuracy", "latency_ms"], ascending=[False, True]).iloc[0]
    faster = feasible[(feasible["screened_accuracy"] >= best["screened_accuracy"] - 1.0)
                      & (feasible["latency_ms"] * 1.1 <= best["latency_ms"])]
    pick = faster.sort_values("latency_ms")["trial"].iloc[0] if len(faster) else best["trial"]
    assert pick in set(tuned["trial"])
    assert result.selected.trial in set(tuned["trial"])
    assert "got 0.25 epochs of fine-tuning first" in (tmp_path / "report.md").read_text()
    err = capsys.readouterr().err  # progress=False: no bars from either round
    assert "screen 1/" not in err and "fine-tune 1/" not in err, err[-500:]


@pytest.mark.slow
def test_a_cascades_small_member_is_screened_fine_tuned_longer_and_kept_out_of_the_selection(
        bundle, trained, tmp_path, monkeypatch):
    import edgeopt.search.cascade as cascade_module
    import edgeopt.search.optimize as optimize_module

    # The tiny model's plans span under 2x in pi4 time: the role's latency limit is widened so that
    # fast candidates exist, and one finalist leaves them all unfine-tuned.
    monkeypatch.setattr(cascade_module, "SMALL_MEMBER_SHARE", 0.6)
    calls = []
    real_finetune = optimize_module.finetune

    def recording(candidates, context, *, config, **kwargs):
        calls.append((config.epochs, [c.trial for c in candidates]))
        return real_finetune(candidates, context, config=config, **kwargs)

    monkeypatch.setattr(optimize_module, "finetune", recording)
    config = FinetuneConfig(top=1, epochs=0.5, batch_size=32, screen=4, screen_epochs=0.25)
    result = optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path, progress=False,
                      search=SearchConfig(trials=12, seed=0, calib_batches=2), finetune_config=config)
    (finalist_epochs, finalists), (member_epochs, member) = calls
    assert finalist_epochs == 0.5 and len(finalists) == 1 and len(member) == 1
    assert member_epochs == 0.5 * cascade_module.SMALL_MEMBER_EPOCHS
    frame = result.trials.set_index("trial")
    # Fast enough for the role, and the best screened of the fast candidates.
    assert frame.loc[member[0], "latency_ms"] <= 0.6 * frame.loc[finalists[0], "latency_ms"]
    fast = frame[(frame["latency_ms"] <= 0.6 * frame.loc[finalists[0], "latency_ms"])
                 & frame["screened_accuracy"].notna()]
    assert frame.loc[member[0], "screened_accuracy"] == fast["screened_accuracy"].max()
    assert pd.notna(frame.loc[member[0], "finetuned_accuracy"])  # reported with the fine-tuned models
    # The selection compares the finalists only, which share one recipe; the report says so.
    assert result.selected.trial == finalists[0]
    assert f"small member only (never selected alone): trial {member[0]}" in (tmp_path / "report.md").read_text()
    # Without a cascade there is no small member to fine-tune (the same study and store again).
    calls.clear()
    optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path, progress=False,
             search=SearchConfig(trials=12, seed=0, calib_batches=2),
             finetune_config=FinetuneConfig(top=1, epochs=0.5, batch_size=32, screen=4, screen_epochs=0.25,
                                            cascade=False))
    assert [epochs for epochs, _ in calls] == [0.5]


@pytest.mark.slow
def test_impossible_budget_lists_closest_and_still_writes_outputs(bundle, trained, tmp_path):
    result = optimize(trained, bundle, target="pi4", budget="1KMACs", out=tmp_path, progress=False,
                      search=SearchConfig(trials=6, seed=1, calib_batches=2), finetune_config=FAST_FT)
    assert not result.met_budget and result.model is None
    assert result.summary["closest"] and all("+" in c["excess"] for c in result.summary["closest"])
    assert (tmp_path / "selected" / "model.onnx").exists() and (tmp_path / "trials.csv").exists()
    assert "No candidate met the budget" in (tmp_path / "report.md").read_text()
    # The first closest is the model saved in selected/, with the accuracy of what was saved.
    first = result.summary["closest"][0]
    assert first["saved"] and first["accuracy_of"] in ("validation, fine-tuned", "validation, not fine-tuned")
    saved = torch.load(tmp_path / "selected" / "model.pt", weights_only=False)
    assert evaluate(saved, bundle.val) == pytest.approx(first["accuracy"])
    assert "(saved in selected/)" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_candidates_estimated_within_budget_are_measured_before_none_is_said_to_meet_it(
        bundle, trained, tmp_path, monkeypatch, capsys):
    """Where the finalists measure over a latency budget the estimate said they meet, the other
    candidates the estimate puts within it are timed and fine-tuned before the run gives up."""
    from edgeopt.hw_models.estimate import LatencyEstimate
    from edgeopt.search import objective as objective_module
    from edgeopt.search import optimize as optimize_module

    calls = []

    def measured(model, example, target, clock=None):
        calls.append(1)
        ms = 1e4 if len(calls) <= FAST_FT.top else 1e-3  # the first finalists measure over budget
        return LatencyEstimate(total_ms=ms, layers=(), source="measured", target=target.name)

    search_as_it_is = optimize_module.run_search

    def search_then_fake_the_clock(*args, **kwargs):  # the base and the trials are timed for real
        search_as_it_is(*args, **kwargs)
        monkeypatch.setattr(objective_module, "target_latency", measured)

    monkeypatch.setattr(optimize_module, "run_search", search_then_fake_the_clock)
    result = optimize(trained, bundle, target="host", budget="1000ms", out=tmp_path, progress=True,
                      search=SearchConfig(trials=8, seed=0, calib_batches=2), finetune_config=FAST_FT)
    assert "trying the" in capsys.readouterr().err
    assert result.met_budget and result.selected.latency_measured and result.selected.latency_ms == 1e-3
    tuned = result.trials[result.trials["finetuned_accuracy"].notna()]
    assert len(tuned) == 2 * FAST_FT.top


@pytest.mark.slow
def test_on_this_machine_the_finalists_are_timed_whole_before_the_rule_compares_them(bundle, trained, tmp_path):
    result = optimize(trained, bundle, target="host", budget="50ms", out=tmp_path, progress=False,
                      search=SearchConfig(trials=6, seed=0, calib_batches=2), finetune_config=FAST_FT)
    frame = result.trials
    tuned = frame[frame["finetuned_accuracy"].notna()]
    assert len(tuned) == 2
    assert list(frame["latency_measured"]) == list(frame["finetuned_accuracy"].notna())
    # The latency budget is judged on the measured time.
    for _, row in tuned.iterrows():
        assert row["violation[50ms]"] == pytest.approx(row["latency_ms"] / 50 - 1)
    summary = result.summary
    assert summary["base"]["latency_source"] == "measured"
    assert summary["selected"]["latency_source"] == "measured"
    assert summary["selected"]["latency_ms"] == result.selected.latency_ms
    assert result.selected.latency_measured and result.selected.trial in set(tuned["trial"])


@pytest.mark.slow
def test_targets_choose_differently_where_hardware_differs(bundle, trained, tmp_path):
    plans = {}
    for target in ("pi4", "jetson-orin-nano"):
        result = optimize(trained, bundle, target=target, budget="60%", out=tmp_path / target, progress=False,
                          # Surgery off: the question is N:M, which a removed gate would crowd out of 16 trials.
                          search=SearchConfig(trials=16, seed=0, calib_batches=2, surgery=False),
                          finetune_config=FinetuneConfig(top=1, epochs=0))
        assert result.met_budget, target
        plans[target] = result.plan
    nm = {t: [f for f, lp in p.layers.items() if lp.nm is not None] for t, p in plans.items()}
    assert nm["pi4"] == []  # N:M buys nothing on the Pi
    assert nm["jetson-orin-nano"], "2:4 should appear where sparse tensor cores pay"
    assert plans["pi4"] != plans["jetson-orin-nano"]


def test_hand_candidate_is_the_feasible_starting_plan_that_prunes_least():
    from edgeopt import LayerPlan
    from edgeopt.search.optimize import _hand_candidate
    from edgeopt.search.select import Candidate

    def plan(keep, bits=8):
        return ModelPlan(layers={"conv": LayerPlan(w_bits=bits, a_bits=bits, keep_ratio=keep)})

    def cand(trial, keep, macs, violation, bits=8, proxy=50.0):
        return Candidate(trial=trial, plan=plan(keep, bits), proxy_accuracy=proxy, latency_ms=1.0, macs=macs,
                         effective_macs=macs, bytes=macs * bits // 8, violations=(violation,))

    starting = [plan(1.0), plan(0.75), plan(0.5), plan(0.75, 32), plan(0.5, 32)]
    cands = [cand(0, 1.0, 100, 0.5), cand(1, 0.75, 56, -0.1), cand(2, 0.5, 25, -0.6),
             cand(3, 0.625, 80, -0.05)]  # trial 3 fits with more MACs, but is no starting plan
    assert _hand_candidate(cands, starting).trial == 1
    assert _hand_candidate(cands[:1], starting) is None  # nothing a user would try fits
    # Pruned alike, both fitting: the float plan (less compression), though the int8 one's proxy
    # reads higher before fine-tuning; a float plan pruned more does not beat an int8 one pruned less.
    both = cands + [cand(4, 0.75, 56, -0.2, bits=32, proxy=49.0), cand(5, 0.5, 25, -0.7, bits=32, proxy=60.0)]
    assert _hand_candidate(both, starting).trial == 4


def test_starting_plans_add_uniform_2_4_only_where_the_target_runs_it_fast(bundle, trained):
    from edgeopt import SearchSpace
    from edgeopt.hw_models.targets import get_target
    from edgeopt.search.optimize import _starting_plans, target_knobs

    example = bundle.example_input()
    full = SearchSpace.from_model(trained, example)
    sparse = {}
    for target in ("pi4", "jetson-orin-nano"):
        space = full.restrict(target_knobs(get_target(target), size_matters=False))
        plans = _starting_plans(space)
        assert plans[0] == space.uniform(w_bits=8, a_bits=8)
        sparse[target] = [p for p in plans if any(lp.nm is not None for lp in p.layers.values())]
    assert sparse["pi4"] == []
    assert len(sparse["jetson-orin-nano"]) == 1
    plan = sparse["jetson-orin-nano"][0]
    assert all((lp.w_bits, lp.a_bits, lp.keep_ratio) == (8, 8, 1.0) for lp in plan.layers.values())


def test_a_host_study_reads_every_latency_on_the_reference_timed_when_it_was_opened(
        bundle, trained, tmp_path, monkeypatch):
    """The base model's calm time is measured once per study and kept in it: a resumed run (or
    another worker) reads its trials on the same scale instead of timing a reference of its own."""
    from edgeopt.budget import parse_budget
    from edgeopt.evaluators.latency import ReferenceClock
    from edgeopt.hw_models.targets import get_target
    from edgeopt.search.optimize import REFERENCE_MS, prepare

    search = SearchConfig(trials=2, seed=0, calib_batches=1)
    opened = dict(target=get_target("host"), budgets=(parse_budget("1ms"),), search=search, out_dir=tmp_path, seed=0)
    first, study = prepare(trained, bundle, **opened)
    assert first.clock.reference_ms == study.user_attrs[REFERENCE_MS] > 0
    monkeypatch.setattr(ReferenceClock, "calibrate", lambda self, passes=5: pytest.fail("timed the reference again"))
    again, _ = prepare(trained, bundle, **opened)
    assert again.clock.reference_ms == first.clock.reference_ms
    assert again.latency(trained).source == "measured"
    given, study = prepare(trained, bundle, **{**opened, "out_dir": tmp_path / "given",
                                              "search": SearchConfig(trials=2, calib_batches=1, reference_ms=2.5)})
    assert given.clock.reference_ms == study.user_attrs[REFERENCE_MS] == 2.5
    # Another target has no clock: its latencies are estimates.
    pi4, _ = prepare(trained, bundle, **{**opened, "target": get_target("pi4"), "out_dir": tmp_path / "pi4"})
    assert pi4.clock is None and pi4.latency(trained).source != "measured"


class _SiluNet(torch.nn.Module):
    """TinyNet's shape with SiLU everywhere and a 5x5 depthwise layer: open to all three kinds of surgery."""

    def __init__(self) -> None:
        super().__init__()
        from tests.conftest import SqueezeExcite

        act = torch.nn.SiLU
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), act())
        self.block = torch.nn.Sequential(
            torch.nn.Conv2d(16, 32, 1), torch.nn.BatchNorm2d(32), act(),
            torch.nn.Conv2d(32, 32, 5, stride=2, padding=2, groups=32), torch.nn.BatchNorm2d(32), act(),
            SqueezeExcite(32), torch.nn.Conv2d(32, 24, 1), torch.nn.BatchNorm2d(24))
        self.head = torch.nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.slow
def test_surgery_plans_are_searched_fine_tuned_from_the_original_and_exported(bundle, tmp_path):
    from edgeopt import SearchSpace, Surgery
    from edgeopt.hw_models.targets import get_target
    from edgeopt.search.optimize import target_knobs
    from edgeopt.search.training import train

    torch.manual_seed(0)
    model = _SiluNet()
    train(model, bundle.train, epochs=2, lr=0.01, batch_size=32, seed=0)
    model.eval()
    space = SearchSpace.from_model(model, bundle.example_input())
    assert [b.name for b in space.surgery_blocks] == ["stem", "block"]
    lite = Surgery(activation="relu", gate=False, kernel=3)
    result = optimize(model, bundle, target="host", budget="80%", out=tmp_path, progress=False,
                      search=SearchConfig(trials=8, seed=0, calib_batches=2, start="hand", input_scales=(1.0,),
                                          depth=False),
                      finetune_config=FinetuneConfig(top=8, epochs=0.25, batch_size=32))
    import optuna
    from edgeopt.search.study import trial_plan

    study = optuna.load_study(study_name="edgeopt", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.journal"))))
    plans = {t.number: trial_plan(t) for t in study.trials if "plan" in t.user_attrs}
    lite_int8 = space.restrict(target_knobs(get_target("host"), size_matters=False)).uniform(
        w_bits=8, a_bits=8, surgery=lite)
    assert dict(lite_int8.surgery) == {"block": lite, "stem": Surgery(activation="relu")}
    assert lite_int8 in plans.values()  # TI's lite model in int8 is one of the starting plans
    tuned = result.trials[result.trials["finetuned_accuracy"].notna()]
    assert any(plans[t].surgery for t in tuned["trial"]), "a plan with surgery should be among the fine-tuned"
    if result.plan.surgery:
        report = (tmp_path / "report.md").read_text()
        assert "takes model surgery" in report and "activations -> relu" in report
        assert ModelPlan.from_json((tmp_path / "selected" / "plan.json").read_text()) == result.plan
    session = ort.InferenceSession(str(tmp_path / "selected" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = input_for(result.model, bundle.val.tensors[0][:16])
    with torch.no_grad():
        ref = result.model(bundle.val.tensors[0][:16]).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 15 / 16
