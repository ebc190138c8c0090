"""Where studies and runs live: Optuna storage URLs, the MLflow store, a cross-process lock (masking: critic.redact).

Embedded default: Optuna in `mlruns/optuna.db` and MLflow's SQLite store in
`mlruns/mlflow.db` with artifacts under `mlruns/artifacts`. Several workers
share a study through one storage; StorageLock lets them take turns where
Optuna alone would race (creating the schema and the study, claiming the last
trials).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import quote, urlsplit

import optuna
import sqlalchemy
from filelock import FileLock
from sqlalchemy.pool import NullPool

from critic.config import SpecError
from critic.redact import mask, without_password  # noqa: F401  (re-exported: the sweeper masks through stores)

DEFAULT_ROOT = Path("mlruns")


def default_storage(root: Path = DEFAULT_ROOT) -> str:
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'optuna.db').resolve()}"


def default_tracking_uri(root: Path = DEFAULT_ROOT) -> str:
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def artifact_root(tracking_uri: str) -> str | None:
    """Local artifact folder beside a SQLite MLflow store; None lets a tracking server decide."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent.resolve() / "artifacts")
    return None


def normalize_storage_url(url: str) -> str:
    """Pin the PostgreSQL driver explicitly: with SQLAlchemy 2.1 a bare postgresql:// means psycopg 3."""
    scheme = urlsplit(url).scheme
    if scheme in ("postgresql", "postgres"):
        for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
            if importlib.util.find_spec(module):
                return f"postgresql+{driver}://" + url.split("://", 1)[1]
        raise SpecError("the storage URL is PostgreSQL but no driver is installed; run `make install` "
                        "(installs psycopg) or `pip install 'psycopg[binary]'`")
    return url


def make_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 stale_trial_callback=None) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url`; RDB URLs get pre-ping, a lock timeout for SQLite and heartbeats."""
    url = normalize_storage_url(url)
    if not url.startswith(("sqlite", "postgresql", "mysql")):
        return optuna.storages.get_storage(url)
    if heartbeat_interval is not None and grace_period is not None and grace_period < 2 * heartbeat_interval:
        # A live worker's heartbeat can be a little late; a grace shorter than two beats reaps live trials.
        raise SpecError(f"sweep.grace_period ({grace_period}) must be at least twice sweep.heartbeat_interval "
                        f"({heartbeat_interval}); the defaults are 600 and 60 seconds")
    if heartbeat_interval is not None and heartbeat_interval < 1:
        raise SpecError(f"sweep.heartbeat_interval must be >= 1 second, got {heartbeat_interval}")
    engine_kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Several local workers share one file: wait for the write lock instead of failing with 'database is locked'.
        engine_kwargs["connect_args"] = {"timeout": 120}
    with StorageLock(url):  # the first process creates the schema; the others wait instead of racing it
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period,
                                          heartbeat_stale_trial_callback=stale_trial_callback)


class StorageLock:
    """A lock shared by every process that uses one storage, so they take turns where Optuna alone would race.

    SQLite: a file lock (flock) on `<database>.lock` beside the file (SQLite is for workers of one machine anyway).
    PostgreSQL: a session advisory lock held on a connection of its own. A holder that dies releases it
    (the kernel closes the file, the server drops the connection). Other storages: no lock. Re-entrant
    within a process; `release()` may be called early, and again at exit.
    """

    _ADVISORY_KEY = 0x5357454550  # "SWEEP"; held for milliseconds at a time, so one key per database will do
    _held: dict[str, list] = {}  # lock key -> [handle, depth] in this process

    def __init__(self, url: str | None) -> None:
        self.key, self.url, self.acquired = None, url, False
        parsed = sqlalchemy.engine.make_url(normalize_storage_url(url)) if url else None
        if parsed is None:
            return
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            self.key = str(Path(parsed.database).resolve()) + ".lock"
        elif parsed.get_backend_name() == "postgresql":
            self.key, self.url = f"postgresql:{parsed.render_as_string(hide_password=True)}", parsed

    def __enter__(self) -> "StorageLock":
        if self.key is None or self.acquired:
            return self
        if self.key not in self._held:
            self._held[self.key] = [self._acquire(), 0]
        self._held[self.key][1] += 1
        self.acquired = True
        return self

    def _acquire(self):
        if self.key.startswith("postgresql:"):
            connection = sqlalchemy.create_engine(self.url, poolclass=NullPool).connect()
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._ADVISORY_KEY})
            return connection
        if not Path(self.key).parent.is_dir():
            raise SpecError(f"the folder of the SQLite storage, {Path(self.key).parent}, does not exist; create it "
                            "or pass another --storage")
        lock = FileLock(self.key)
        lock.acquire()
        return lock

    def release(self) -> None:
        if not self.acquired:
            return
        self.acquired = False
        entry = self._held[self.key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del self._held[self.key]
        if isinstance(entry[0], FileLock):
            entry[0].release()
        else:
            engine = entry[0].engine
            entry[0].close()  # closing the connection drops its advisory lock
            engine.dispose()

    def __exit__(self, *exc) -> None:
        self.release()


def credentials_from_env(url: str) -> str:
    """Fill a password from $SWEEP_DB_PASSWORD when the URL names a user without one (URL-quoted, any characters)."""
    password = os.environ.get("SWEEP_DB_PASSWORD")
    if not password or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    if "@" in rest.split("/", 1)[0] and ":" not in rest.split("@", 1)[0]:
        user, host = rest.split("@", 1)
        return f"{scheme}://{user}:{quote(password, safe='')}@{host}"
    return url


