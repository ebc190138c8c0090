"""Who starts the workers of `run`: processes on this machine, Ray tasks, or a Slurm job array (docs/scaleout.md).

Every launcher runs the same worker loop (`sweep.py worker`, sweeper/commands/worker.py `run_worker`) against the
study's storage; the cluster's own scheduler places the workers, hands out their GPUs and restarts what it preempted.
Everything a launcher needs is checked here, before the study is opened: a worker on another machine cannot reach
a SQLite file, so those launchers need server URLs; the optional extras (Ray, submitit) must be installed.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import shutil

from critic.config import SpecError

LAUNCHERS = ("local", "ray", "slurm")
EXTRAS = {"ray": ("ray", "requirements-ray.txt"), "slurm": ("submitit", "requirements-slurm.txt")}


def add_launcher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="where the --workers run: processes on this machine (default), Ray tasks, a Slurm job array")
    p.add_argument("--cpus-per-worker", type=int, help="Ray num_cpus / Slurm --cpus-per-task of each worker "
                   "(default 1; also its torch threads)")
    p.add_argument("--mem-per-worker", type=float, metavar="GB", help="Ray memory / Slurm --mem of each worker")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: $RAY_ADDRESS, else a local Ray "
                   "instance on this machine, started for the sweep)")
    p.add_argument("--slurm-partition", help="sbatch --partition")
    p.add_argument("--slurm-time", default="24:00:00", help="sbatch --time of each task: MINUTES, HH:MM:SS or "
                   "D-HH:MM:SS (default 24:00:00)")
    p.add_argument("--slurm-gpus-per-task", type=int, help="sbatch --gpus-per-task (default sweep.gpus_per_trial; "
                   "0 with model.device: cpu)")
    p.add_argument("--slurm-account", help="sbatch --account")
    p.add_argument("--slurm-qos", help="sbatch --qos")
    p.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. constraint=a100 (repeatable)")
    p.add_argument("--slurm-folder", default="mlruns/slurm", help="submission script, pickles and task logs; "
                   "on a file system the nodes share (default mlruns/slurm)")


def make_launcher(args: argparse.Namespace, spec, storage_url: str, tracking_uri: str):
    """The function that runs `args.workers` workers on a sweep (the signature of workers.launch_workers), or
    None to run the trials in this process. Raises SpecError, in one line, for anything the launcher lacks."""
    if args.workers < 1:
        raise SpecError(f"--workers must be at least 1, got {args.workers}")
    slurm_only = [f"--{name.replace('_', '-')}" for name in ("slurm_partition", "slurm_gpus_per_task", "slurm_account",
                                                            "slurm_qos", "slurm_option") if getattr(args, name)]
    if slurm_only and args.launcher != "slurm":
        raise SpecError(f"{', '.join(slurm_only)} {'is' if len(slurm_only) == 1 else 'are'} for --launcher slurm; "
                        f"add --launcher slurm, or leave {'it' if len(slurm_only) == 1 else 'them'} out")
    if args.ray_address and args.launcher != "ray":
        raise SpecError("--ray-address is for --launcher ray; add --launcher ray, or leave it out")
    if args.launcher == "local":
        from sweeper.workers import launch_workers
        return launch_workers if args.workers > 1 else None
    cpus = args.cpus_per_worker or 1
    gpus = 0 if spec.cfg.model.device == "cpu" else spec.cfg.sweep.gpus_per_trial
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if args.launcher == "slurm" or address:  # not a Ray instance we start here: workers may run on any node
        require_shared_stores(storage_url, tracking_uri, f"--launcher {args.launcher}"
                              + (f" --ray-address {address}" if args.launcher == "ray" else ""))
    module, requirements = EXTRAS[args.launcher]
    if importlib.util.find_spec(module) is None:
        raise SpecError(f"--launcher {args.launcher} needs {module}, an optional extra: "
                        f"`pip install -e '.[{args.launcher}]'` (pins in {requirements})")
    if args.launcher == "ray":
        from sweeper.ray_workers import launch_ray_workers
        return functools.partial(launch_ray_workers, address=address, cpus=cpus, gpus=gpus,
                                 memory_gb=args.mem_per_worker)
    if shutil.which("sbatch") is None:
        raise SpecError("--launcher slurm needs Slurm's `sbatch` on PATH; run `sweep.py run` on a login node")
    from sweeper.slurm_workers import SlurmOptions, launch_slurm_workers
    options = SlurmOptions(partition=args.slurm_partition, minutes=slurm_minutes(args.slurm_time),
                           gpus_per_task=gpus if args.slurm_gpus_per_task is None else args.slurm_gpus_per_task,
                           cpus_per_task=cpus, mem_gb=args.mem_per_worker, account=args.slurm_account,
                           qos=args.slurm_qos, extra=_key_values(args.slurm_option), folder=args.slurm_folder)
    return functools.partial(launch_slurm_workers, options=options)


def require_shared_stores(storage_url: str, tracking_uri: str, launcher: str) -> None:
    """Workers on other machines write the study and the runs: a file on this machine will not do."""
    for option, url, fix in (("--storage", storage_url, "postgresql://USER@HOST:5432/DB"),
                             ("--tracking-uri", tracking_uri, "http://MLFLOW_HOST:5000 (an MLflow server)")):
        if url.startswith("sqlite:") or url.startswith("file:") or "://" not in url:
            raise SpecError(f"{launcher} runs workers on other machines, which cannot share the local file "
                            f"{option} {url.split('?')[0]}; pass {option} {fix} (docs/scaleout.md)")


def slurm_minutes(text: str) -> int:
    """Slurm's --time formats most used (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes,
    rounded up: submitit takes minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise SpecError(f"--slurm-time {text!r}: write MINUTES, HH:MM:SS or D-HH:MM:SS, e.g. 12:00:00")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = first * 3600 + second * 60 + third
    elif second is not None:  # MM:SS
        seconds = first * 60 + second
    else:  # MINUTES
        seconds = first * 60
    if seconds <= 0:
        raise SpecError(f"--slurm-time {text!r} must be longer than zero")
    return -(-seconds // 60)


def _key_values(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--slurm-option {item!r}: write KEY=VALUE, e.g. constraint=a100")
        pairs[key.strip().lstrip("-")] = value
    return pairs

