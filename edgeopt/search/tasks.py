"""Fine-tunes as tasks in the study's storage, which any process of the study can take.

Fine-tuning the finalists is the expensive part of a run on a real model. Each screening and full
fine-tune is a task: a trial of a second Optuna study beside the search's (`<study>:finetune`, in
the same storage: the journal file, or the PostgreSQL database several machines share), created
WAITING with what to train (the plan, the recipe, the seed, its key in the `FinetuneStore`). A
process claims one by moving it to RUNNING, which the storage lets only one process do; it trains,
puts the result in the store (a folder every worker can reach), and completes the task with the
worker, the time and the accuracy, so the study shows who did what.

A worker that dies mid-task leaves it RUNNING: a task whose worker on this machine is gone, or
whose heartbeat (written every `HEARTBEAT_S` by the training worker) is older than `STALE_S`, is
failed and put back WAITING, and another process takes it. A result already in the store is never
trained again: a claimed task whose key is there completes at once. Every process of a run submits
the same tasks (the same candidates give the same keys), and waits until the results it needs are
in the store, working on any waiting task meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import optuna
from optuna.trial import TrialState

from edgeopt.errors import EdgeoptError
from edgeopt.search.study import WORKER, local_worker_gone, worker_id

log = logging.getLogger(__name__)

TASK = "task"  # user attribute: the task's key in the FinetuneStore
HEARTBEAT = "heartbeat"  # user attribute: time.time() of the worker's last sign of life
DONE = "done "  # tasks-study attribute per run of optimize: DONE + its run token, once it needs no more
HEARTBEAT_S = 20.0
STALE_S = 120.0
POLL_S = 0.5


class FinetuneTasks:
    """The fine-tune task queue of one study."""

    def __init__(self, storage, study_name: str) -> None:
        with _quiet_optuna():
            self.study = optuna.create_study(storage=storage, study_name=f"{study_name}:finetune",
                                             direction="maximize", load_if_exists=True)
        self.storage = self.study._storage

    def _trials(self, *states: TrialState) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states or None)

    def submit(self, specs: Iterable[dict]) -> None:
        """Queue each spec (a dict with TASK and what to train) unless a task of its key is
        already waiting, running or done."""
        present = {t.user_attrs.get(TASK) for t in self._trials(TrialState.WAITING, TrialState.RUNNING,
                                                                TrialState.COMPLETE)}
        for spec in specs:
            if spec[TASK] not in present:
                self.study.enqueue_trial(params={}, user_attrs=spec)
                present.add(spec[TASK])

    def claim(self, prefer: set[str] | None = None) -> optuna.trial.FrozenTrial | None:
        """Take a waiting task (one of `prefer`'s keys first), or None if none is waiting."""
        waiting = self._trials(TrialState.WAITING)
        waiting.sort(key=lambda t: (prefer is not None and t.user_attrs.get(TASK) not in prefer, t.number))
        for trial in waiting:
            try:
                if not self.storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    continue  # another process took it first
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            self.storage.set_trial_user_attr(trial._trial_id, WORKER, worker_id())
            self.storage.set_trial_user_attr(trial._trial_id, HEARTBEAT, time.time())
            return trial
        return None

    def complete(self, trial: optuna.trial.FrozenTrial, result: dict, value: float) -> None:
        for key, item in result.items():
            self.storage.set_trial_user_attr(trial._trial_id, key, item)
        try:
            self.storage.set_trial_state_values(trial._trial_id, state=TrialState.COMPLETE, values=[value])
        except optuna.exceptions.UpdateFinishedTrialError:
            # Failed as stale by another process while this one finished: the result is in the
            # store all the same, and the re-queued task completes at once from it.
            pass

    def fail(self, trial: optuna.trial.FrozenTrial, reason: str) -> None:
        try:
            self.storage.set_trial_user_attr(trial._trial_id, "failed_because", reason)
            self.storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def requeue_orphans(self) -> int:
        """Fail and queue again the running tasks whose worker is gone: its process on this
        machine no longer exists, or its heartbeat is older than STALE_S (any machine)."""
        now, count = time.time(), 0
        for trial in self._trials(TrialState.RUNNING):
            beat = trial.user_attrs.get(HEARTBEAT)
            if beat is None and trial.datetime_start is not None:
                beat = trial.datetime_start.timestamp()  # claimed a moment ago, not yet signed
            dead = local_worker_gone(trial.user_attrs.get(WORKER, "")) or (beat is not None and now - beat > STALE_S)
            if dead:
                log.warning("Fine-tune task %d (worker %s) was left unfinished; queued again.",
                            trial.number, trial.user_attrs.get(WORKER, "?"))
                self.fail(trial, f"worker {trial.user_attrs.get(WORKER, '?')} gone")
                spec = {k: v for k, v in trial.user_attrs.items()
                        if k not in (WORKER, HEARTBEAT, "failed_because")}
                self.study.enqueue_trial(params={}, user_attrs=spec)
                count += 1
        return count

    def run(self, trial: optuna.trial.FrozenTrial, work: Callable[[dict], tuple[dict, float]]) -> None:
        """Do a claimed task: `work(spec)` trains, stores and returns (result attrs, value),
        while a thread keeps the task's heartbeat fresh."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    self.storage.set_trial_user_attr(trial._trial_id, HEARTBEAT, time.time())
                except Exception:  # noqa: BLE001 -- a missed beat only risks a re-run, never a wrong result
                    pass

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        started = time.perf_counter()
        try:
            result, value = work(dict(trial.user_attrs))
        except BaseException as exc:
            stop.set()
            self.fail(trial, f"{type(exc).__name__}: {exc}"[:300])
            raise
        stop.set()
        self.complete(trial, result | {"task_seconds": round(time.perf_counter() - started, 3)}, value)

    def do(self, specs: list[dict], *, stored: Callable[[str], bool], work: Callable[[dict], tuple[dict, float]],
           on_wait: Callable[[int], None] | None = None) -> None:
        """Queue `specs` and work until the result of each is in the store (`stored(key)`): take
        waiting tasks (these first, then any other), re-queue orphans, and queue again a task
        that failed. `on_wait(running)` is called each time this process starts waiting for
        tasks other workers are running."""
        keys = {spec[TASK] for spec in specs}
        self.submit(specs)
        waiting_said = False
        while missing := {k for k in keys if not stored(k)}:
            trial = self.claim(prefer=missing)
            if trial is not None:
                self.run(trial, work)
                waiting_said = False
                continue
            if self.requeue_orphans():
                continue
            live = {t.user_attrs.get(TASK): t for t in self._trials(TrialState.WAITING, TrialState.RUNNING)}
            done = {t.user_attrs.get(TASK): t for t in self._trials(TrialState.COMPLETE)}
            lost = [done[k] for k in missing if k not in live and k in done]
            if lost:
                raise EdgeoptError(
                    f"The fine-tune task {lost[0].number} was done by {lost[0].user_attrs.get(WORKER, 'another worker')}, "
                    f"but its result is not in this process's fine-tune folder: give every machine of the study one "
                    f"--finetuned-dir that all of them reach (a shared folder).")
            failed = [spec for spec in specs if spec[TASK] in missing and spec[TASK] not in live]
            if failed:  # a worker failed it (an error, an interruption): try again
                self.submit(failed)
                continue
            if on_wait is not None and not waiting_said:
                on_wait(len(live))
                waiting_said = True
            time.sleep(POLL_S)

    def serve(self, work: Callable[[dict], tuple[dict, float]], *, stop: Callable[[], bool]) -> None:
        """A worker's loop: take and do waiting tasks until `stop()`; re-queue orphans meanwhile."""
        while not stop():
            trial = self.claim()
            if trial is not None:
                self.run(trial, work)
            elif not self.requeue_orphans():
                time.sleep(POLL_S)

    def mark_done(self, run: str) -> None:
        """Tell the local workers of the run `run` (a token made per optimize call) that it needs no
        more fine-tunes."""
        self.study.set_user_attr(DONE + run, True)

    def run_done(self, run: str) -> bool:
        return bool(self.study.user_attrs.get(DONE + run))


@contextmanager
def _quiet_optuna():
    """create_study logs a line per call; the tasks study is opened by every process."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)
