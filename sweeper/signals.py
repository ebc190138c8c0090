"""Signals: SIGINT/SIGTERM close the current trial cleanly, and a flag every loop can check."""

from __future__ import annotations

import signal
import threading

STOP_REQUESTED = threading.Event()


def stop_on_signals(*signums: int) -> None:
    """SIGINT/SIGTERM end the current trial cleanly (Optuna FAIL 'interrupted', MLflow KILLED).

    The handler raises KeyboardInterrupt once and also sets STOP_REQUESTED: an exception raised in a
    signal handler is lost when it lands in a finalizer or weakref callback, so the trial also checks
    the flag after every optimizer step and the trial loop before every new trial. Later signals are
    ignored so that closing the trial is not cut short.
    """
    def handler(signum, frame):
        for sig in signums:
            signal.signal(sig, signal.SIG_IGN)
        STOP_REQUESTED.set()
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in signums:
        signal.signal(sig, handler)


def raise_if_stop_requested() -> None:
    if STOP_REQUESTED.is_set():
        raise KeyboardInterrupt("stop requested by a signal")
