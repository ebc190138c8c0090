"""Several worker processes on one study: launch, join, reap dead trials, watch progress.

Workers share the study through the Optuna storage (Optuna's own distributed
mode). A worker that dies stops its heartbeat; once the grace period passes,
whichever process looks next marks the trial FAIL, closes its MLflow run as
FAILED and re-queues the same parameters as a new trial. Workers started here
(`--workers N`) are children of this process, which sees one die at once: it
fails and re-queues that worker's trial right away (each trial records the
worker that runs it), without waiting for the grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from sweeper import study as study_mod
from sweeper.board import best_trials, show_bars, trial_line
from sweeper.outage import StorageUnreachable, fail_running_trial
from sweeper.retry import KEEP_ON_RETRY, worker_id
from sweeper.slots import plan_slots, visible_device_ids
from sweeper.stores import without_password
from sweeper.study import SweepStopped
from sweeper.tracking import Tracker, TrackingError

ROOT = Path(__file__).resolve().parents[1]
NO_HEARTBEAT = "worker died (no heartbeat)"


class CloseAndRetry:
    """Heartbeat-stale trial callback: close its MLflow run as FAILED, then re-queue its params as a new trial.

    Optuna has already marked the trial FAIL (so its attributes are frozen); the new trial records
    `retry_of` = the dead trial's number, which is how `status` explains the failure.
    """

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self.tracker: Tracker | None = None  # made on first use: most sweeps never lose a worker
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                 reason: str = NO_HEARTBEAT) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                self.tracker = self.tracker or Tracker(self.tracking_uri)
                self.tracker.fail_dead(run_id, f"{reason}; trial re-queued")
            except TrackingError as exc:  # the re-queue matters more than the bookkeeping
                print(f"[sweep] could not close the MLflow run of dead trial {trial.number}: {exc}", file=sys.stderr)
        trial.user_attrs = {**{k: v for k, v in trial.user_attrs.items() if k in KEEP_ON_RETRY},
                            "retry_of": trial.number, "retry_reason": reason}
        self.retry(study, trial)


class LocalWorkers:
    """The worker processes this process started: which have died, and failing their trials at once."""

    def __init__(self, study: optuna.Study, procs: list[subprocess.Popen], retry: CloseAndRetry) -> None:
        self.study, self.procs, self.retry = study, procs, retry
        self.reaped: set[int] = set()

    def all_exited(self) -> bool:
        """Reap every newly dead worker's trial; True once no worker runs."""
        for index, proc in enumerate(self.procs):
            if proc.poll() not in (None, 0) and index not in self.reaped:
                self.reaped.add(index)
                self._fail_trials_of(index, proc)
        return all(proc.poll() is not None for proc in self.procs)

    def _fail_trials_of(self, index: int, proc: subprocess.Popen) -> None:
        code = proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        reason = f"worker {index} (pid {proc.pid}) died ({how})"
        held = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker") == worker_id(proc.pid)]
        failed = [n for n in held if fail_running_trial(self.study, n, reason, self.retry)]
        requeued = f": trial {', '.join(map(str, failed))} failed and re-queued" if failed else ""
        print(f"[sweep] {reason}{requeued}", file=sys.stderr, flush=True)


def worker_command(study_name: str, storage_url: str, tracking_uri: str, index: int) -> tuple[list[str], dict]:
    """`sweep.py worker` for one launched worker, and the passwords of its URLs as the environment variables it
    reads them from: by environment, not argv, which every user of a machine can read."""
    storage_arg, storage_password = without_password(storage_url)
    tracking_arg, tracking_password = without_password(tracking_uri)
    secrets = {name: value for name, value in (("SWEEP_DB_PASSWORD", storage_password),
                                               ("SWEEP_TRACKING_PASSWORD", tracking_password)) if value is not None}
    return [sys.executable, str(ROOT / "sweep.py"), "worker", "--study", study_name, "--storage", storage_arg,
            "--tracking-uri", tracking_arg, "--worker-index", str(index), "--no-progress"], secrets


def _worker_env(n_workers: int, secrets: dict, slot: list[str] | None) -> dict[str, str]:
    env = dict(os.environ, SWEEP_OUTAGE_LINES="0", **secrets)  # the parent prints one line per outage for all
    if slot:  # this worker's GPUs for its whole life: concurrent trials never share one (sweeper/slots.py)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
    else:  # split the CPU cores: each worker gets its share of torch threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = str(max(1, cores // n_workers))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, SWEEP_TORCH_THREADS=threads)
    return env


def launch_workers(sweep, n_workers: int, progress: bool = True, plan=None) -> None:
    """Start n worker processes on `sweep`'s study (the study's handle, sweeper/sweep.py) on this machine, forward
    SIGINT/SIGTERM to them, show the study's progress."""
    study, spec, storage_url, tracking_uri = sweep.study, sweep.spec, sweep.storage_url, sweep.tracker.tracking_uri
    slots, notice = plan_slots(n_workers, visible_device_ids(), spec.cfg.sweep.gpus_per_trial)
    if notice:
        print(notice, file=sys.stderr)
    n_workers = len(slots) or n_workers
    # Own sessions: a terminal's Ctrl-C reaches only this process, which forwards one SIGTERM to each worker.
    commands = [worker_command(study.study_name, storage_url, tracking_uri, i) for i in range(n_workers)]
    procs = [subprocess.Popen(argv, env=_worker_env(n_workers, secrets, slots[i] if slots else None), cwd=os.getcwd(),
                              start_new_session=True)
             for i, (argv, secrets) in enumerate(commands)]
    workers = LocalWorkers(study, procs, CloseAndRetry(tracking_uri))
    n_trials = plan.n_trials if plan else spec.cfg.sweep.n_trials
    try:
        watch_until(study, n_trials, workers.all_exited, progress, plan)
    except StorageUnreachable:  # the workers stop too once their own window is over (or finish, if it comes back)
        for p in procs:
            p.wait()
        raise
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        raise
    codes = [p.wait() for p in procs]
    # a worker that died after the others finished its trial: fine
    if any(code != 0 for code in codes) and not study_done(study, n_trials, plan):
        raise SweepStopped(f"worker exit codes {codes}; see their output above and `sweep.py status`")


def study_done(study: optuna.Study, n_trials: int, plan=None) -> bool:
    """The study (or the confirmation `plan`) holds its n_trials finished trials: the workers have nothing left."""
    counts = study_mod.state_counts(study)
    return (plan.finished(study, counts) if plan else study_mod.finished_count(counts)) >= n_trials


def watch_until(study: optuna.Study, n_trials: int, done, progress: bool, plan=None, poll_s: float = 2.0) -> None:
    """A bar on a terminal; otherwise one line per trial any worker finishes (launched workers print nothing)."""
    bars = show_bars(progress)
    bar = tqdm(total=n_trials, desc="trials (all workers)", disable=not bars, dynamic_ncols=True)
    lines = _TrialLines(study) if progress and not bars else None
    try:
        while not done():
            _refresh(bar, study, plan)
            if lines:
                lines.print_new()
            time.sleep(poll_s)
        _refresh(bar, study, plan)
        if lines:
            lines.print_new()
    finally:
        bar.close()


class _TrialLines:
    """Prints `trial_line` once for each trial that finishes after it starts watching (a resumed study's old
    trials were reported by the run that ran them)."""

    _DONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.seen = {t.number for t in self._finished()}

    def _finished(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=self._DONE)

    def print_new(self) -> None:
        for trial in sorted(self._finished(), key=lambda t: t.number):
            if trial.number not in self.seen:
                self.seen.add(trial.number)
                print(trial_line(trial), flush=True)


def _refresh(bar, study: optuna.Study, plan=None) -> None:
    counts = study_mod.state_counts(study)
    bar.n = plan.finished(study, counts) if plan else study_mod.finished_count(counts)
    best = best_trials(study)
    bar.set_postfix_str((f"best={best[0].values[0]:.4f} " if best else "") +
                        f"running={counts['RUNNING']} fail={counts['FAIL']} waiting={counts['WAITING']}")
    bar.refresh()


def watch(study: optuna.Study) -> int:
    """`status --watch`: poll the storage until the study is done or Ctrl-C."""
    n_trials = study_mod.stored_spec(study).cfg.sweep.n_trials
    try:
        watch_until(study, n_trials, lambda: _finished(study) >= n_trials, progress=True)
    except KeyboardInterrupt:
        pass
    return 0


def _finished(study: optuna.Study) -> int:
    return study_mod.finished_count(study_mod.state_counts(study))
