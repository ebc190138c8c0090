"""Many workers on one study, with real servers: PostgreSQL, an MLflow tracking server, SQLite files, signals.

Nothing is mocked: workers are `sweep.py` processes, a dead worker is a SIGKILL,
an out-of-memory error is a real torch.OutOfMemoryError (tests.helpers.simulate_device).
Heartbeats are 1 s with a 4 s grace period so dead trials are reaped quickly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

import sweep
from benchmarks.servers import PASSWORD, MlflowServer, dump_postgres
from critic.config import SpecError
from sweeper import study as study_mod
from sweeper.board import leaderboard
from sweeper.stores import credentials_from_env, mask, without_password
from sweeper.sweep import Sweep
from tests.helpers import simulate_device
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

FAST_HEARTBEAT = {"heartbeat_interval": 1, "grace_period": 4}
# The PostgreSQL cases ask for the module's servers inside the test: grouped with the module's other server tests
# on one pytest-xdist worker (tests/conftest.py), so they start once.
KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.xdist_group(__name__))]



@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` with a PostgreSQL backend store, the way a team would run it."""
    server = MlflowServer(postgres.url("mlflow"), tmp_path_factory.mktemp("mlflow-server") / "artifacts")
    yield server.wait_ready()
    server.stop()


def scaleout_spec(tmp_path: Path, cache_dir: Path, **sweep) -> Path:
    """The tiny spec with fast heartbeats; the session's tokenizer cache spares every worker from training one."""
    return tiny_sweep_spec(tmp_path, sweep={**FAST_HEARTBEAT, **sweep}, extra={"data": {"cache_dir": str(cache_dir)}})


def stores(kind: str, tmp_path: Path, request, name: str) -> tuple[str, str]:
    """(Optuna storage URL, MLflow tracking URI) for a fresh database of `kind`."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path)
    return request.getfixturevalue("postgres").url(name), request.getfixturevalue("mlflow_server").uri


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]


def worker(study_name: str, storage: str, tracking: str, index: int, tmp_path: Path) -> CliProcess:
    """`sweep.py worker` the way a second machine starts it; a password travels in $SWEEP_DB_PASSWORD."""
    storage_arg, password = without_password(storage)
    env = {**os.environ, **({"SWEEP_DB_PASSWORD": password} if password else {})}
    return CliProcess("worker", "--study", study_name, "--storage", storage_arg, "--tracking-uri", tracking,
                      "--worker-index", str(index), "--no-progress", cwd=tmp_path, env=env)


def trial_runs(client: MlflowClient, experiment_name: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment_name).experiment_id])
    return ([r for r in runs if r.data.tags.get("sweep.role") == "parent"],
            [r for r in runs if r.data.tags.get("sweep.role") == "trial"])


@pytest.fixture(scope="module")
def three_worker_sweep(postgres, mlflow_server, tmp_path_factory, tiny_cache_dir):
    """`run --workers 3` on a PostgreSQL study (password URL) with the MLflow server; n_trials=6."""
    tmp_path = tmp_path_factory.mktemp("three-workers")
    storage = postgres.url("three")
    spec = scaleout_spec(tmp_path, tiny_cache_dir, study_name="three", n_trials=6)
    proc = CliProcess("run", str(spec), "--workers", "3", "--storage", storage, "--tracking-uri", mlflow_server.uri,
                      "--no-progress", cwd=tmp_path)
    argv_leaks = set()
    while proc.poll() is None:  # other users can read argv: the workers must get the password another way
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "sweep.py" in argv and "--study three" in argv and PASSWORD in argv:  # this sweep's workers
                argv_leaks.add(argv)
        time.sleep(1)
    out, err = proc.communicate()
    return {"returncode": proc.returncode, "stdout": out, "stderr": err, "storage": storage,
            "tracking": mlflow_server.uri, "argv_leaks": argv_leaks, "tmp_path": tmp_path}


def test_three_workers_on_postgres_finish_exactly_n_trials(three_worker_sweep):
    result = three_worker_sweep
    assert result["returncode"] == 0, result["stderr"][-3000:]
    study = optuna.load_study(study_name="three", storage=result["storage"])
    numbers = [t.number for t in study.trials]
    assert len(finished(study)) == 6 and len(set(numbers)) == len(numbers)
    # workers finishing together never start a 7th trial
    assert len(study.trials) == 6, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials]
    client = MlflowClient(result["tracking"])
    parents, children = trial_runs(client, "three")
    assert len(parents) == 1 and len(children) == 6
    assert sorted(int(r.data.tags["sweep.trial"]) for r in children) == sorted(t.number for t in finished(study))
    assert all(r.info.status == "FINISHED" for r in parents + children)
    assert "figures/training_progress.png" in {a.path for a in client.list_artifacts(children[0].info.run_id,
                                                                                      "figures")}


def test_no_password_in_output_argv_stores_or_attrs(three_worker_sweep, postgres, capsys):
    result = three_worker_sweep
    assert result["returncode"] == 0, result["stderr"][-3000:]
    assert PASSWORD not in result["stdout"] + result["stderr"]
    assert "sweeper:***@" in result["stdout"]  # the storage is shown, masked
    assert not result["argv_leaks"]
    assert PASSWORD not in dump_postgres(result["storage"])  # Optuna: user attrs, system attrs, everything
    assert PASSWORD not in dump_postgres(postgres.address("mlflow"))  # the MLflow server's store
    study = optuna.load_study(study_name="three", storage=result["storage"])
    assert PASSWORD not in json.dumps([study.user_attrs] + [t.user_attrs for t in study.trials])
    assert sweep.main(["status", "--storage", result["storage"]]) == 0
    assert PASSWORD not in "".join(capsys.readouterr())


def test_local_parent_fails_and_requeues_a_dead_workers_trial_at_once(tmp_path, tiny_cache_dir):
    """`run --workers 2` with a 600 s heartbeat grace: the parent sees its child die and re-queues the
    child's trial at once, with the signal as the reason; the sweep ends with every trial finished."""
    spec = tiny_sweep_spec(tmp_path, sweep={"study_name": "dead", "n_trials": 3, "grace_period": 600},
                           extra={"data": {"cache_dir": str(tiny_cache_dir)}})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "run", str(spec), "--workers", "2",  # as a user
                             "--storage", storage, "--tracking-uri", mlflow_uri(tmp_path),
                             "--no-progress"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        [victim, *_] = wait_for(lambda: trials_in_their_run("dead", storage), 240,
                                "a running trial with its run", proc=proc)
        host, pid = victim.user_attrs["worker"].rsplit(":", 1)
        # The parent only orchestrates: it never loads torch (its workers do), so it starts in a fraction of the time.
        assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" in Path(f"/proc/{pid}/maps").read_text()
        os.kill(int(pid), signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - started < 300  # far less than the 600 s grace the heartbeat reaper waits
    study = optuna.load_study(study_name="dead", storage=storage)
    assert len(finished(study)) == 3
    dead = study.trials[victim.number]
    [rerun] = [t for t in study.trials if t.user_attrs.get("retry_of") == dead.number]
    assert dead.state.name == "FAIL" and rerun.state.name == "COMPLETE" and rerun.params == dead.params
    line = rf"\[sweep\] worker [01] \(pid {pid}\) died \(killed by SIGKILL\): trial {dead.number} failed and re-queued"
    assert re.search(line, err) and "Traceback" not in err, err[-3000:]  # one line, no traceback
    assert host == socket.gethostname()
    board = leaderboard(study).set_index("number")
    assert board.loc[dead.number, "reason"].endswith(f"died (killed by SIGKILL); re-run as trial {rerun.number}")
    client = MlflowClient(mlflow_uri(tmp_path))
    assert client.get_run(dead.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    parents, children = trial_runs(client, "dead")
    assert all(r.info.status != "RUNNING" for r in parents + children)


def test_two_workers_save_the_critic_of_the_best_trial_under_its_number(tmp_path, tiny_cache_dir):
    """`run --workers 2` with sweep.save_best_checkpoint: each worker saves its own trial's critic when that trial is
    the study's best. At the end the parent run's `best_checkpoint` is the critic of the trial its tag names, and
    that trial is the study's best: the saved weights give, pair by pair, the held-out scores that trial logged."""
    from critic.checkpoint import load_checkpoint
    from critic.data import load_trial_data
    from critic.evaluate import metrics_from_scores, score_set
    from critic.model import tokenizer_digest
    from tests.helpers import tiny_tolerance

    spec = scaleout_spec(tmp_path, tiny_cache_dir, study_name="best", n_trials=4, save_best_checkpoint=True)
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path)
    run = cli("run", str(spec), "--workers", "2", "--storage", storage, "--tracking-uri", tracking, "--no-progress",
              cwd=tmp_path)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
    study = optuna.load_study(study_name="best", storage=storage)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both workers ran trials
    client = MlflowClient(tracking)
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent).data.tags["best.checkpoint_trial"] == str(study.best_trial.number)

    model, tokenizer, cfg, _ = load_checkpoint(client.download_artifacts(parent, "best_checkpoint", str(tmp_path)))
    val = load_trial_data(cfg.data, tokenizer, tokenizer_digest(tokenizer)).eval_sets["val"]
    scores = score_set(model, val, cfg.score, cfg.eval.batch_size, model.device, tokenizer.pad_token_id)
    logged = pd.read_parquet(client.download_artifacts(study.best_trial.user_attrs["mlflow_run_id"],
                                                       "scores/heldout_pair_scores.parquet", str(tmp_path)))
    logged = logged[logged["set"] == "val"].reset_index(drop=True)
    row = cfg.data.max_prompt_length + 2 * cfg.data.max_response_length  # the same sums, maybe in other batches
    for side in ("teacher_score", "student_score"):
        assert np.abs(scores[side] - logged[side]).max() <= tiny_tolerance(logged[side], row), side
    assert metrics_from_scores(scores)["d_acc"] == study.best_trial.value  # the objective, val/d_acc


@pytest.mark.parametrize("kind", KINDS)
def test_killed_worker_trial_is_failed_requeued_and_rerun(kind, tmp_path, request, tiny_cache_dir):
    storage, tracking = stores(kind, tmp_path, request, "kill")
    spec = scaleout_spec(tmp_path, tiny_cache_dir, study_name=f"kill-{kind}", n_trials=3)
    assert sweep.main(["init", str(spec), "--storage", storage, "--tracking-uri", tracking]) == 0
    workers = [worker(f"kill-{kind}", storage, tracking, i, tmp_path) for i in range(2)]
    try:
        study = optuna.load_study(study_name=f"kill-{kind}", storage=storage)
        # Both workers inside a trial (MLflow run open): kill the first without any chance to clean up.
        wait_for(lambda: trials_in_their_run(f"kill-{kind}", storage)[1:], 240, "two running trials with their runs")
        workers[0].send_signal(signal.SIGKILL)
        _, err = workers[1].communicate(timeout=300)
        assert workers[1].returncode == 0, err[-3000:]
    finally:
        for proc in workers:
            if proc.returncode is None:
                proc.kill()
                proc.communicate()

    study = optuna.load_study(study_name=f"kill-{kind}", storage=storage)
    assert len(finished(study)) == 3
    [dead] = [t for t in study.trials if t.state.name == "FAIL"]
    [rerun] = [t for t in study.trials if t.user_attrs.get("retry_of") == dead.number]
    assert rerun.state.name == "COMPLETE" and rerun.params == dead.params
    board = leaderboard(study).set_index("number")
    assert board.loc[dead.number, "reason"] == f"worker died (no heartbeat); re-run as trial {rerun.number}"
    client = MlflowClient(tracking)
    dead_run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "FAILED" and "worker died" in dead_run.data.tags["sweep.fail_reason"]
    for trial in finished(study):  # nothing a finished trial recorded is missing
        assert set(json.loads(trial.user_attrs["metrics"])) >= {"val/d_acc", "shifted/d_acc"}
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and "val/d_acc" in run.data.metrics
    parents, children = trial_runs(client, f"kill-{kind}")
    assert len(children) == 4 and all(r.info.status != "RUNNING" for r in parents + children)


@pytest.mark.parametrize("kind", KINDS)
def test_workers_started_at_once_on_a_fresh_database(kind, tmp_path, request, tiny_cache_dir):
    """Every task of a job array runs the same `run` command: one creates the study, the others join it."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else request.getfixturevalue(
        "postgres").url("fresh")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}" if kind == "sqlite" else request.getfixturevalue(
        "postgres").url("fresh_mlflow")  # a fresh MLflow store too: its schema is created by the first process
    spec = scaleout_spec(tmp_path, tiny_cache_dir, study_name="fresh", n_trials=2)
    # Forked from one preloaded server, the four start within milliseconds of each other: the race at its tightest.
    procs = [CliProcess("run", str(spec), "--storage", storage, "--tracking-uri", tracking, "--no-progress",
                        cwd=tmp_path) for _ in range(4)]
    outputs = [proc.communicate(timeout=400) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)] == ["fresh"]
    study = optuna.load_study(study_name="fresh", storage=storage)
    assert len(finished(study)) == 2 and sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1
    client = MlflowClient(tracking)
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["fresh"]
    parents, children = trial_runs(client, "fresh")
    assert len(parents) == 1 and len(children) == 2


def test_worker_on_a_fresh_database_says_to_init_first(tmp_path):
    with pytest.raises(SpecError, match="not found.*run `sweep.py init SPEC"):
        Sweep.attach(f"sqlite:///{tmp_path / 'optuna.db'}", "nothing-here", mlflow_uri(tmp_path, 'm.db'))


def test_sigint_stops_all_workers_cleanly_and_rerun_completes(tmp_path, tiny_cache_dir):
    spec = scaleout_spec(tmp_path, tiny_cache_dir, study_name="sigint", n_trials=3)
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path)
    command = ["run", str(spec), "--workers", "2", "--storage", storage, "--tracking-uri", tracking, "--no-progress"]
    proc = CliProcess(*command, cwd=tmp_path)
    try:
        wait_for(lambda: one_done_one_running(load_study("sigint", storage).trials),
                 240, "a finished trial and a running one with its run", proc=proc)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the process
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    assert "Rerun the same command to resume" in err
    study = optuna.load_study(study_name="sigint", storage=storage)
    interrupted = [t for t in study.trials if t.state.name == "FAIL"]
    assert interrupted and all(t.user_attrs["fail_reason"] == "interrupted" for t in interrupted), (
        [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials], err[-3000:])
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    client = MlflowClient(tracking)
    parents, children = trial_runs(client, "sigint")
    # Every claimed trial has its run, KILLED, wherever the signal landed (before the claim's run existed, the
    # signal waits for it: sweeper/signals.py defer_signals; test_signal_between_claim_and_run_... below).
    statuses = {t.number: client.get_run(t.user_attrs["mlflow_run_id"]).info.status for t in interrupted}
    assert set(statuses.values()) == {"KILLED"}, (statuses, [(t.number, t.state.name, t.user_attrs)
                                                             for t in study.trials])
    assert all(r.info.status != "RUNNING" for r in parents + children)

    rerun = cli(*command, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = optuna.load_study(study_name="sigint", storage=storage)
    assert len(finished(study)) == 3
    parents, children = trial_runs(client, "sigint")
    assert len(parents) == 1 and all(r.info.status != "RUNNING" for r in parents + children)


def test_signal_between_claim_and_run_still_gives_the_trial_its_killed_run(tmp_path, tiny_cache_dir, monkeypatch):
    """Ctrl-C after Optuna claimed a trial but before its MLflow run exists: the signal waits until the run is
    recorded, so the trial is FAIL 'interrupted' with a KILLED run and no run is left RUNNING."""
    from sweeper import objective as objective_mod

    spec = study_mod.load_sweep_spec(str(scaleout_spec(tmp_path, tiny_cache_dir, study_name="claim", n_trials=2)))
    sweep = Sweep.init(spec, f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path))
    study, tracker = sweep.study, sweep.tracker
    real_suggest = objective_mod.suggest

    def signal_then_suggest(*args, **kwargs):  # the trial is claimed (RUNNING); its run is not open yet
        os.kill(os.getpid(), signal.SIGINT)
        return real_suggest(*args, **kwargs)

    monkeypatch.setattr(objective_mod, "suggest", signal_then_suggest)
    with sigint_handled(), pytest.raises(KeyboardInterrupt):
        sweep.run_trials(2, progress=False)
    trial, queued = study.trials  # the interrupted trial, and its params queued again for the rerun
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == "interrupted"
    assert queued.state.name == "WAITING" and queued.user_attrs["retry_of"] == trial.number
    assert tracker.client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    runs = tracker.client.search_runs([e.experiment_id for e in tracker.client.search_experiments()])
    assert [r.info.status for r in runs if r.data.tags.get("sweep.trial") == "0"] == ["KILLED"]


def test_signal_while_a_finished_trial_closes_its_run_keeps_the_trial_complete(tmp_path, tiny_cache_dir):
    """Ctrl-C after a trial's result is in, while its run is being closed: the trial stays COMPLETE with a FINISHED
    run, and the loop stops before the next trial (before, the trial became FAIL with no reason, its run RUNNING)."""
    spec = study_mod.load_sweep_spec(str(scaleout_spec(tmp_path, tiny_cache_dir, study_name="close", n_trials=2)))
    sweep = Sweep.init(spec, f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path))
    study, tracker, parent_id = sweep.study, sweep.tracker, sweep.parent_id
    real_end = tracker.end

    def signal_then_end(run_id, status):
        if run_id != parent_id:
            os.kill(os.getpid(), signal.SIGINT)
        return real_end(run_id, status)

    tracker.end = signal_then_end
    with sigint_handled(), pytest.raises(KeyboardInterrupt):
        sweep.run_trials(2, progress=False)
    [trial] = study.trials
    assert trial.state.name == "COMPLETE" and "fail_reason" not in trial.user_attrs
    assert tracker.client.get_run(trial.user_attrs["mlflow_run_id"]).info.status == "FINISHED"


@contextlib.contextmanager
def sigint_handled():
    """SIGINT handled as `sweep.py run` and every worker do (sweeper/signals.py), restored afterwards."""
    from sweeper import signals
    previous = signal.getsignal(signal.SIGINT)
    signals.stop_on_signals(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signals.STOP_REQUESTED.clear()


def one_done_one_running(trials) -> bool:
    """A trial finished, and another inside its objective (its MLflow run open) that started after it: one that
    started with it (the other worker's first trial) may be finishing too, and the signal would find it done."""
    done = [t.datetime_complete for t in trials if t.state.is_finished()]
    return bool(done) and any(t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs
                              and t.datetime_start > min(done) for t in trials)


def test_out_of_memory_retries_with_half_micro_batch_then_fails_with_reason(tmp_path, monkeypatch,
                                                                           tiny_cache_dir):
    # A simulated device that fits 3 pairs: micro-batch 4 -> OOM -> retried with forwards of 2 (fits);
    # micro-batch 8 -> OOM -> forwards of 4 -> OOM again -> FAIL; the sweep goes on to the next trial.
    space = {"train.micro_batch_size": {"type": "categorical", "choices": [2, 4, 8]}}
    spec = study_mod.load_sweep_spec(str(scaleout_spec(tmp_path, tiny_cache_dir, study_name="oom", n_trials=2,
                                                       search_space=space, baseline={})))
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path)
    sweep = Sweep.init(spec, storage, tracking)
    study, tracker = sweep.study, sweep.tracker
    for micro_batch in (4, 8, 2):
        study.enqueue_trial({"train.micro_batch_size": micro_batch})
    simulate_device(monkeypatch, 3)
    sweep.run_trials(2, progress=False)

    retried, failed, plain = study.trials
    assert retried.state.name == "COMPLETE" and retried.user_attrs["oom_retry"] is True
    retried_run = tracker.client.get_run(retried.user_attrs["mlflow_run_id"])
    assert retried_run.data.tags["sweep.oom_retry"] == "forward_micro_batch_size 4 -> 2 (loss micro_batch_size 4 kept)"
    assert failed.state.name == "FAIL"
    assert "out of memory (after retry with forwards of 4 pairs)" in failed.user_attrs["fail_reason"]
    assert "simulated: a micro-batch of 4 pairs does not fit a device of 3 pairs" in failed.user_attrs["fail_reason"]
    assert tracker.client.get_run(failed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert plain.state.name == "COMPLETE" and "oom_retry" not in plain.user_attrs


def test_password_from_environment_is_quoted_and_kept_out_of_argv(monkeypatch):
    monkeypatch.setenv("SWEEP_DB_PASSWORD", "p@ss/w:rd")
    url = credentials_from_env("postgresql://alice@db:5432/optuna")
    assert url == "postgresql://alice:p%40ss%2Fw%3Ard@db:5432/optuna"
    assert mask(url) == "postgresql://alice:***@db:5432/optuna"
    assert without_password(url) == ("postgresql://alice@db:5432/optuna", "p@ss/w:rd")
    assert credentials_from_env("postgresql://alice:given@db/optuna") == "postgresql://alice:given@db/optuna"


def test_grace_period_shorter_than_two_heartbeats_is_refused_at_load():
    from critic.config import build_config
    with pytest.raises(SpecError, match=r"spec.yaml: sweep\.grace_period \(3\) must be at least twice"):
        build_config({"sweep": {"heartbeat_interval": 2, "grace_period": 3}}, source="spec.yaml")
