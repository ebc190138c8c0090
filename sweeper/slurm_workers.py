"""`run --launcher slurm`: the workers as one Slurm job array, submitted with submitit.

Task i of the array runs `sweep.py worker --worker-index i` as a child of submitit's Python process, on the node
Slurm chose, with the GPUs Slurm gave it (CUDA_VISIBLE_DEVICES). The URLs' passwords reach the tasks by environment:
sbatch exports the submitting environment, where they are put ($SWEEP_DB_PASSWORD, $SWEEP_TRACKING_PASSWORD);
the pickled worker holds the URLs without them.

Signals. Slurm preempts, requeues (`scontrol requeue`) or cancels a task with SIGTERM, and submitit has Slurm
send SIGUSR2 90 s before the time limit (handled here as SIGTERM, not by submitit's checkpointing, which would
fail the trial): the worker ends its trial as interrupted and the study queues it again (sweeper/objective.py
`interrupted`). A requeued task runs the worker loop again when Slurm restarts it, and records the job it ran
in (`job` = `slurm ARRAY_TASK`, shown by `sweep.py status`).

The driver reads the tasks' states from `squeue` (sacct needs Slurm's accounting database, which a cluster may
lack): it prints each task's change of state, cancels the tasks still pending once the study is done (a
requeued task waits for its begin time), and cancels them all on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CANCEL_WAIT_S = 120  # scancel: SIGTERM, then Slurm's KillWait (30 s by default) before SIGKILL


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """What the array's tasks ask Slurm for (`run --slurm-* ...`, sweeper/cluster.py)."""

    partition: str | None
    minutes: int
    gpus_per_task: int
    cpus_per_task: int
    mem_gb: float | None
    account: str | None
    qos: str | None
    extra: dict[str, str]
    folder: str

    def parameters(self, study_name: str, n_workers: int) -> dict:
        """submitit's SlurmExecutor parameters: sbatch options by their names."""
        given = {"partition": self.partition, "account": self.account, "qos": self.qos,
                 "gpus_per_task": self.gpus_per_task or None, "mem": f"{self.mem_gb:g}G" if self.mem_gb else None}
        return {"job_name": f"sweep-{study_name}", "time": self.minutes, "cpus_per_task": self.cpus_per_task,
                "array_parallelism": n_workers, "stderr_to_stdout": False,
                **{k: v for k, v in given.items() if v is not None},
                **({"additional_parameters": dict(self.extra)} if self.extra else {})}


@dataclasses.dataclass(frozen=True)
class SlurmWorker:
    """The callable each task runs (pickled by submitit): `sweep.py worker`, whose exit code is the task's result."""

    commands: tuple[tuple[str, ...], ...]  # `sweep.py worker ...` of each task; passwords: by environment

    def __call__(self, index: int) -> int:
        threads = os.environ.get("SLURM_CPUS_PER_TASK", "1")
        env = dict(os.environ, SWEEP_TORCH_THREADS=threads, OMP_NUM_THREADS=threads)
        proc = subprocess.Popen(self.commands[index], env=env)

        def forward(signum, frame):  # Slurm signals the whole step too; the worker acts on the first signal only
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            signal.signal(sig, forward)
        return proc.wait()


def launch_slurm_workers(sweep, n_workers: int, progress: bool = True, plan=None, *, options: SlurmOptions) -> None:
    """Submit n workers on `sweep`'s study (the study's handle, sweeper/sweep.py) as a Slurm job array, print its
    script, follow its tasks and the study until both end."""
    import submitit

    from sweeper.study import SweepStopped
    from sweeper.workers import study_done, watch_until, worker_command
    study, spec = sweep.study, sweep.spec
    commands = [worker_command(study.study_name, sweep.storage_url, sweep.tracker.tracking_uri, i)
                for i in range(n_workers)]
    os.environ.update(commands[0][1])  # the URLs' passwords, the same for every task: sbatch exports them
    folder = Path(options.folder).resolve()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    executor.update_parameters(**options.parameters(study.study_name, n_workers))
    jobs = executor.map_array(SlurmWorker(tuple(tuple(argv) for argv, _ in commands)), range(n_workers))
    array_id = jobs[0].job_id.split("_")[0]
    script = next(folder.glob(f"{array_id}*_submission.sh"), None)
    print(f"[sweep] submitted Slurm job {array_id}: {n_workers} task(s), logs in {folder}; its sbatch script "
          f"({script}):\n{script.read_text() if script else '(not found)'}", flush=True)
    tasks = SlurmTasks(array_id)
    n_trials = plan.n_trials if plan else spec.cfg.sweep.n_trials
    try:
        watch_until(study, n_trials, lambda: tasks.settled(study_done(study, n_trials, plan)), progress, plan,
                    poll_s=5.0)
    except KeyboardInterrupt:
        tasks.cancel_all()
        raise
    if not study_done(study, n_trials, plan):
        raise SweepStopped(f"the tasks of Slurm job {array_id} ended with the study unfinished; their logs are "
                           f"in {folder}; `sweep.py status` shows the trials")


class SlurmTasks:
    """The array's tasks as squeue shows them (pending, running, completing); a task that ended is not listed."""

    def __init__(self, array_id: str) -> None:
        self.array_id = array_id
        self.states: dict[str, str] = {}

    def poll(self) -> dict[str, str] | None:
        """task id -> 'STATE (reason)'; None when squeue cannot answer right now (the controller is busy)."""
        try:
            out = subprocess.run(["squeue", "--noheader", "--array", "--jobs", self.array_id, "--format", "%i|%T|%r"],
                                 capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            if "Invalid job id" in out.stderr:  # every task ended and the controller forgot the job
                return {}
            return None
        states = {}
        for line in out.stdout.splitlines():
            task, state, reason = line.strip().split("|")
            states[task] = state if reason in ("None", "") else f"{state} ({reason})"
        return states

    def settled(self, study_is_done: bool) -> bool:
        """Print what changed; once the study is done, cancel the tasks still waiting. True when none is left."""
        states = self.poll()
        if states is None:
            return False
        for task in sorted(set(states) | set(self.states)):
            before, now = self.states.get(task), states.get(task, "ended")
            if before != now and (before or now != "ended"):
                print(f"[sweep] slurm task {task}: {now}", file=sys.stderr, flush=True)
        self.states = states
        if study_is_done:
            waiting = [task for task, state in states.items() if state.startswith("PENDING")]
            if waiting:
                subprocess.run(["scancel", *waiting], capture_output=True, timeout=60)
                for task in waiting:
                    print(f"[sweep] slurm task {task}: cancelled, the study is done", file=sys.stderr, flush=True)
                    states[task] = "ended"  # not printed again when squeue no longer lists it
        return not states

    def cancel_all(self) -> None:
        """Ctrl-C: scancel the array (each worker closes its trial as interrupted) and wait until it is gone."""
        subprocess.run(["scancel", self.array_id], capture_output=True, timeout=60)
        print(f"[sweep] cancelled Slurm job {self.array_id}: each task closes its trial", file=sys.stderr, flush=True)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline and self.poll() != {}:
            time.sleep(2)
