"""Faults of a long sweep, injected for real: the PostgreSQL server of the study is stopped (`pg_ctl stop -m fast`)
and started again while worker processes run trials. MLflow stays on a local SQLite store (its own outages are
another matter). Heartbeats are 1 s; the grace period is longer than the outage window, as the spec requires.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient

from critic.config import SpecError, build_config
from tests.sweep_helpers import ROOT, cli, tiny_sweep_spec, trials_in_their_run, wait_for
from tests.test_scaleout import finished, trial_runs, worker


def fault_spec(tmp_path, cache_dir, **sweep):
    return tiny_sweep_spec(tmp_path, sweep={"heartbeat_interval": 1, **sweep},
                           extra={"data": {"cache_dir": str(cache_dir)}})


def assert_nothing_left_running(study: optuna.Study, client: MlflowClient, n_trials: int) -> None:
    """n_trials finished, each with its value and metrics in Optuna and its FINISHED run in MLflow."""
    assert len(finished(study)) == n_trials
    assert not [t.number for t in study.trials if t.state.name == "RUNNING"]
    for trial in finished(study):
        if trial.state.name == "COMPLETE":
            assert trial.values and "val/d_acc" in json.loads(trial.user_attrs["metrics"])
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and "val/d_acc" in run.data.metrics
    parents, children = trial_runs(client, study.study_name)
    assert all(r.info.status != "RUNNING" for r in parents + children), [(r.data.tags.get("sweep.trial"),
                                                                          r.info.status) for r in children]


def test_sweep_waits_out_a_15_s_database_restart_mid_trial(postgres, tmp_path, tiny_cache_dir):
    """`run --workers 2`; PostgreSQL stops for 15 s while both workers are inside a trial. Every trial is kept,
    the console shows one line when the storage goes and one when it is back, and no traceback."""
    storage, tracking = postgres.url("restart"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = fault_spec(tmp_path, tiny_cache_dir, study_name="restart", n_trials=4, grace_period=40,
                      storage_outage_s=30)
    proc = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "run", str(spec), "--workers", "2",
                             "--storage", storage, "--tracking-uri", tracking, "--no-progress"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: trials_in_their_run("restart", storage)[1:], 240, "two running trials with their runs")
        postgres.halt()
        time.sleep(15)
        postgres.resume()
        back, back_at = time.monotonic(), time.strftime("%H:%M:%S")
        out, err = proc.communicate(timeout=300)
        ended = time.monotonic()
    finally:
        postgres.resume_if_halted()
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err, err[-5000:]
    gone = re.findall(r"\[sweep\] storage unreachable since \d\d:\d\d:\d\d, retrying for up to 30 s \(.+\)", err)
    returned = re.findall(r"\[sweep\] storage back after (\d+) s", err)
    assert len(gone) == 1 and len(returned) == 1, err[-3000:]
    assert 12 <= int(returned[0]) <= 30, returned
    study = optuna.load_study(study_name="restart", storage=storage)
    assert len(study.trials) == 4, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials]
    assert_nothing_left_running(study, MlflowClient(tracking), 4)
    print(f"\n[outage lines]\n{chr(10).join(line for line in err.splitlines() if 'storage' in line)}"
          f"\n[pg_ctl start returned at {back_at}; the sweep ended {ended - back:.1f} s later]")


def test_outage_beyond_the_window_stops_the_worker_and_a_rerun_finishes(postgres, tmp_path, tiny_cache_dir):
    """A 5 s window: the worker stops with one line (exit 3); its trial, RUNNING in the storage it could not
    write, is failed and re-queued by the rerun at once (not after the 60 s grace), which finishes the study."""
    storage, tracking = postgres.url("beyond"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = fault_spec(tmp_path, tiny_cache_dir, study_name="beyond", n_trials=2, grace_period=60, storage_outage_s=5)
    assert cli("init", str(spec), "--storage", storage, "--tracking-uri", tracking, cwd=tmp_path).returncode == 0
    first = worker("beyond", storage, tracking, 0, tmp_path)
    try:
        [held] = wait_for(lambda: trials_in_their_run("beyond", storage), 240, "a running trial with its run")
        postgres.halt()
        out, err = first.communicate(timeout=120)
    finally:
        postgres.resume_if_halted()
        if first.returncode is None:
            first.kill()
            first.communicate()
    assert first.returncode == 3, err[-3000:]
    assert "Traceback" not in out + err, err[-5000:]
    stop = "[sweep] storage unreachable for 5 s: stopping; rerun the same command to resume"
    assert err.count(stop) == 1 and err.strip().endswith(stop), err[-3000:]
    study = optuna.load_study(study_name="beyond", storage=storage)
    assert study.trials[held.number].state.name == "RUNNING"  # the storage was away: nothing could close it
    print(f"\n[worker stderr]\n{err.strip()}")

    started = time.monotonic()
    rerun = worker("beyond", storage, tracking, 0, tmp_path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and "Traceback" not in err, err[-3000:]
    study = optuna.load_study(study_name="beyond", storage=storage)
    dead = study.trials[held.number]
    [retry] = [t for t in study.trials if t.user_attrs.get("retry_of") == held.number]
    assert dead.state.name == "FAIL" and retry.user_attrs["retry_reason"] == "worker stopped: storage unreachable"
    client = MlflowClient(tracking)
    assert client.get_run(dead.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert_nothing_left_running(study, client, 2)
    print(f"\n[rerun took {time.monotonic() - started:.1f} s]")


@pytest.mark.parametrize("sweep, window", [({}, 180), ({"grace_period": 600}, 300), ({"grace_period": 180}, 60),
                                           ({"grace_period": 4, "heartbeat_interval": 1}, 2),
                                           ({"storage_outage_s": 30}, 30), ({"storage_outage_s": 0}, 0)])
def test_the_default_outage_window_leaves_two_heartbeats_of_the_grace_period(sweep, window):
    assert build_config({"sweep": sweep}, source="spec.yaml").sweep.outage_window_s == window


@pytest.mark.parametrize("value", ["soon", 1.5])
def test_a_window_that_is_not_whole_seconds_is_refused_at_load(value):
    with pytest.raises(SpecError, match=r"spec.yaml.*sweep\.storage_outage_s"):
        build_config({"sweep": {"storage_outage_s": value}}, source="spec.yaml")
