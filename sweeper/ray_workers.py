"""`run --launcher ray`: the workers as Ray tasks, each running `sweep.py worker` on the node Ray chose for it.

Each task asks Ray for the worker's GPUs (sweep.gpus_per_trial; none with model.device: cpu), CPUs and memory,
so Ray places it and sets its CUDA_VISIBLE_DEVICES; a trial on several GPUs starts torchrun there, as with
`--workers`. The task runs the worker as its child process, as `run --workers` does: the same worker loop, with
its own signal handling and torch state, and the URLs' passwords handed over by environment. They reach the
task as an argument (kept by Ray, never on a command line); `Secret` keeps them out of Ray's errors.

Faults. The worker dies with its task's process (SIGTERM from the kernel, PR_SET_PDEATHSIG): it closes its trial
as interrupted and the study queues it again at once. A worker killed outright (SIGKILL, OOM-killer) or lost with
its node leaves its trial RUNNING until the study's heartbeat reaper fails and re-queues it (sweep.grace_period),
and Ray runs the task again (`max_retries`), which starts a fresh worker. Ctrl-C cancels the tasks: each sends
its worker SIGTERM (the trial is closed as interrupted), waits for it, and ends.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys

from critic.config import SpecError

MAX_RETRIES = 3  # Ray's default for tasks: a node lost three times over is more than a blip
CANCEL_WAIT_S = 120  # a worker closes its trial within seconds of SIGTERM; past this, Ray kills the task


class WorkerLost(RuntimeError):
    """The task's worker process was killed by a signal: Ray runs the task again (retry_exceptions)."""


class Secret:
    """The URLs' passwords (environment variables) as a task argument, shown as *** wherever Ray prints arguments."""

    def __init__(self, value: dict[str, str]) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "Secret(***)"


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the task's process dies (Linux prctl PR_SET_PDEATHSIG = 1)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def worker_task(command: list[str], secrets: Secret, index: int, threads: int, cwd: str) -> int:
    """One Ray task: `command` (`sweep.py worker ...`) on this node until the study is done; its exit code.

    Light on purpose: the task's process imports neither torch nor the sweeper's trial code; its worker does."""
    import ray
    env = dict(os.environ, SWEEP_OUTAGE_LINES="0", SWEEP_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               SWEEP_JOB=f"ray task {ray.get_runtime_context().get_task_id()}", **secrets.value)
    proc = subprocess.Popen(command, env=env,
                            cwd=cwd if os.path.isdir(cwd) else None, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        while True:  # short waits: ray.cancel interrupts the task (KeyboardInterrupt) between them
            try:
                code = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    if code < 0:
        raise WorkerLost(f"worker {index} (pid {proc.pid}) on {socket.gethostname()} was killed by "
                         f"{signal.Signals(-code).name}")
    return code


def launch_ray_workers(sweep, n_workers: int, progress: bool = True, plan=None, *, address: str | None, cpus: int,
                       gpus: int, memory_gb: float | None) -> None:
    """Run n workers on `sweep`'s study (the study's handle, sweeper/sweep.py) as Ray tasks on the cluster at
    `address` (None: a Ray instance on this machine, for the sweep only), print the study's progress, and cancel
    them on Ctrl-C."""
    import logging

    import ray

    from sweeper.study import SweepStopped
    from sweeper.workers import study_done, watch_until, worker_command
    study, spec = sweep.study, sweep.spec
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # the tasks exchange nothing large: a small object store
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                 object_store_memory=100 * 1024**2)
    try:
        have = ray.cluster_resources().get("GPU", 0)
        if gpus > have:
            raise SpecError(f"each worker needs {gpus} GPU(s) (sweep.gpus_per_trial) but the Ray cluster has {have:g}; "
                            "add GPU nodes, or set model.device: cpu to run on CPUs")
        task = ray.remote(worker_task).options(
            num_cpus=cpus, num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=[WorkerLost],
            **({"memory": int(memory_gb * 1024**3)} if memory_gb else {}))
        commands = [worker_command(study.study_name, sweep.storage_url, sweep.tracker.tracking_uri, i)
                    for i in range(n_workers)]
        refs = [task.remote(argv, Secret(secrets), i, cpus, os.getcwd()) for i, (argv, secrets) in enumerate(commands)]
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        print(f"[sweep] {n_workers} workers as Ray tasks on {where} ({cpus} CPU, {gpus} GPU each)", flush=True)
        n_trials = plan.n_trials if plan else spec.cfg.sweep.n_trials
        try:
            watch_until(study, n_trials, lambda: not ray.wait(refs, num_returns=len(refs), timeout=0)[1],
                        progress, plan)
        except KeyboardInterrupt:
            _cancel(refs)
            raise
        failures = [_failure(i, ref) for i, ref in enumerate(refs)]
        for line in filter(None, failures):
            print(f"[sweep] {line}", file=sys.stderr)
        if any(failures) and not study_done(study, n_trials, plan):
            raise SweepStopped("Ray tasks ended with the study unfinished; see their lines above and "
                               "`sweep.py status`")
    finally:
        ray.shutdown()


def _cancel(refs: list) -> None:
    """Ctrl-C: each task stops its worker, which closes its trial as interrupted; then the stragglers are killed."""
    import ray
    for ref in refs:
        ray.cancel(ref)
    print(f"[sweep] cancelled {len(refs)} Ray task(s): each worker closes its trial", file=sys.stderr, flush=True)
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
    for ref in pending:
        ray.cancel(ref, force=True)


def _failure(index: int, ref) -> str | None:
    """One line for a task that did not end with exit code 0, else None."""
    import ray
    try:
        code = ray.get(ref)
    except ray.exceptions.RayError as exc:  # retries used up: the last error, first line only
        cause = str(exc).strip().splitlines()
        return f"Ray task of worker {index} failed: {cause[-1] if cause else type(exc).__name__}"
    return f"worker {index} (Ray task) exited with code {code}" if code else None
