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


def _journal_study(out: Path) -> optuna.Study:
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name="edgeopt", storage=storage)


@pytest.mark.slow
def test_three_local_workers_share_one_journal_study(bundle, trained, tmp_path):
    result = optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path, workers=3, progress=False,
                      search=SearchConfig(trials=12, seed=3, calib_batches=2), finetune_config=NO_FINETUNE)
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
    search = SearchConfig(trials=8, seed=5, calib_batches=2, storage=postgres_url, study_name="shared")
    result = optimize(trained, bundle, target="pi4", budget="60%", out=tmp_path, workers=2, progress=False,
                      search=search, finetune_config=NO_FINETUNE)
    assert len(result.trials) == 8 and result.trials["plan_key"].is_unique
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    done = finished(study)
    assert len(done) == 8 and len({t.user_attrs[PLAN_KEY] for t in done}) == 8
    assert len(joined(study)) == 2 and {t.user_attrs[WORKER] for t in done} <= set(joined(study))
