"""The trial loop of one worker process.

A worker asks for one trial at a time until the study holds `n_trials`
finished (COMPLETE or PRUNED) trials. Failed trials do not count, so a dead or
failed trial never silently shrinks the sweep; `sweep.max_failures` bounds them.
"""

from __future__ import annotations

import gc
import time
import warnings
from typing import TYPE_CHECKING

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread  # optimize's own heartbeat thread (optuna pinned)
from optuna.trial import TrialState
from tqdm.auto import tqdm

from sweeper.board import best_trials, count_failures, show_bars, trial_line
from sweeper.objective import Objective, TrialFailure
from sweeper.outage import StorageUnreachable, leave_for_next_start
from sweeper.parent import ParentUpdater
from sweeper.retry import interrupted
from sweeper.signals import defer_signals, raise_if_stop_requested, resume_signals
from sweeper.stores import StorageLock
from sweeper.study import SweepStopped, finished_count, state_counts

if TYPE_CHECKING:
    from critic.trial import TrialResult


class SearchPlan:
    """The search's view for the trial loop: n_trials finished (COMPLETE or PRUNED) trials; nothing to enqueue."""

    is_search = True  # study-level curves and the best checkpoint belong to the search only

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def finished(self, study: optuna.Study, counts: dict[str, int]) -> int:
        return finished_count(counts)

    def refill(self, study: optuna.Study) -> None:
        pass


def run_trials(sweep, n_trials: int, progress: bool = True, poll_s: float = 5.0, plan=None) -> None:
    """Run trials of `sweep` (the study's handle, sweeper/sweep.py) in this process until the plan (default: n_trials
    finished search trials) is done.

    The sweep's storage is locked while a trial is claimed, so that workers never overshoot n_trials.
    """
    study, storage_url = sweep.study, sweep.storage_url
    plan = plan or SearchPlan(n_trials)
    bars = show_bars(progress)  # on a terminal; redirected output gets one line per finished trial instead
    completed: list[tuple[int, TrialResult]] = []  # this process's trial, its critic in memory (search only)
    objective = Objective(sweep, progress=bars,
                          on_complete=(lambda number, result: completed.append((number, result)))
                          if plan.is_search else None)
    callbacks = [ParentUpdater(sweep)] if plan.is_search else []
    if progress and not bars:
        callbacks.append(lambda _, trial: print(trial_line(trial), flush=True))
    max_failures = sweep.spec.cfg.sweep.max_failures or plan.n_trials
    # Each trial ends with gc.collect() to free its critic. What exists now (the imported libraries, the study, the
    # data) lives until the process ends: freeze it, so those collections walk only what trials create (the gc
    # module's documented use of freeze; a full collection over torch/transformers/mlflow is ~0.2 s per trial).
    gc.freeze()
    bar = tqdm(total=plan.n_trials, desc="trials", disable=not bars, dynamic_ncols=True)
    try:
        while True:
            raise_if_stop_requested()
            with StorageLock(storage_url) as claim:  # count, then ask, as one step: workers never overshoot
                plan.refill(study)
                counts = state_counts(study)
                finished = plan.finished(study, counts)
                bar.n = min(finished, plan.n_trials)
                bar.set_postfix_str(_postfix(study, counts))
                if finished >= plan.n_trials:
                    break
                failures = count_failures(study)
                if failures >= max_failures:
                    raise SweepStopped(f"{failures} trials failed (sweep.max_failures={max_failures}); "
                                       f"see `sweep.py status` for their reasons")
                if finished + counts["RUNNING"] >= plan.n_trials:
                    # Other workers hold the last trials; wait in case one dies and its trial is re-queued.
                    claim.release()
                    optuna.storages.fail_stale_trials(study)
                    time.sleep(poll_s)
                    continue
                defer_signals()  # until the claimed trial's MLflow run is recorded (Objective resumes them)
                try:
                    run_one_trial(study, _release_then(claim, objective), callbacks, storage_url)
                finally:
                    resume_signals(raise_now=False)
            if completed:  # now that Optuna has it, is it the study's best?
                sweep.save_best_critic(*completed.pop())
    finally:
        bar.close()


def run_one_trial(study: optuna.Study, objective, callbacks: list, storage_url: str | None = None) -> None:
    """Ask, run the objective with Optuna's heartbeat, tell, call back: what study.optimize(n_trials=1) does.

    Not study.optimize itself: when its final tell fails (the storage went away), Optuna's error handling reads the
    storage again and dies with UnboundLocalError. Here the tell waits out an outage holding the result
    (sweeper/outage.py), and past the window the trial is noted for the next start to fail.
    """
    optuna.storages.fail_stale_trials(study)  # as optimize does before each trial: dead workers' trials
    with warnings.catch_warnings():  # the heartbeat below is optimize's own, so the warning does not apply
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    error: BaseException | None = None
    try:
        with get_heartbeat_thread(trial._trial_id, study._storage):
            try:
                values, state = objective(trial), TrialState.COMPLETE
            except optuna.TrialPruned:
                values, state = None, TrialState.PRUNED
            except (Exception, KeyboardInterrupt) as exc:  # a TrialFailure is recorded and the sweep goes on
                values, state, error = None, TrialState.FAIL, exc
                if isinstance(exc, KeyboardInterrupt) and "fail_reason" not in trial.user_attrs:
                    interrupted(trial)  # the signal came in the instant before the objective deferred it
        frozen = study.tell(trial, values, state=state)
    except StorageUnreachable as exc:  # or the tracking server (sweeper/tracking_outage.py)
        if storage_url is not None:
            leave_for_next_start(storage_url, study.study_name, trial.number, exc.what)
        raise
    if error is not None and not isinstance(error, TrialFailure):
        raise error
    for callback in callbacks:
        callback(study, frozen)


def _release_then(claim: StorageLock, objective: Objective):
    """The objective, releasing the claim first: by then the trial is asked for (claimed)."""
    def run(trial: optuna.Trial):
        claim.release()
        return objective(trial)
    return run


def _postfix(study: optuna.Study, counts: dict[str, int]) -> str:
    best = best_trials(study)
    best_text = f"best={best[0].values[0]:.4f}" if best else "best=n/a"
    return f"{best_text} complete={counts['COMPLETE']} pruned={counts['PRUNED']} fail={counts['FAIL']}"
