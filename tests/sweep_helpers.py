"""Builders for the sweep tests: a tiny spec on tiny data, stores in tmp_path, the real CLI in a subprocess."""

from __future__ import annotations

import multiprocessing
import os
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
    return ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


# The libraries every command imports: a fork server imports them once, then forks one fresh process per `cli`
# call. Each command still runs in its own process (own exit code, signals, stdout and stderr) but skips the
# seconds of imports that ~40 end-to-end calls would otherwise repeat (multiprocessing's documented preload).
PRELOAD = ["torch", "transformers", "mlflow", "optuna", "pandas", "sweeper.commands", "sweeper.runner",
           "sweeper.workers", "sweeper.report", "critic.trial", "diagnose.diagnosis"]


def cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None,
        fresh: bool = False, before=None) -> subprocess.CompletedProcess:
    """Run `sweep.py ARGS` the way a user does: in a new process, in `cwd`, output captured. `fresh`: a new
    interpreter that imports everything itself (for what depends on import order, e.g. library logging).
    `before`: a module-level function the new process calls first (e.g. to send itself a signal at a chosen
    point of a trial)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    if fresh:
        return subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=full_env)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = ctx.Process(target=_sweep_main, args=(list(args), str(cwd), full_env, str(out), str(err), before))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["sweep.py", *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(["sweep.py", *args], proc.exitcode, out.read_text(), err.read_text())


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


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    """Poll `condition` until it returns something true (and return that); fail naming `what` after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
        except (KeyError, ValueError):  # the study does not exist yet
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def trials_in_their_run(study_name: str, storage: str) -> list:
    """RUNNING trials whose MLflow run is open (its id recorded): the state the interrupt tests assert on.

    From then until the trial ends, a signal or a kill lands inside the trial. A plain RUNNING state is not
    enough: the run may not exist yet (sweeper/signals.py defers a signal until it does, so the trial still
    gets its run, but a test that reads the run id at that moment would not find it).
    """
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
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
