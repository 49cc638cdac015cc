"""How a trial counts the others when deciding whether the study already has enough."""

from __future__ import annotations

import optuna

from edgeopt.search.objective import Objective
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
