"""A trial that did not finish runs again: what it leaves for its rerun, and which process and job ran it.

A search trial interrupted (Ctrl-C, a scheduler's SIGTERM), or whose worker died (sweeper/workers.py), or whose
records could not be written, is queued again with its params and the attrs that say what it is (the baseline, a
candidate, a confirmation run), so the rerun runs it first. Each trial records its worker (host:pid) and its
cluster job, so a parent that sees a worker die knows its trial, and `status` names the job.
"""

from __future__ import annotations

import os
import socket

import optuna

from sweeper.candidates import ATTRS as CANDIDATE_ATTRS
from sweeper.confirm import STAGE_ATTRS

# user attrs a re-queued trial inherits (interrupted here, or its worker died: sweeper/workers.py); the rest belong
# to the attempt that did not finish
KEEP_ON_RETRY = ("baseline", *CANDIDATE_ATTRS, *STAGE_ATTRS)


def interrupted(trial: optuna.Trial) -> None:
    """An interrupted trial (Ctrl-C, or SIGTERM from a scheduler preempting the job) records why; a search trial is
    queued again with its params, so the rerun runs it first: the baseline and the candidates are never lost, nor a
    sampled config. Confirmation runs need nothing: their plan re-enqueues every (config, seed) without a result."""
    trial.set_user_attr("fail_reason", "interrupted")
    requeue(trial, "interrupted")


def requeue(trial: optuna.Trial, reason: str) -> None:
    """Queue a search trial that is failing for a reason outside its config again, with its params (see
    `interrupted`); `status` explains it with `reason`."""
    if trial.user_attrs.get("stage", "search") != "search":
        return
    kept = {k: v for k, v in trial.user_attrs.items() if k in KEEP_ON_RETRY}
    trial.study.enqueue_trial(trial.params, user_attrs={**kept, "retry_of": trial.number, "retry_reason": reason})


def worker_id(pid: int | None = None) -> str:
    """host:pid of a worker process (this one by default), recorded on each trial it runs (sweeper/workers.py)."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def scheduler_job() -> str | None:
    """The cluster job that runs this worker, the way its scheduler names it: `slurm 1234_5` (array 1234, task 5:
    what squeue and `scontrol requeue` take), `slurm 1234`, or what the Ray launcher put in $SWEEP_JOB."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm {env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm {env['SLURM_JOB_ID']}"
    return env.get("SWEEP_JOB")
