"""Waiting out an MLflow tracking server that restarts (the window of sweep.storage_outage_s).

MLflow's REST client already retries every request it sends (metrics, tags, params, run updates, artifact
uploads through the server) on a refused, broken or timed-out connection, whatever the HTTP method: urllib3's
Retry under requests (mlflow/utils/request_utils.py), with MLFLOW_HTTP_REQUEST_MAX_RETRIES
retries, the first at once and the next MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR x 2, 4, 8, ... s later (each sleep at
most urllib3's Retry.DEFAULT_BACKOFF_MAX, plus up to MLFLOW_HTTP_REQUEST_BACKOFF_JITTER). `mlflow_retries` sets
those two variables, unless you set them, so that the retries reach past the window; the call waits meanwhile, and
the trial's result waits with it in memory. Two things MLflow does not do. It does not retry a request whose
answer the dying server cut off half-way (urllib3 retries up to the answer's head; requests reads the body), so
PatientClient sends that one again. And it does not say so: urllib3 logs one warning per failed attempt. Those
warnings become one line per outage here (and the Tracker's calls, through PatientClient, end it):

    [sweep] tracking server unreachable since 12:03:04, retrying for up to 126 s ([Errno 111] Connection refused)
    [sweep] tracking server back after 34 s

A call that fails after all of MLflow's retries stops the worker with one line (TrackingUnreachable, exit 3), its
trial noted for the next start like a storage outage's (sweeper/outage.py); every later call fails at once, so
the worker does not wait the window again for each run it closes.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import requests
from mlflow.environment_variables import (
    _MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT,
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
)
from mlflow.exceptions import MlflowException
from urllib3.util import Retry

from critic.redact import mask
from sweeper.outage import Outage, StorageUnreachable

WHAT = "tracking server"


class TrackingUnreachable(StorageUnreachable):
    """The tracking server stayed away through all of MLflow's retries; handled like a storage outage."""

    what = WHAT


def mlflow_retries(window_s: float) -> float:
    """Set MLflow's HTTP retries to reach past `window_s` (unless the environment sets them); the seconds they wait.

    Set in the environment, so that worker processes and their threads inherit them; MLflow reads them per request.
    """
    os.environ.setdefault(MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name, "1")
    factor = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    if MLFLOW_HTTP_REQUEST_MAX_RETRIES.name not in os.environ:
        retries = 0
        while retries < _MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT.get() and _reach(retries, factor) < window_s:
            retries += 1
        os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = str(retries)
    return _reach(MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), factor)


def _reach(retries: int, factor: int) -> float:
    """Seconds urllib3's Retry sleeps over `retries` retries: none before the first, then factor x 2, 4, 8, ..."""
    return float(sum(min(factor * 2 ** k, Retry.DEFAULT_BACKOFF_MAX) for k in range(1, retries)))


class _RetryWarnings(logging.Filter):
    """urllib3's 'Retrying (...) after connection broken by ...' for an MLflow request: the outage's first line
    instead of one warning per attempt. Other hosts' warnings pass."""

    def __init__(self, outage: Outage) -> None:
        super().__init__()
        self.outage = outage

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if not (str(record.msg).startswith("Retrying") and len(args) == 3 and "mlflow" in str(args[2])):
            return True
        self.outage.failed(mask(str(args[1]).rsplit(": ", 1)[-1]))
        return False


_OUTAGE: Outage | None = None  # one tracking server per process


def tracking_outage(window_s: float) -> Outage:
    """This process's Outage of its tracking server, its window what MLflow's retries reach (`mlflow_retries`)."""
    global _OUTAGE
    if _OUTAGE is None:
        _OUTAGE = Outage(window_s, what=WHAT)
        logging.getLogger("urllib3.connectionpool").addFilter(_RetryWarnings(_OUTAGE))
    _OUTAGE.window_s = mlflow_retries(window_s)
    return _OUTAGE


class PatientClient:
    """An MlflowClient (every method, the same arguments) whose calls report to the tracking server's Outage."""

    def __init__(self, client, outage: Outage) -> None:
        self._client, self._outage = client, outage
        self._gave_up: str | None = None

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            return self._call(attr, *args, **kwargs)
        return call

    def _call(self, method, *args, **kwargs):
        while self._gave_up is None:
            try:
                result = method(*args, **kwargs)
            except (MlflowException, requests.exceptions.RequestException) as exc:
                if not _connection_fault(exc):
                    raise
                self._outage.failed(exc)  # the first line, where urllib3 did not retry
                waited = time.monotonic() - (self._outage.since or time.monotonic())
                if waited < self._outage.window_s:
                    # Not retried by MLflow: the answer was cut off (see the module docstring). Sent again, the
                    # request meets MLflow's retries; a request the server had done already is harmless again
                    # (metrics are deduplicated, params, tags and run updates are set to the same values), but
                    # for create_run: its first run stays.
                    time.sleep(1.0)
                    continue
                self._gave_up = f"{WHAT} unreachable for {waited:.0f} s: stopping; rerun the same command to resume"
                break
            self._outage.worked()
            return result
        raise TrackingUnreachable(self._gave_up)


def patient_client(client, tracking_uri: str, window_s: float):
    """`client` wrapped in PatientClient for a tracking server (http, https); a local store has no outages."""
    if not tracking_uri.startswith(("http://", "https://")):
        return client
    return PatientClient(client, tracking_outage(window_s))


def _connection_fault(exc: BaseException | None) -> bool:
    """The server did not answer (refused, reset, timed out, cut off half-way), as requests reports it under
    MLflow's exception."""
    while exc is not None:
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            requests.exceptions.ChunkedEncodingError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
