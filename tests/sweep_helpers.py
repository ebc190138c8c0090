"""Builders for the sweep tests: a tiny spec on tiny data, stores in tmp_path, the real CLI in a subprocess."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import demo_pairs

ROOT = Path(__file__).resolve().parents[1]


def tiny_sweep_spec(tmp_path: Path, sweep: dict[str, Any] | None = None, n_pairs: int = 120,
                    extra: dict[str, Any] | None = None) -> Path:
    """A spec whose trials take a few seconds: 120 demo pairs (a quarter each for val and the confirmation split),
    short sequences, 6 steps, eval every 2."""
    train = demo_pairs(tmp_path / "data" / "train.parquet", n_pairs)
    shifted = demo_pairs(tmp_path / "data" / "shifted.parquet", 40, name="shifted")
    spec = {
        "data": {"train_path": str(train), "eval_sets": {"shifted": str(shifted)}, "val_fraction": 0.25,
                 "confirm_fraction": 0.25,
                 "max_prompt_length": 48, "max_response_length": 40, "cache_dir": str(tmp_path / "cache")},
        "model": {"preset": "tiny", "device": "cpu", "torch_threads": 1},
        "loss": {"adaptive_temperature": True},
        "train": {"lr": 1.0e-3, "batch_size": 8, "micro_batch_size": 8, "max_steps": 6},
        "eval": {"every_steps": 2, "batch_size": 64},
        "sweep": {"study_name": "tiny", "n_trials": 3, "objective": "val/d_acc", "direction": "maximize",
                  "sampler": "tpe", "pruner": "none", "seed": 0, "confirm": {"top_k": 0},
                  "search_space": {
                      "train.lr": {"type": "float", "low": 1.0e-4, "high": 3.0e-3, "log": True},
                      "train.warmup_steps": {"type": "int", "low": 0, "high": 3},
                      "loss.adaptive_temperature": {"type": "categorical", "choices": [True, False]},
                      "loss.temperature": {"type": "float", "low": 0.5, "high": 4.0,
                                           "when": {"loss.adaptive_temperature": False}},
                      "loss.t_max": {"type": "float", "low": 1.5, "high": 3.0,
                                     "when": {"loss.adaptive_temperature": True}},
                      "train.epochs": {"type": "int", "low": 1, "high": 2}},
                  "baseline": {"train.lr": 3.0e-4, "train.warmup_steps": 2, "loss.adaptive_temperature": True,
                               "loss.t_max": 2.0, "train.epochs": 1}},
        "export": {"verl_keys": {"loss.t_max": "critic.temperature_max"}},
    }
    for dotted, value in (sweep or {}).items():
        spec["sweep"][dotted] = value
    for section, values in (extra or {}).items():
        spec.setdefault(section, {}).update(values)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def store_args(tmp_path: Path) -> list[str]:
    return ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri", mlflow_uri(tmp_path)]


def mlflow_uri(folder: Path, name: str = "mlflow.db") -> str:
    """The URI of the MLflow SQLite store `folder/name`, ready to use: a new one is a copy of an empty store that
    MLflow itself created once per test process. MLflow runs all its schema migrations on every new SQLite file
    (about a second, ~40 stores a suite); opening a migrated one takes a tenth of that. Creating a store is still
    tested where it is the point (the fresh-database race in test_scaleout, the demo, the decision benchmark)."""
    path = folder / name
    if not path.exists():
        shutil.copyfile(_migrated_store(), path)
    return f"sqlite:///{path}"


@functools.cache
def _migrated_store() -> Path:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
    atexit.register(shutil.rmtree, folder, True)
    SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")).engine.dispose()
    return folder / "mlflow.db"


# The libraries every command imports: a fork server imports them once, then forks one fresh process per `cli`
# call. Each command still runs in its own process (own exit code, signals, stdout and stderr) but skips the
# seconds of imports that ~90 end-to-end calls would otherwise repeat (multiprocessing's documented preload).
# The second line: what the commands import when they first need it (MLflow's SQL store, the figures, the
# report's plots and Optuna's parameter importances, which use scikit-learn's random forest), ~1.5 s a command.
PRELOAD = ["torch", "transformers", "mlflow", "optuna", "pandas", "sweeper.commands", "sweeper.runner",
           "sweeper.workers", "sweeper.report", "critic.trial", "diagnose.diagnosis",
           "mlflow.store.tracking.sqlalchemy_store", "matplotlib.figure", "matplotlib.backends.backend_agg",
           "optuna.visualization", "sklearn.ensemble", "sweeper.figures", "sweeper.confirm_stage"]


def cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None,
        fresh: bool = False, before=None) -> subprocess.CompletedProcess:
    """Run `sweep.py ARGS` the way a user does: in a new process, in `cwd`, output captured. `fresh`: a new
    interpreter that imports everything itself (for what depends on import order, e.g. library logging).
    `before`: a module-level function the new process calls first (e.g. to send itself a signal at a chosen
    point of a trial)."""
    if fresh:
        return subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=_cli_env(env))
    proc = CliProcess(*args, cwd=cwd, env=env, before=before)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cli_env(env: dict | None) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}


class CliProcess:
    """`sweep.py ARGS` started and left running, like `subprocess.Popen([python, sweep.py, ...])` (pid, poll,
    returncode, send_signal, kill, communicate), but forked from the fork server that preloaded the libraries: its
    own process, exit code, signals and output, without seconds of imports. A `run --workers N` started so still
    starts its workers as new interpreters (`sweep.py worker`), as it does for a user."""

    def __init__(self, *args: str, cwd: Path, env: dict | None = None, before=None) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        self.args = ["sweep.py", *args]
        self._folder = tempfile.TemporaryDirectory()
        self._out, self._err = Path(self._folder.name) / "stdout", Path(self._folder.name) / "stderr"
        self._proc = ctx.Process(target=_sweep_main, args=(list(args), str(cwd), _cli_env(env), str(self._out),
                                                            str(self._err), before))
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self._proc.kill()
        self._proc.join()

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout, self._read(self._out), self._read(self._err))
        return self._proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """(stdout, stderr) once it has ended; TimeoutExpired (it keeps running) after `timeout` seconds."""
        self.wait(timeout)
        return self._read(self._out), self._read(self._err)

    @staticmethod
    def _read(path: Path) -> str:
        return path.read_text() if path.exists() else ""


def _sweep_main(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str, before=None) -> None:
    """In the forked process: the user's working folder, environment and output files, then `sweep.py`'s main."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [str(ROOT / "sweep.py"), *argv]
    if before is not None:
        before()
    from sweeper.commands import main
    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def wait_for(condition, timeout: float, what: str, poll: float = 0.5, proc=None):
    """Poll `condition` until it returns something true (and return that); fail naming `what` after `timeout`,
    or at once, with its stderr, when `proc` (the command being watched) has ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
        except (KeyError, ValueError):  # the study does not exist yet
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended (exit {proc.returncode}) before {what}: "
                                 f"{proc.communicate()[1][-3000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def load_study(study_name: str, storage: str):
    """The study as another process of the sweep reads it: through sweeper.stores, which takes the storage's lock
    while it opens. `optuna.load_study(storage=URL)` on a new database would race the command creating its
    schema (both stamp Optuna's schema version; one fails with 'UNIQUE constraint failed: alembic_version').
    The storage is opened once per URL, so polling it stays cheap."""
    import optuna

    return optuna.load_study(study_name=study_name, storage=_storage(storage))


@functools.cache
def _storage(url: str):
    from sweeper.stores import make_storage

    return make_storage(url)


def trials_in_their_run(study_name: str, storage: str) -> list:
    """RUNNING trials whose MLflow run is open (its id recorded): the state the interrupt tests assert on.

    From then until the trial ends, a signal or a kill lands inside the trial. A plain RUNNING state is not
    enough: the run may not exist yet (sweeper/signals.py defers a signal until it does, so the trial still
    gets its run, but a test that reads the run id at that moment would not find it).
    """
    import optuna

    study = load_study(study_name, storage)
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if "mlflow_run_id" in t.user_attrs]


def sqlite_dump(path: Path) -> str:
    """Every row of every table of a SQLite file as text (to search it for secrets)."""
    con = sqlite3.connect(path)
    try:
        out = []
        for (table,) in con.execute("select name from sqlite_master where type='table'"):
            out.extend(repr(row) for row in con.execute(f'select * from "{table}"'))
        return "\n".join(out)
    finally:
        con.close()
