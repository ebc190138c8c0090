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
import re
from pathlib import Path
from urllib.parse import quote, urlsplit

import optuna
import sqlalchemy
from filelock import FileLock
from sqlalchemy.pool import NullPool

from critic.config import SpecError
from critic.redact import mask, without_password  # noqa: F401  (re-exported: the sweeper masks through stores)
from sweeper.outage import PatientStorage, is_connection_fault, known_outage, outage_for, patiently

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
                 stale_trial_callback=None, outage_s: int | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url`; RDB URLs get pre-ping, a lock timeout for SQLite and heartbeats; a database
    server's storage waits out an outage of up to `outage_s` seconds (sweep.storage_outage_s; sweeper/outage.py).

    A storage that cannot be opened (server down, no such database, wrong password, no driver) raises
    StorageError with one line that says what to do: opening does not wait.
    """
    try:
        return _open_storage(url, heartbeat_interval, grace_period, stale_trial_callback, outage_s)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:  # optuna re-raises a missing driver as ImportError
        raise StorageError(describe_failure(url, exc)) from exc


def _open_storage(url: str, heartbeat_interval: int | None, grace_period: int | None,
                  stale_trial_callback, outage_s: int | None) -> optuna.storages.BaseStorage:
    rdb_url = normalize_storage_url(url)
    if not rdb_url.startswith(("sqlite", "postgresql", "mysql")):
        return optuna.storages.get_storage(rdb_url)
    # heartbeat_interval and grace_period come from a spec, which checked them at load (critic/config.py)
    engine_kwargs: dict = {"pool_pre_ping": True}
    if rdb_url.startswith("sqlite"):
        # Several local workers share one file: wait for the write lock instead of failing with 'database is locked'.
        engine_kwargs["connect_args"] = {"timeout": 120}
    options = dict(engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                   heartbeat_stale_trial_callback=stale_trial_callback)
    with StorageLock(url):  # the first process creates the schema; the others wait instead of racing it
        if rdb_url.startswith("sqlite"):  # a file, no server to lose
            return optuna.storages.RDBStorage(rdb_url, **options)
        storage = PatientStorage(rdb_url, outage_for(url, outage_s), **options)
    return storage


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
        self.key, self.url, self.acquired, self.given = None, url, False, url  # given: the URL as typed, for errors
        try:
            parsed = sqlalchemy.engine.make_url(normalize_storage_url(url)) if url else None
        except sqlalchemy.exc.ArgumentError as exc:
            raise StorageError(describe_failure(url, exc)) from exc
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
            outage = known_outage(self.given)
            if outage is not None:  # a storage this process has used: wait out an outage like its other calls
                return patiently(outage, self._advisory_lock)
            return self._advisory_lock()
        if not Path(self.key).parent.is_dir():
            raise SpecError(f"the folder of the SQLite storage, {Path(self.key).parent}, does not exist; create it "
                            "or pass another --storage")
        lock = FileLock(self.key)
        lock.acquire()
        return lock

    def _advisory_lock(self):
        """A connection of its own holding the advisory lock (the server drops the lock with the connection)."""
        try:  # the first connection of a command: a bad URL or a server that is down shows here
            engine = sqlalchemy.create_engine(self.url, poolclass=NullPool, **_connect_args(self.url))
            connection = engine.connect()
        except ImportError as exc:
            raise StorageError(describe_failure(self.given, exc)) from exc
        except sqlalchemy.exc.SQLAlchemyError as exc:
            if known_outage(self.given) is not None and is_connection_fault(exc):
                raise  # patiently() tries again
            raise StorageError(describe_failure(self.given, exc)) from exc
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._ADVISORY_KEY})
        return connection

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
            try:
                entry[0].close()  # closing the connection drops its advisory lock
            except sqlalchemy.exc.SQLAlchemyError:  # the server went away and dropped the lock with it
                pass
            engine.dispose()

    def __exit__(self, *exc) -> None:
        self.release()


def credentials_from_env(url: str, variable: str = "SWEEP_DB_PASSWORD") -> str:
    """Fill a password from $SWEEP_DB_PASSWORD (or `variable`) when the URL names a user without one (URL-quoted,
    any characters). Launched workers get the tracking URI's password as $SWEEP_TRACKING_PASSWORD."""
    password = os.environ.get(variable)
    if not password or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    if "@" in rest.split("/", 1)[0] and ":" not in rest.split("@", 1)[0]:
        user, host = rest.split("@", 1)
        return f"{scheme}://{user}:{quote(password, safe='')}@{host}"
    return url


class StorageError(Exception):
    """A store (Optuna storage or MLflow tracking URI) that cannot be opened; the message names it and the fix."""


_DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "pymysql": "pymysql",
                    "MySQLdb": "mysqlclient", "mysql": "mysql-connector-python"}


def describe_failure(url: str, exc: BaseException, option: str = "--storage") -> str:
    """One line: which store (password masked), what went wrong, and what to do about it."""
    where = f"cannot open {option} {mask(url)}"
    parsed = _parse(url)
    host = f"{parsed.host or 'localhost'}:{parsed.port or 5432}" if parsed is not None else "the server"
    for cause in _chain(exc):
        if isinstance(cause, ModuleNotFoundError) and cause.name:
            module = cause.name.split(".")[0]
            package = _DRIVER_PACKAGES.get(module, module)
            return (f"{where}: its database driver {module!r} is not installed; `pip install {package}`"
                    + (" or use postgresql+psycopg:// (installed by `make install`)" if module == "psycopg2" else ""))
        if isinstance(cause, sqlalchemy.exc.NoSuchModuleError):
            return (f"{where}: SQLAlchemy knows no driver {str(cause).rsplit(':', 1)[-1]!r}; write postgresql://, "
                    "postgresql+psycopg:// or sqlite:///PATH")
        if isinstance(cause, sqlalchemy.exc.ArgumentError):
            return f"{where}: not a database URL; write e.g. postgresql://USER@HOST:5432/DB or sqlite:///PATH"
    text = _first_line(str(getattr(exc, "orig", None) or exc))  # psycopg's message; its 2nd line is a hint
    database, user = (parsed.database, parsed.username) if parsed is not None else ("DB", "USER")
    if "password authentication failed" in text or "no password supplied" in text:
        return (f"{where}: the server at {host} refused the password of user {user!r}; put the right one in "
                "$SWEEP_DB_PASSWORD (and leave it out of the URL)")
    if re.search(r'database ".*" does not exist', text):
        return (f"{where}: database {database!r} does not exist on {host}; create it: "
                f"`createdb -h {parsed.host or 'localhost'} -p {parsed.port or 5432} -U {user} {database}`")
    if re.search(r'role ".*" does not exist', text):
        return f"{where}: user {user!r} does not exist on {host}; create it: `createuser --createdb {user}`"
    if any(s in text for s in ("Connection refused", "could not connect", "failed to resolve host",
                               "timeout expired", "Name or service not known", "No route to host")):
        return (f"{where}: no database server answers at {host}; start it (e.g. `pg_ctl start`, "
                f"`systemctl start postgresql`) or fix the host and port ({text})")
    if "unable to open database file" in text:
        return (f"{where}: SQLite cannot open {parsed.database if parsed is not None else url}; create its "
                "folder or make it writable")
    return f"{where}: {mask(text)}"


def check_tracking_uri(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, in one line, on an MLflow store that cannot be reached (MLflow itself retries for minutes)."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:  # it answered: reachable (auth or a proxy in front is MLflow's business)
            return
        except OSError as exc:
            raise StorageError(f"cannot open --tracking-uri {mask(uri)}: no MLflow server answers there "
                               f"({getattr(exc, 'reason', exc)}); start it (`mlflow server ...`) or fix the "
                               "URI") from exc
        return
    parsed = _parse(uri)
    if parsed is None or "://" not in uri or uri.startswith("file:"):
        return  # a folder store or a scheme MLflow resolves itself
    try:
        engine = sqlalchemy.create_engine(_with_driver(uri), poolclass=NullPool, **_connect_args(parsed))
        try:
            engine.connect().close()
        finally:
            engine.dispose()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        raise StorageError(describe_failure(uri, exc, "--tracking-uri")) from exc


def _parse(url: str):
    try:
        return sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return None


def _with_driver(url: str) -> str:
    try:
        return normalize_storage_url(url)
    except SpecError as exc:
        raise ModuleNotFoundError(str(exc), name="psycopg") from None


def _connect_args(parsed) -> dict:
    """A server that drops packets would otherwise hang the connect for minutes."""
    return {"connect_args": {"connect_timeout": 10}} if parsed.get_backend_name() == "postgresql" else {}


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"
