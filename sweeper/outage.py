"""Waiting out a storage server that restarts or drops its connections (sweep.storage_outage_s).

SQLAlchemy's `pool_pre_ping` replaces pooled connections that died with the server; nothing below SQLAlchemy
retries a call that fails while the server is away, so PatientStorage does: every Optuna storage call (and the
claim lock, sweeper/stores.py) is tried again with backoff until it works or the outage has lasted the window.
A trial's result stays in memory meanwhile, in the call that commits it. One Outage per process and storage
prints one line when the outage starts and one when it ends:

    [sweep] storage unreachable since 12:03:04, retrying for up to 300 s (server closed the connection ...)
    [sweep] storage back after 15 s

Beyond the window StorageUnreachable stops the worker with one line. The trial it held stays RUNNING in the
storage (which could not be written); the worker writes its number to LEFT_RUNNING, and the next start from
the same folder fails and re-queues it at once (`fail_left_trials`). Elsewhere the heartbeat reaper does, after
sweep.grace_period.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import optuna
import sqlalchemy
from filelock import FileLock
from optuna.trial import TrialState

from critic.files import atomic_write_text
from critic.redact import mask

LEFT_RUNNING = "mlruns/left_running.json"  # beside sweep.log (commands/common.py), relative to the working folder
DEFAULT_WINDOW_S = 300  # sweep.storage_outage_s's default, for commands that read a study without its spec
_MAX_DELAY_S = 5.0  # backoff 0.5, 1, 2, 4, 5, 5, ... s: a server back is seen within 5 s


class StorageUnreachable(BaseException):
    """The storage server stayed away for the whole window.

    A BaseException, like KeyboardInterrupt: the objective's and Optuna's `except Exception` must let it through
    to the trial loop and the command, which stop the worker with one line.
    """

    what = "storage"  # the server that stayed away, in the reason of the trial the next start fails


def is_connection_fault(exc: BaseException) -> bool:
    """A lost or refused connection (server stopped, restarting, network), as SQLAlchemy reports it; data errors
    (IntegrityError, DataError, ProgrammingError) are not."""
    while exc is not None:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Outage:
    """One storage's outages as this process sees them, from every thread (the trial loop, the heartbeat)."""

    def __init__(self, window_s: float, announce: bool = True, what: str = "storage") -> None:
        self.window_s, self.announce, self.what = window_s, announce, what  # what: the server, in the lines
        self.since: float | None = None  # time.monotonic() of the first failure of the current outage
        self._lock = threading.Lock()

    def failed(self, exc: BaseException | str) -> None:
        """A call failed on a lost connection (`exc`, or its reason in words): the first one of an outage prints
        when and why."""
        with self._lock:
            if self.since is not None:
                return
            self.since = time.monotonic()
        self._say(f"{self.what} unreachable since {time.strftime('%H:%M:%S')}, retrying for up to "
                  f"{self.window_s:g} s ({exc if isinstance(exc, str) else _reason(exc)})")

    def worked(self) -> None:
        """A call worked: an outage in progress is over."""
        if self.since is None:
            return
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            self._say(f"{self.what} back after {time.monotonic() - since:.0f} s")

    def check(self) -> float:
        """Seconds of the window left; past it, StorageUnreachable."""
        since = self.since
        left = self.window_s - (time.monotonic() - since) if since is not None else self.window_s
        if left <= 0:
            raise StorageUnreachable(f"{self.what} unreachable for {self.window_s:g} s: stopping; rerun the same "
                                     f"command to resume")
        return left

    def _say(self, line: str) -> None:
        if self.announce:
            print(f"[sweep] {line}", file=sys.stderr, flush=True)


_OUTAGES: dict[str, Outage] = {}  # masked storage URL -> its Outage in this process


def outage_for(url: str, window_s: float | None = None) -> Outage:
    """This process's Outage of the storage at `url`; `window_s` (from the spec) replaces the default.

    SWEEP_OUTAGE_LINES=0 (set by `run --workers N` for its workers) silences the two lines: the parent, which
    polls the same storage, prints them once for all.
    """
    key = mask(url)
    if key not in _OUTAGES:
        _OUTAGES[key] = Outage(DEFAULT_WINDOW_S, os.environ.get("SWEEP_OUTAGE_LINES") != "0")
    if window_s is not None:
        _OUTAGES[key].window_s = window_s
    return _OUTAGES[key]


def known_outage(url: str) -> Outage | None:
    """The Outage of a storage this process has opened before (None: a first connection, which fails fast)."""
    return _OUTAGES.get(mask(url))


def patiently(outage: Outage, call, *args, **kwargs):
    """call(*args, **kwargs), tried again with backoff while it fails on a lost connection, up to the window."""
    delay = 0.5
    while True:
        try:
            result = call(*args, **kwargs)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            if not is_connection_fault(exc):
                raise
            outage.failed(exc)
            time.sleep(min(delay, outage.check()))
            delay = min(2 * delay, _MAX_DELAY_S)
            continue
        outage.worked()
        return result


_inside = threading.local()  # a storage call made by another one of the same thread is not retried on its own


def _patient(method):
    def call(self, *args, **kwargs):
        if getattr(_inside, "active", False):
            return method(self, *args, **kwargs)
        _inside.active = True
        try:
            return patiently(self.outage, method, self, *args, **kwargs)
        finally:
            _inside.active = False
    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


class PatientStorage(optuna.storages.RDBStorage):
    """An RDBStorage whose calls wait out a lost server (see the module docstring); opening it does not wait."""

    def __init__(self, url: str, outage: Outage, **kwargs) -> None:
        self.outage = outage
        super().__init__(url, **kwargs)

    def record_heartbeat(self, trial_id: int) -> None:
        """One beat; a lost connection only skips it: the heartbeat thread beats again after its interval, and a
        beat must never stop the trial (the trial loop decides when to give up)."""
        try:
            super().record_heartbeat(trial_id)
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            if not is_connection_fault(exc):
                raise
            self.outage.failed(exc)
            return
        self.outage.worked()

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        try:
            return _patient(optuna.storages.RDBStorage.set_trial_state_values)(self, trial_id, state, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            # A try whose connection broke after the commit: the trial already holds exactly what was asked.
            stored = self.get_trial(trial_id)
            if stored.state == state and (values is None or stored.values == [float(v) for v in values]):
                return True
            raise


# The calls Optuna makes on an RDBStorage: the study's own and those of the cache that load_study puts in front
# of it (optuna.storages._CachedStorage calls the private ones).
_WAITED = ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
           "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
           "get_study_system_attrs", "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
           "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param", "get_trial_param",
           "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
           "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "_get_trials", "get_best_trial",
           "_get_best_trial_id", "_get_stale_trial_ids", "get_n_trials", "get_trial_number_from_id",
           "get_trial_params")
for _name in _WAITED:
    setattr(PatientStorage, _name, _patient(getattr(optuna.storages.RDBStorage, _name)))


def leave_for_next_start(storage_url: str, study_name: str, number: int, what: str = "storage") -> None:
    """Note a trial this worker holds but cannot close (`what`, the storage or the tracking server, is away) for
    the next start to fail."""
    with FileLock(LEFT_RUNNING + ".lock"):
        entries = _read_left()
        entries.append({"storage": mask(storage_url), "study": study_name, "trial": number, "pid": os.getpid(),
                        "reason": f"worker stopped: {what} unreachable"})
        atomic_write_text(Path(LEFT_RUNNING), json.dumps(entries, indent=1))  # a full disk keeps the old list


def fail_running_trial(study: optuna.Study, number: int, reason: str, callback=None) -> bool:
    """Fail a RUNNING trial another process held, now, and hand it to `callback` (e.g. workers.CloseAndRetry, which
    re-queues it) with the reason; False when it finished meanwhile (e.g. the heartbeat reaper got there first)."""
    try:
        study.tell(number, state=TrialState.FAIL)
    except (RuntimeError, ValueError):
        return False
    if callback is not None:
        callback(study, study.get_trials(deepcopy=False)[number], reason)
    return True


def fail_left_trials(study: optuna.Study, storage_url: str, callback=None) -> list[int]:
    """Fail (and with `callback`, e.g. workers.CloseAndRetry, re-queue) the trials left RUNNING by a worker that
    stopped on an outage; returns their numbers. Entries of other storages and studies are kept."""
    if not os.path.exists(LEFT_RUNNING):
        return []
    failed = []
    with FileLock(LEFT_RUNNING + ".lock"):
        entries = _read_left()
        mine = [e for e in entries if e["storage"] == mask(storage_url) and e["study"] == study.study_name]
        for entry in mine:
            trial = study.get_trials(deepcopy=False)[entry["trial"]]
            reason = entry.get("reason", "worker stopped: storage unreachable")
            if trial.state == TrialState.RUNNING and fail_running_trial(study, trial.number, reason, callback):
                failed.append(trial.number)
        rest = [e for e in entries if e not in mine]
        atomic_write_text(Path(LEFT_RUNNING), json.dumps(rest, indent=1))
    return failed


def _read_left() -> list[dict]:
    os.makedirs(os.path.dirname(LEFT_RUNNING), exist_ok=True)
    try:
        with open(LEFT_RUNNING) as src:
            return json.load(src)
    except (OSError, ValueError):
        return []


def _reason(exc: BaseException) -> str:
    """The driver's first line, e.g. 'connection refused' or 'terminating connection due to administrator command'."""
    orig = getattr(exc, "orig", None)
    while orig is None and exc is not None:
        exc = exc.__cause__ or exc.__context__
        orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return mask(text.splitlines()[0] if text else "connection lost")
