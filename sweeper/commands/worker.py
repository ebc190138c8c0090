"""`sweep.py worker`: join an initialised study and run trials until it is done."""

from __future__ import annotations

import argparse

from sweeper.commands.common import add_store_args, urls


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("worker", help="join an initialised study and run trials until it is done")
    add_store_args(p, study_required=True)
    p.add_argument("--worker-index", type=int, default=0, help="distinguishes sampler seeds between workers")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    storage, tracking = urls(args)
    return run_worker(storage, args.study, tracking, args.worker_index, progress=not args.no_progress)


def run_worker(storage_url: str, study_name: str, tracking_uri: str, worker_index: int = 0,
               progress: bool = True) -> int:
    """Join an initialised study and run trials until it holds n_trials finished ones."""
    import os
    import signal
    import sys

    import torch

    from sweeper.confirm import ConfirmPlan
    from sweeper.outage import StorageUnreachable
    from sweeper.signals import stop_on_signals
    from sweeper.study import SweepStopped
    from sweeper.sweep import Sweep
    from sweeper.workers import CloseAndRetry

    stop_on_signals(signal.SIGINT, signal.SIGTERM)
    if os.environ.get("SWEEP_TORCH_THREADS"):  # set by launch_workers (sweeper/workers.py)
        torch.set_num_threads(int(os.environ["SWEEP_TORCH_THREADS"]))
    sweep = Sweep.attach(storage_url, study_name, tracking_uri, worker_index, CloseAndRetry(tracking_uri))
    sweep.resume()
    plan = ConfirmPlan.of(sweep.study) if "confirm_plan" in sweep.study.user_attrs else None  # `<study>.confirm`
    try:
        sweep.run_trials(progress=progress, plan=plan)
    except KeyboardInterrupt:
        print(f"[worker {worker_index}] interrupted; its trial was closed", file=sys.stderr)
        return 130
    except SweepStopped as exc:
        sweep.end("FAILED")
        print(f"[worker {worker_index}] stopped: {exc}", file=sys.stderr)
        return 1
    except StorageUnreachable:  # its trial is noted for the next start (sweeper/outage.py); main prints the line
        sweep.end("FAILED")
        raise
    sweep.end("FINISHED")  # the study is done; `run SPEC` on it adds the leaderboard and plots
    return 0
