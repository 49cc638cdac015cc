"""Parallel workers on shared storage: the journal file, and a real PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest

from edgeopt.search.finetune import FinetuneConfig
from edgeopt.search.optimize import SearchConfig, optimize
from edgeopt.search.study import PLAN_KEY, WORKER, finished, joined

NO_FINETUNE = FinetuneConfig(top=1, epochs=0)
# The workers' searches start from the hand plans only: the allocation runs in the first process
# before any worker starts (tests/search/test_allocate.py and test_optimize.py test it), and it
# was most of each small search's time here.
START = "hand"


def _journal_study(out: Path) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name="edgeopt", storage=storage)


@pytest.mark.slow
def test_three_local_workers_share_one_journal_study(bundle, trained, tmp_path):
    result = optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path, workers=3, progress=False,
                      search=SearchConfig(trials=12, seed=3, calib_batches=2, start=START), finetune_config=NO_FINETUNE)
    assert len(result.trials) == 12 and result.trials["plan_key"].is_unique
    study = _journal_study(tmp_path)
    done = finished(study)
    assert len(done) == 12
    # Three processes opened the study; which of them measured how many trials is up to timing.
    assert len(joined(study)) == 3 and {t.user_attrs[WORKER] for t in done} <= set(joined(study))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on a local port, from the distribution's packages."""
    bindir = Path("/usr/lib/postgresql").glob("*/bin")
    bindir = next(iter(sorted(bindir, reverse=True)), None)
    initdb = shutil.which("initdb") or (bindir and str(bindir / "initdb"))
    pg_ctl = shutil.which("pg_ctl") or (bindir and str(bindir / "pg_ctl"))
    if not initdb or not Path(initdb).exists():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    pytest.importorskip("psycopg", reason="psycopg is needed for postgresql:// storage URLs")
    # Outside pytest's private tmp folder, which the postgres user cannot enter.
    data = Path(tempfile.mkdtemp(prefix="edgeopt-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(as_user + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    log = data / "server.log"
    subprocess.run(as_user + [pg_ctl, "-D", str(data), "-l", str(log), "-w", "-o",
                              f"-p {port} -c listen_addresses=127.0.0.1 -k {data}", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql_join_one_study(bundle, trained, tmp_path, postgres_url):
    search = SearchConfig(trials=8, seed=5, calib_batches=2, storage=postgres_url, study_name="shared",
                          start=START)
    result = optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path, workers=2, progress=False,
                      search=search, finetune_config=NO_FINETUNE)
    assert len(result.trials) == 8 and result.trials["plan_key"].is_unique
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    done = finished(study)
    assert len(done) == 8 and len({t.user_attrs[PLAN_KEY] for t in done}) == 8
    assert len(joined(study)) == 2 and {t.user_attrs[WORKER] for t in done} <= set(joined(study))


SCREENED = FinetuneConfig(top=2, epochs=0.5, batch_size=32, screen=4, screen_epochs=0.25)


def _tasks_of(out: Path):
    from optuna.storages.journal import JournalFileBackend

    from edgeopt.search.tasks import FinetuneTasks

    return FinetuneTasks(optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal"))), "edgeopt")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo: edgeopt's built-in model on its built-in MNIST subset (trained for half an epoch
    here, not the demo's full recipe, to keep the suite's time)."""
    from edgeopt.search.data import load_data
    from edgeopt.search.models import default_model

    data = load_data("mnist", progress=False)
    model, _ = default_model(data, cache_dir=tmp_path_factory.mktemp("demo"), epochs=0.5, progress=False)
    return model, data


@pytest.mark.slow
def test_two_local_workers_share_the_fine_tunes_and_select_what_one_process_selects(demo, tmp_path):
    from edgeopt.search.tasks import TASK

    model, data = demo
    # The sensitivity table on 128 proxy images, not 512: this test is about the workers (the
    # table took 12 of the 39 s of each of its two runs).
    search = SearchConfig(trials=8, seed=0, calib_batches=2, sensitivity_images=128, start=START)
    alone = optimize(model, data, target="pi4", budget="60%", out=tmp_path / "alone", progress=False,
                     search=search, finetune_config=SCREENED)
    shared = optimize(model, data, target="pi4", budget="60%", out=tmp_path / "shared", workers=2,
                      progress=False, search=search, finetune_config=SCREENED)
    tasks = _tasks_of(tmp_path / "shared")
    done = tasks.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    keys = [t.user_attrs[TASK] for t in done]
    # Four screenings and two full fine-tunes, each done exactly once, by either worker; the study says which.
    assert len(keys) == 4 + 2 and len(set(keys)) == len(keys)
    assert sorted(t.user_attrs["kind"] for t in done) == ["full"] * 2 + ["screen"] * 4
    workers = {t.user_attrs[WORKER] for t in done}
    assert workers <= set(joined(_journal_study(tmp_path / "shared")))
    assert all((tmp_path / "shared" / "finetuned" / f"{k}.pt").is_file() for k in keys)
    assert not tasks.study.get_trials(states=(optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING))
    # The same candidates, the same fine-tunes: the same selection as one process alone.
    assert shared.plan == alone.plan and shared.selected.accuracy == alone.selected.accuracy
    assert shared.summary["finetuned"] == alone.summary["finetuned"] == 2


@pytest.mark.slow
def test_a_worker_killed_mid_fine_tune_loses_only_that_fine_tune(demo, tmp_path):
    import signal
    import time

    import torch

    from edgeopt.search.finetune import FinetuneStore, finetune, task_specs
    from edgeopt.search.optimize import _candidates, _spawn_workers, prepare
    from edgeopt.search.study import worker_id
    from edgeopt.search.tasks import TASK

    trained, bundle = demo
    search = SearchConfig(trials=6, seed=0, calib_batches=2, sensitivity_images=128, start=START)
    budgets = (__import__("edgeopt.budget", fromlist=["parse_budget"]).parse_budget("60%"),)
    out = tmp_path / "run"
    optimize(trained, bundle, target="pi4", budget="60%", out=out, search_only=True, progress=False, search=search)
    context, study = prepare(trained, bundle, target=__import__("edgeopt").get_target("pi4"), budgets=budgets,
                             search=search, out_dir=out, seed=0)
    long = FinetuneConfig(top=1, epochs=2, batch_size=32)  # 250 steps: long enough to be killed in the middle
    candidate = _candidates(study)[1]
    store = FinetuneStore(tmp_path / "store")
    tasks = _tasks_of(out)
    tasks.submit(task_specs([candidate], "full", context, data=bundle, config=long, seed=0, store=store))
    # A worker of this process takes the waiting task (its search is already complete) ...
    (proc,) = _spawn_workers(2, {"model": trained, "data": bundle, "target": context.target, "budgets": budgets,
                                 "search": search, "store": store.folder, "parent": worker_id(),
                                 "run": "killed-worker-test", "threads": torch.get_num_threads()}, out)
    child = f"{socket.gethostname()}:{proc.pid}"
    deadline = time.monotonic() + 120
    while not any(t.user_attrs.get(WORKER) == child for t in tasks.study.get_trials(
            states=(optuna.trial.TrialState.RUNNING,))):
        assert proc.poll() is None and time.monotonic() < deadline, "the worker never took the task"
        time.sleep(0.1)
    # ... and is killed while it trains.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.has(tasks.study.get_trials()[0].user_attrs[TASK])
    tuned = finetune([candidate], context, data=bundle, config=long, seed=0, progress=False, store=store, tasks=tasks)
    tasks.mark_done("killed-worker-test")
    trials = tasks.study.get_trials()
    states = sorted((t.state.name, t.user_attrs.get(WORKER)) for t in trials)
    # Only the killed fine-tune was lost: failed as the dead worker's, queued again, done here once.
    assert states == [("COMPLETE", worker_id()), ("FAIL", child)]
    assert len(tuned) == 1 and tuned[0].candidate.accuracy == trials[-1].user_attrs["accuracy"]
    assert len(list(store.folder.glob("*.pt"))) == 1 and not list(store.folder.glob("*.partial"))


def test_a_result_done_elsewhere_but_missing_here_says_to_share_the_folder(tmp_path):
    from edgeopt import EdgeoptError
    from edgeopt.search.tasks import FinetuneTasks

    tasks = _tasks_of(tmp_path)
    spec = {"task": "k1", "kind": "full"}
    tasks.submit([spec])
    tasks.submit([spec])  # queued once, however often submitted
    claimed = tasks.claim()
    assert claimed is not None and tasks.claim() is None
    tasks.complete(claimed, {"accuracy": 50.0}, 50.0)  # done by "another machine", stored in its own folder
    with pytest.raises(EdgeoptError, match="--finetuned-dir that all of them reach"):
        tasks.do([spec], stored=lambda key: False, work=lambda s: ({}, 0.0))
    # A failed task is queued again and done here.
    failed_spec = {"task": "k2", "kind": "full"}
    tasks.submit([failed_spec])
    tasks.fail(tasks.claim(), "worker crashed")
    done = set()
    tasks.do([failed_spec], stored=done.__contains__, work=lambda s: (done.add(s["task"]) or {}, 1.0))
    assert done == {"k2"} and isinstance(tasks, FinetuneTasks)


def test_a_trial_its_process_never_signed_is_failed_after_the_grace(tmp_path, monkeypatch):
    """A run killed between Optuna starting a trial and the objective's first line leaves a
    running trial with no worker on it; a resumed run must not wait for it forever (it did)."""
    from edgeopt.search import study as study_module
    from edgeopt.search.study import fail_orphans, make_storage

    study = optuna.create_study(storage=make_storage(None, tmp_path), study_name="edgeopt")
    unsigned = study.ask()  # running, as the killed process left it
    signed = study.ask()
    signed.set_user_attr(WORKER, f"{socket.gethostname()}:{os.getpid()}")  # this process: alive
    assert fail_orphans(study) == 0  # moments old: its process may be about to sign it
    monkeypatch.setattr(study_module, "UNSIGNED_GRACE_S", -1.0)  # as if the grace had passed
    assert fail_orphans(study) == 1
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {unsigned.number: optuna.trial.TrialState.FAIL, signed.number: optuna.trial.TrialState.RUNNING}
