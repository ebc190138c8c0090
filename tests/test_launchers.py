"""`run --launcher ray|slurm` on real engines started here: a local Ray instance, and a one-node Slurm
(slurmctld + slurmd on localhost from a slurm.conf written into a temp dir). Nothing is mocked: a lost worker is
a SIGKILL of its Ray worker process, a preemption is `scontrol requeue`. Where an engine cannot start on this
machine (extra not installed, no Slurm daemons, not root), its tests skip and say why.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from benchmarks.servers import PASSWORD
from sweeper.cluster import slurm_minutes
from tests.sweep_helpers import ROOT, cli, mlflow_uri, trials_in_their_run, wait_for
from tests.test_scaleout import finished, scaleout_spec, trial_runs

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}


def start_run(spec: Path, cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "run", str(spec), *args],  # lines, no bars
                            cwd=cwd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # the launcher cancels its tasks on Ctrl-C
            proc.communicate(timeout=180)


def assert_settled(study: optuna.Study, tracking: str, n_trials: int) -> None:
    """n_trials finished, nothing RUNNING in Optuna or MLflow."""
    assert len(finished(study)) == n_trials
    assert not [t.number for t in study.trials if t.state.name == "RUNNING"]
    parents, children = trial_runs(MlflowClient(tracking), study.study_name)
    assert len(parents) == 1 and all(r.info.status != "RUNNING" for r in parents + children)


@pytest.mark.parametrize(("text", "minutes"), [("90", 90), ("1:30", 2), ("12:00:00", 720), ("1-00:00:00", 1440),
                                               ("2-3", 3060), ("0:30:01", 31)])
def test_slurm_time_in_minutes(text, minutes):
    assert slurm_minutes(text) == minutes


@pytest.mark.parametrize("launcher", [["--launcher", "slurm"], ["--launcher", "ray", "--ray-address", "10.0.0.1:6379"]])
def test_launchers_for_other_machines_refuse_sqlite_files_before_any_trial(launcher, tmp_path):
    spec = scaleout_spec(tmp_path, tmp_path / "cache", study_name="files", n_trials=2)
    result = cli("run", str(spec), *launcher, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.search(r"runs workers on other machines, which cannot share the local file --storage sqlite:///.*"
                     r"pass --storage postgresql://USER@HOST:5432/DB", line), line
    assert not (tmp_path / "optuna.db").exists()  # refused before the study was created


def test_an_option_of_another_launcher_is_refused_in_one_line(tmp_path):
    spec = scaleout_spec(tmp_path, tmp_path / "cache", study_name="options", n_trials=2)
    result = cli("run", str(spec), "--workers", "2", "--slurm-partition", "gpu", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --slurm-partition is for --launcher slurm; add --launcher slurm, or leave it out")


# ---------------------------------------------------------------- Ray

def test_ray_workers_finish_the_study_and_a_killed_ray_worker_has_its_trial_requeued(tmp_path, tiny_cache_dir):
    """`run --launcher ray --workers 2` on a local Ray instance (SQLite: every worker is on this machine). The Ray
    worker process of one task is SIGKILLed inside a trial: its `sweep.py worker` gets SIGTERM (PR_SET_PDEATHSIG),
    closes the trial as interrupted (re-queued), Ray retries the task, and the study ends with 4 finished trials."""
    pytest.importorskip("ray", reason="the Ray extra is not installed (`pip install -e '.[ray]'`)")
    spec = scaleout_spec(tmp_path, tiny_cache_dir, study_name="ray", n_trials=4)
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path)
    started = time.monotonic()
    proc = start_run(spec, tmp_path, "--launcher", "ray", "--workers", "2", "--storage", storage, "--tracking-uri",
                     tracking)
    try:
        [victim, *_] = wait_for(lambda: trials_in_their_run("ray", storage), 300,
                                "a running trial with its run", proc=proc)
        worker_pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
        ray_worker_pid = int(Path(f"/proc/{worker_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its ppid
        assert "ray" in Path(f"/proc/{ray_worker_pid}/cmdline").read_text().lower()
        os.kill(ray_worker_pid, signal.SIGKILL)
    finally:
        out, err = finish(proc, 600)
    print(f"[test] ray sweep took {time.monotonic() - started:.0f} s\n{out}\n{err}")
    assert proc.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="ray", storage=storage)
    assert_settled(study, tracking, 4)
    dead = study.trials[victim.number]
    [rerun] = [t for t in study.trials if t.user_attrs.get("retry_of") == dead.number]
    assert dead.state.name == "FAIL" and dead.user_attrs["fail_reason"] == "interrupted"
    assert rerun.state.name == "COMPLETE" and rerun.params == dead.params
    assert all(t.user_attrs["job"].startswith("ray task ") for t in study.trials if "mlflow_run_id" in t.user_attrs)
    assert f"[trial {dead.number}] FAIL" in out  # the driver's line per finished trial, the dead one included
    assert len(re.findall(r"^\[trial \d+\] COMPLETE", out, re.M)) == 4
    assert "[sweep] 2 workers as Ray tasks on a local Ray instance (1 CPU, 0 GPU each)" in out


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head` with 2 CPUs on 127.0.0.1, in a temp dir of its own; stopped with its process group."""
    pytest.importorskip("ray", reason="the Ray extra is not installed (`pip install -e '.[ray]'`)")
    from benchmarks.servers import free_port
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's Unix socket paths live under it
    address = f"127.0.0.1:{free_port()}"
    ray = str(Path(sys.executable).parent / "ray")
    env = {**ENV, "RAY_AUTH_MODE": "disabled"}  # `ray start` turns on token auth by default (docs/scaleout.md)
    head = subprocess.Popen([ray, "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
                             "--port", address.split(":")[1], "--temp-dir", str(root), "--include-dashboard", "false",
                             "--disable-usage-stats"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: subprocess.run([ray, "status", "--address", address], env=env,
                                        capture_output=True).returncode == 0, 120, "the Ray head to answer",
                 poll=2)  # `ray status` is a second of CPU
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` and every Ray process it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # what did not stop on SIGTERM
        head.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def test_ray_workers_on_an_existing_cluster_finish_the_study_on_server_stores(ray_cluster, postgres, tmp_path,
                                                                             tiny_cache_dir):
    """`run --launcher ray --ray-address ADDR --workers 2` on a cluster started apart (`ray start --head`), with a
    PostgreSQL study whose password is in the URL: 4 trials, one line each, no password anywhere on the console."""
    spec = scaleout_spec(tmp_path, tiny_cache_dir, study_name="ray_cluster", n_trials=4)
    storage, tracking = postgres.url("ray_cluster"), postgres.url("ray_cluster_mlflow")
    started = time.monotonic()
    proc = start_run(spec, tmp_path, "--launcher", "ray", "--ray-address", ray_cluster, "--workers", "2", "--storage",
                     storage, "--tracking-uri", tracking, env={**ENV, "RAY_AUTH_MODE": "disabled"})
    out, err = finish(proc, 600)
    print(f"[test] ray cluster sweep took {time.monotonic() - started:.0f} s\n{out}\n{err}")
    assert proc.returncode == 0, err[-3000:]
    assert_settled(optuna.load_study(study_name="ray_cluster", storage=storage), tracking, 4)
    assert len(re.findall(r"^\[trial \d+\] COMPLETE", out, re.M)) == 4
    assert f"[sweep] 2 workers as Ray tasks on the Ray cluster at {ray_cluster} (1 CPU, 0 GPU each)" in out
    assert PASSWORD not in out + err


# ---------------------------------------------------------------- Slurm

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """slurmctld + slurmd on localhost (no cgroups, no munge: auth/none), as this process's children."""
    daemons = [shutil.which(name) for name in ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol")]
    if not all(daemons):
        pytest.skip("Slurm is not installed (Debian's slurm-wlm: slurmctld, slurmd); `.ci/run` installs it")
    if os.geteuid() != 0:
        pytest.skip("a test Slurm runs its daemons as root (SlurmdUser), and this user is not root")
    pytest.importorskip("submitit", reason="the Slurm extra is not installed (`pip install -e '.[slurm]'`)")
    from benchmarks.servers import free_port
    root = tmp_path_factory.mktemp("slurm")
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout.splitlines()[0]  # this machine
    host = node.split()[0].split("=", 1)[1]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=sweeptest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}", "AuthType=auth/none", "CredType=cred/none", "SlurmUser=root",
        "SlurmdUser=root", f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        # no cgroups: processes tracked by parentage, no task binding; no accounting database (so no sacct)
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "MpiDefault=none", "ReturnToService=2", "KillWait=30",
        f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = [subprocess.Popen([daemon, "-D", "-f", str(conf), *extra], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT) for daemon, extra in (("slurmctld", ["-i"]), ("slurmd", []))]
    try:
        wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                                  text=True).stdout, 60, "the Slurm node to be idle")
    except AssertionError:
        for proc in procs:
            proc.terminate()
        logs = "".join((root / f"{d}.log").read_text()[-600:] for d in ("slurmctld", "slurmd")
                       if (root / f"{d}.log").exists())
        pytest.skip(f"a one-node Slurm did not start here: {logs}")
    yield env
    subprocess.run(["scancel", "--full", "--partition", "test"], env=env, capture_output=True)
    for proc in reversed(procs):
        proc.terminate()
        proc.wait(timeout=60)


def test_slurm_array_finishes_the_study_and_a_requeued_task_has_its_trial_requeued(slurm, postgres, tmp_path,
                                                                                   tiny_cache_dir):
    """`run --launcher slurm --workers 2`: a 2-task array on PostgreSQL stores. `scontrol requeue` of the task
    inside a trial (what a preemption does): its worker closes the trial as interrupted, the study queues it
    again, the other task runs it, and `run` cancels the requeued task, which waits for its begin time."""
    spec = scaleout_spec(tmp_path, tiny_cache_dir, study_name="slurm", n_trials=4)
    storage, tracking = postgres.url("slurm"), postgres.url("slurm_mlflow")
    started = time.monotonic()
    proc = start_run(spec, tmp_path, "--launcher", "slurm", "--workers", "2", "--slurm-partition", "test",
                     "--slurm-time", "30", "--slurm-folder", str(tmp_path / "slurm"), "--storage", storage,
                     "--tracking-uri", tracking, env={**ENV, **slurm})
    try:
        [victim, *_] = wait_for(lambda: trials_in_their_run("slurm", storage), 300,
                                "a running trial with its run", proc=proc)
        job = victim.user_attrs["job"]
        assert re.fullmatch(r"slurm \d+_[01]", job), job
        subprocess.run(["scontrol", "requeue", job.split()[1]], env=slurm, check=True)
    finally:
        out, err = finish(proc, 600)
    print(f"[test] slurm sweep took {time.monotonic() - started:.0f} s\n{out}\n{err}")
    assert proc.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="slurm", storage=storage)
    assert_settled(study, tracking, 4)
    dead = study.trials[victim.number]
    [rerun] = [t for t in study.trials if t.user_attrs.get("retry_of") == dead.number]
    assert dead.state.name == "FAIL" and dead.user_attrs["fail_reason"] == "interrupted"
    assert rerun.state.name == "COMPLETE" and rerun.params == dead.params
    assert "#SBATCH --array=0-1%2" in out and "#SBATCH --partition=test" in out  # the script, printed to keep
    task = job.split()[1]
    assert f"[sweep] slurm task {task}: PENDING" in err  # requeued: it waits for its begin time
    status = cli("status", "--storage", storage, "--study", "slurm", cwd=tmp_path)
    assert status.returncode == 0 and "job" in status.stdout and job in status.stdout
    assert PASSWORD not in out + err
    for kept in (tmp_path / "slurm").iterdir():  # the script, the pickled workers, the task logs
        assert PASSWORD.encode() not in kept.read_bytes(), kept
    queued = subprocess.run(["squeue", "-h", "-j", task.split("_")[0]], env=slurm, capture_output=True, text=True)
    assert queued.stdout.strip() == ""  # nothing of the array left in the queue
