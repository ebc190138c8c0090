"""Signals: SIGINT/SIGTERM close the current trial cleanly, and a flag every loop can check."""

from __future__ import annotations

import signal
import threading

STOP_REQUESTED = threading.Event()
_DEFERRED = threading.Event()  # set from a trial's claim until its MLflow run is recorded


def stop_on_signals(*signums: int) -> None:
    """SIGINT/SIGTERM end the current trial cleanly (Optuna FAIL 'interrupted', MLflow KILLED).

    The handler raises KeyboardInterrupt once and also sets STOP_REQUESTED: an exception raised in a
    signal handler is lost when it lands in a finalizer or weakref callback, so the trial also checks
    the flag after every optimizer step and the trial loop before every new trial. Later signals are
    ignored so that closing the trial is not cut short. Inside `defer_signals()` the handler only sets the
    flag: `resume_signals()` raises it once the step that must not be cut in half is done.
    """
    def handler(signum, frame):
        for sig in signums:
            signal.signal(sig, signal.SIG_IGN)
        STOP_REQUESTED.set()
        if not _DEFERRED.is_set():
            raise KeyboardInterrupt(f"signal {signum}")
    for sig in signums:
        signal.signal(sig, handler)


def defer_signals() -> None:
    """From here until `resume_signals()`, a signal only sets STOP_REQUESTED.

    The trial loop calls it before Optuna claims a trial, the objective resumes once the trial's MLflow run
    exists and its id is recorded: a signal in between would otherwise leave a claimed trial without its
    run, or a run that no trial points to (left RUNNING in MLflow).
    """
    _DEFERRED.set()


def resume_signals(raise_now: bool = True) -> None:
    """End `defer_signals()`; with `raise_now`, a signal that came meanwhile raises KeyboardInterrupt here."""
    _DEFERRED.clear()
    if raise_now:
        raise_if_stop_requested()


def raise_if_stop_requested() -> None:
    if STOP_REQUESTED.is_set():
        raise KeyboardInterrupt("stop requested by a signal")
