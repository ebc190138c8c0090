"""Real servers for the scale-out tests and benchmarks: a throwaway PostgreSQL cluster and an MLflow tracking server.

PostgreSQL runs from the distribution's binaries (initdb, pg_ctl) in a temporary
folder, listening on 127.0.0.1 at a free port with password (scram) auth, so
URLs like postgresql://sweeper:PASSWORD@127.0.0.1:PORT/db are real. As root the
server runs as the `postgres` user (initdb refuses root).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

USER, PASSWORD = "sweeper", "pg-s3cr3t-7Qx"  # the password the secret-leak test searches for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl, or None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """initdb + pg_ctl start in a temp folder; `url(db)` gives a password URL for a fresh database."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir, self.port = bin_dir, free_port()
        self.root = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
        self.data, self.sockets = self.root / "data", self.root / "sockets"
        self.sockets.mkdir()
        self.as_root = os.geteuid() == 0
        self.halted = False
        if self.as_root:  # the postgres user must own the cluster
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed:\n{out.stdout}\n{out.stderr}")

    def start(self) -> "PostgresServer":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8")
        self.resume()
        self.admin(f"CREATE ROLE {USER} LOGIN CREATEDB PASSWORD '{PASSWORD}'")
        return self

    def halt(self) -> None:
        """`pg_ctl stop -m fast`, as an administrator restarting the server does: sessions are cut, data kept."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.halted = True

    def resume(self) -> None:
        """`pg_ctl start` on the existing cluster (after `halt`, or the first time from `start`)."""
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "start")
        self.halted = False

    def resume_if_halted(self) -> None:
        """For a test's `finally`: the server runs again whatever happened."""
        if self.halted:
            self.resume()

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def admin(self, sql: str) -> None:
        """Run one statement as the superuser over the unix socket (trust auth)."""
        import psycopg

        with psycopg.connect(host=str(self.sockets), port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as con:
            con.execute(sql)

    def url(self, database: str) -> str:
        """A fresh, empty database owned by the test user, as a password URL."""
        self.admin(f'CREATE DATABASE "{database}" OWNER {USER}')
        return self.address(database)

    def address(self, database: str) -> str:
        """The password URL of an existing database."""
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"


def dump_postgres(url: str) -> str:
    """Every row of every table of a database as text (to search it for secrets)."""
    import psycopg

    out = []
    with psycopg.connect(url) as con:
        tables = con.execute("select table_name from information_schema.tables where table_schema = 'public'")
        for (table,) in tables.fetchall():
            out.extend(repr(row) for row in con.execute(f'select * from "{table}"'))
    return "\n".join(out)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 at a free port, backed by `backend_uri`, artifacts in `artifacts`."""

    def __init__(self, backend_uri: str, artifacts: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = artifacts.parent / "mlflow-server.log"
        artifacts.mkdir(parents=True, exist_ok=True)
        self.command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                        "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(self.port),
                        "--workers", "1"]
        self.start()

    def start(self) -> None:
        """Start the server process (again after `stop`: the same port, backend store and artifacts)."""
        # Without the job-queue consumers for MLflow's GenAI jobs, which a sweep never submits (as `sweep.py ui`).
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> "MlflowServer":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGKILL the server and its workers (a crash; also how a throwaway server ends)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
