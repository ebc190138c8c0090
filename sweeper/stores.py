"""Where studies and runs live: Optuna storage URLs, the MLflow store, and password masking.

Embedded default: Optuna in `mlruns/optuna.db` and MLflow's SQLite store in
`mlruns/mlflow.db` with artifacts under `mlruns/artifacts`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import optuna

from critic.config import SpecError

DEFAULT_ROOT = Path("mlruns")
_PASSWORD_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")


def mask(text: str) -> str:
    """Replace any password in URLs inside `text` with ***."""
    return _PASSWORD_IN_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))


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
    engine_kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Several local workers share one file: wait for the write lock instead of failing with 'database is locked'.
        engine_kwargs["connect_args"] = {"timeout": 120}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                      grace_period=grace_period, heartbeat_stale_trial_callback=stale_trial_callback)


def credentials_from_env(url: str) -> str:
    """Fill a password from $SWEEP_DB_PASSWORD when the URL names a user without one."""
    password = os.environ.get("SWEEP_DB_PASSWORD")
    if not password or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    if "@" in rest.split("/", 1)[0] and ":" not in rest.split("@", 1)[0]:
        user, host = rest.split("@", 1)
        return f"{scheme}://{user}:{password}@{host}"
    return url
