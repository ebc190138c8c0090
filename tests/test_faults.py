"""Faults of a long sweep, injected for real while `sweep.py` processes run trials: the PostgreSQL server of the
study stopped (`pg_ctl stop -m fast`) and started again; a real `mlflow server` SIGKILLed and started again on the
same port and backend store. Heartbeats are 1 s; the grace period is longer than the outage window, as the spec
requires.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from benchmarks.servers import MlflowServer
from critic.config import SpecError, build_config
from tests.sweep_helpers import (
    ROOT,
    CliProcess,
    cli,
    load_study,
    mlflow_uri,
    tiny_sweep_spec,
    trials_in_their_run,
    wait_for,
)
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
    storage, tracking = postgres.url("restart"), mlflow_uri(tmp_path)
    spec = fault_spec(tmp_path, tiny_cache_dir, study_name="restart", n_trials=4, grace_period=40,
                      storage_outage_s=30)
    proc = CliProcess("run", str(spec), "--workers", "2", "--storage", storage, "--tracking-uri", tracking,
                      "--no-progress", cwd=tmp_path)
    try:
        wait_for(lambda: trials_in_their_run("restart", storage)[1:], 240,
                 "two running trials with their runs", proc=proc)
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
    storage, tracking = postgres.url("beyond"), mlflow_uri(tmp_path)
    spec = fault_spec(tmp_path, tiny_cache_dir, study_name="beyond", n_trials=2, grace_period=60, storage_outage_s=5)
    assert cli("init", str(spec), "--storage", storage, "--tracking-uri", tracking, cwd=tmp_path).returncode == 0
    first = worker("beyond", storage, tracking, 0, tmp_path)
    try:
        [held] = wait_for(lambda: trials_in_their_run("beyond", storage), 240,
                          "a running trial with its run", proc=first)
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


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend store, artifacts through the server), for the tests to kill."""
    folder = tmp_path_factory.mktemp("tracking-server")
    server = MlflowServer(f"sqlite:///{folder / 'tracking.db'}", folder / "artifacts").wait_ready()
    yield server
    server.stop()


def run_on(server: MlflowServer, spec, storage: str, tmp_path) -> CliProcess:
    return CliProcess("run", str(spec), "--storage", storage, "--tracking-uri", server.uri, "--no-progress",
                      cwd=tmp_path)


def test_sweep_waits_out_a_tracking_server_restart_mid_trial(tracking_server, tmp_path, tiny_cache_dir):
    """`sweep.py run` on a real `mlflow server` (artifacts through it), SIGKILLed while a trial is in its run and
    started again 5 s later: every trial keeps its value, metrics and artifacts, every run ends as its trial did,
    and the console shows one line when the server goes and one when it is back, no traceback."""
    server, storage = tracking_server, f"sqlite:///{tmp_path / 'optuna.db'}"
    # MLflow's retries (factor 1) sleep 0, 2, 4, ... 64 s: 7 of them reach past a 120 s window, 126 s; the server
    # takes seconds to tens of seconds to start, on a loaded machine
    spec = fault_spec(tmp_path, tiny_cache_dir, study_name="tracker", n_trials=2, storage_outage_s=120)
    proc = run_on(server, spec, storage, tmp_path)
    try:
        wait_for(lambda: trials_in_their_run("tracker", storage), 240, "a running trial with its run", proc=proc)
        server.stop()
        time.sleep(5)
        server.start()
        server.wait_ready()
        back, back_at = time.monotonic(), time.strftime("%H:%M:%S")
        out, err = proc.communicate(timeout=300)
        ended = time.monotonic()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err and "Retrying" not in err, err[-5000:]
    gone = re.findall(r"\[sweep\] tracking server unreachable since \d\d:\d\d:\d\d, retrying for up to 126 s "
                      r"\(.+\)", err)
    returned = re.findall(r"\[sweep\] tracking server back after (\d+) s", err)
    assert len(gone) == 1 and len(returned) == 1, err[-3000:]
    study = optuna.load_study(study_name="tracker", storage=storage)
    assert len(study.trials) == 2, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials]
    client = MlflowClient(server.uri)
    assert_nothing_left_running(study, client, 2)
    for trial in study.trials:  # the artifacts logged after the restart are there too
        files = {f.path for f in client.list_artifacts(trial.user_attrs["mlflow_run_id"])}
        assert {"config.yaml", "history.json", "figures", "scores"} <= files, files
    print(f"\n[outage lines]\n{chr(10).join(line for line in err.splitlines() if '[sweep] tracking' in line)}"
          f"\n[mlflow server answered again at {back_at}; the sweep ended {ended - back:.1f} s later]")


def test_tracking_server_away_beyond_the_window_stops_the_sweep_and_a_rerun_finishes(tracking_server, tmp_path,
                                                                                     tiny_cache_dir):
    """A 5 s window (3 retries, 6 s): the sweep stops with one line (exit 3), no traceback; its trial, whose run could
    not be closed, is failed and re-queued by the rerun at once, its run closed FAILED; the rerun finishes."""
    server, storage = tracking_server, f"sqlite:///{tmp_path / 'optuna.db'}"
    spec = fault_spec(tmp_path, tiny_cache_dir, study_name="gone", n_trials=2, storage_outage_s=5)
    first = run_on(server, spec, storage, tmp_path)
    try:
        [held] = wait_for(lambda: trials_in_their_run("gone", storage), 240, "a running trial with its run", proc=first)
        server.stop()
        out, err = first.communicate(timeout=120)
    finally:
        if first.returncode is None:
            first.kill()
            first.communicate()
        server.start()
    assert first.returncode == 3, err[-3000:]
    assert "Traceback" not in out + err and "Retrying" not in err, err[-5000:]
    gone = re.findall(r"\[sweep\] tracking server unreachable since \d\d:\d\d:\d\d, retrying for up to 6 s", err)
    stop = re.findall(r"\[sweep\] tracking server unreachable for \d+ s: stopping; rerun the same command to resume",
                      err)
    assert len(gone) == 1 and len(stop) == 1 and err.strip().endswith(stop[0]), err[-3000:]
    study = optuna.load_study(study_name="gone", storage=storage)
    assert study.trials[held.number].state.name == "RUNNING"  # its run could not be closed: the rerun does both
    print(f"\n[console]\n{chr(10).join(line for line in err.splitlines() if '[sweep] tracking' in line)}")

    server.wait_ready()
    started = time.monotonic()
    rerun = run_on(server, spec, storage, tmp_path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and "Traceback" not in err, err[-3000:]
    study = optuna.load_study(study_name="gone", storage=storage)
    dead = study.trials[held.number]
    [retry] = [t for t in study.trials if t.user_attrs.get("retry_of") == held.number]
    assert dead.state.name == "FAIL"
    assert retry.user_attrs["retry_reason"] == "worker stopped: tracking server unreachable"
    client = MlflowClient(server.uri)
    assert client.get_run(dead.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert_nothing_left_running(study, client, 2)
    print(f"[rerun took {time.monotonic() - started:.1f} s]")


def on_small_disk(artifacts: Path, size: str) -> list[str]:
    """The command prefix that runs a sweep with its artifact store on a tmpfs of `size` in its own mount namespace:
    a real full disk, root or not (chmod stops no write of root's). The shell keeps a copy of what the store held
    when the sweep ends, in `<artifacts>.kept`, as the namespace goes with it."""
    artifacts.mkdir()
    script = f'mount -t tmpfs -o size={size} sweep-artifacts "$0" && "$@"; code=$?; cp -a "$0/." "$0.kept"; exit $code'
    isolate = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(artifacts)]
    if subprocess.run([*isolate, "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace here (unshare --user --mount) to give the artifact store a small disk")
    return isolate


def test_a_full_artifact_disk_fails_the_trial_with_its_reason_and_the_sweep_goes_on(tmp_path, tiny_cache_dir):
    """The artifact store fills up mid-sweep: the trial whose artifacts cannot be written fails with that reason and
    a FAILED run, its params are queued again, and once space is freed the sweep ends with n_trials finished, each
    with all its artifacts; no traceback."""
    artifacts = tmp_path / "artifacts"  # beside the SQLite MLflow store: sweeper/stores.py artifact_root
    isolate = on_small_disk(artifacts, "64m")
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path)
    spec = fault_spec(tmp_path, tiny_cache_dir, study_name="full", n_trials=3)
    proc = subprocess.Popen([*isolate, sys.executable, str(ROOT / "sweep.py"), "run", str(spec), "--storage", storage,
                             "--tracking-uri", tracking, "--no-progress"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    states = lambda name: [t for t in load_study("full", storage).trials  # noqa: E731
                           if t.state.name == name]
    try:
        wait_for(lambda: states("COMPLETE"), 240, "a first complete trial", proc=proc)
        filler = Path(f"/proc/{proc.pid}/root{artifacts}/filler")  # the store as the sweep sees it
        with open(filler, "wb") as out, contextlib.suppress(OSError):
            while True:
                out.write(bytes(1 << 16))
        full_at = time.monotonic()
        [failed] = wait_for(lambda: states("FAIL"), 240, "a trial failed by the full disk", proc=proc)
        filler.unlink()
        freed_at = time.monotonic()
        out, err = proc.communicate(timeout=300)
        ended = time.monotonic()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err, err[-5000:]
    assert re.match(r"artifacts not written: \[Errno 28\] No space left on device", failed.user_attrs["fail_reason"])
    study = optuna.load_study(study_name="full", storage=storage)
    [retry] = [t for t in study.trials if t.user_attrs.get("retry_of") == failed.number]
    assert retry.params == failed.params and retry.user_attrs["retry_reason"] == "artifacts not written"
    client = MlflowClient(tracking)
    dead = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and dead.data.tags["sweep.fail_reason"] == failed.user_attrs["fail_reason"]
    assert_nothing_left_running(study, client, 3)
    kept = Path(f"{artifacts}.kept")
    for trial in finished(study):  # every finished trial's artifacts are whole, on the disk
        folder = kept / "full" / trial.user_attrs["mlflow_run_id"] / "artifacts"
        assert json.loads((folder / "history.json").read_text())["eval"], trial.number
        assert (folder / "scores" / "heldout_pair_scores.parquet").stat().st_size > 0
    [line] = [line for line in err.splitlines() if "No space left" in line]
    assert line.startswith(f"[sweep] trial {failed.number}: artifacts not written ([Errno 28] No space left on "
                           f"device"), line
    print(f"\n[console]\n{line}\n[the disk was full for {freed_at - full_at:.1f} s; the sweep ended "
          f"{ended - freed_at:.1f} s after it was freed]")


def test_a_best_checkpoint_that_does_not_fit_is_one_line_and_never_trusted(tmp_path, tiny_cache_dir):
    """sweep.save_best_checkpoint on a 1 MiB artifact disk: the trial's artifacts fit, its whole critic does not.
    The trial stays COMPLETE, the save is one line, and the half-written `best_checkpoint` folder is named after no
    trial, so `diagnose`/`export --weights` (diagnose/checkpoints.py) never take it for the trial's."""
    from diagnose.checkpoints import trial_candidates

    artifacts = tmp_path / "artifacts"
    isolate = on_small_disk(artifacts, "1m")
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path)
    spec = fault_spec(tmp_path, tiny_cache_dir, study_name="nofit", n_trials=1, save_best_checkpoint=True)
    run = subprocess.run([*isolate, sys.executable, str(ROOT / "sweep.py"), "run", str(spec), "--storage", storage,
                          "--tracking-uri", tracking, "--no-progress"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Traceback" not in run.stdout + run.stderr, run.stderr[-3000:]
    [line] = [line for line in run.stderr.splitlines() if "best checkpoint" in line]
    assert line.startswith("[sweep] best checkpoint (trial 0) not saved: [Errno 28] No space left on device"), line
    study = optuna.load_study(study_name="nofit", storage=storage)
    client = MlflowClient(tracking)
    assert_nothing_left_running(study, client, 1)
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent).data.tags["best.checkpoint_trial"].startswith("none: trial 0's not saved")
    assert (parent, "best_checkpoint") not in trial_candidates(study, 0, client)
    saved = Path(f"{artifacts}.kept") / "nofit" / parent / "artifacts" / "best_checkpoint"
    assert any(saved.iterdir())  # part of a checkpoint (MLflow copies a folder file by file), and nobody trusts it
    print(f"\n[console]\n{line}")


@pytest.mark.parametrize("sweep, window", [({}, 180), ({"grace_period": 600}, 300), ({"grace_period": 180}, 60),
                                           ({"grace_period": 4, "heartbeat_interval": 1}, 2),
                                           ({"storage_outage_s": 30}, 30), ({"storage_outage_s": 0}, 0)])
def test_the_default_outage_window_leaves_two_heartbeats_of_the_grace_period(sweep, window):
    assert build_config({"sweep": sweep}, source="spec.yaml").sweep.outage_window_s == window


@pytest.mark.parametrize("value", ["soon", 1.5])
def test_a_window_that_is_not_whole_seconds_is_refused_at_load(value):
    with pytest.raises(SpecError, match=r"spec.yaml.*sweep\.storage_outage_s"):
        build_config({"sweep": {"storage_outage_s": value}}, source="spec.yaml")


@pytest.mark.parametrize("window, retries", [(0, 0), (5, 3), (60, 6), (120, 7), (300, 9), (3600, 10)])
def test_mlflow_retries_reach_past_the_outage_window(monkeypatch, window, retries):
    """MLflow's retries for a window: the fewest that urllib3's own backoff schedule carries past it (at most
    MLflow's limit of 10); the seconds they reach are what the outage line announces."""
    import urllib3

    from sweeper.tracking_outage import mlflow_retries
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(name, "")  # restored (unset) after the test
        monkeypatch.delenv(name)
    reach = mlflow_retries(window)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == str(retries)
    retry, slept = urllib3.util.Retry(total=retries, backoff_factor=1), []  # as MLflow builds it, jitter aside
    for _ in range(retries):
        retry = retry.increment(method="POST", error=urllib3.exceptions.ConnectTimeoutError())
        slept.append(retry.get_backoff_time())
    assert reach == sum(slept) and (reach >= window or retries == 10)
    assert retries == 0 or sum(slept[:-1]) < window  # one fewer would not do


def test_your_own_mlflow_retry_settings_are_kept(monkeypatch):
    from sweeper.tracking_outage import mlflow_retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "3")
    assert mlflow_retries(300) == 6  # one retry at once, the next 3 x 2 s later
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
