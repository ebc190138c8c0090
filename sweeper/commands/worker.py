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
    from sweeper.workers import run_worker
    storage, tracking = urls(args)
    return run_worker(storage, args.study, tracking, args.worker_index, progress=not args.no_progress)
