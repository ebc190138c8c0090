"""`sweep.py status`: one row per trial, or a live view of every worker's trials with --watch."""

from __future__ import annotations

import argparse

from sweeper.commands.common import add_store_args, load_study


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("status", help="one row per trial: number, state, params, objective, duration, reason")
    add_store_args(p)
    p.add_argument("--watch", action="store_true", help="poll the storage and show every worker's trials")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from sweeper.board import leaderboard, state_counts  # only optuna and pandas: `status` starts fast

    study = load_study(args)
    if args.watch:
        from sweeper.workers import watch
        return watch(study)
    board = leaderboard(study)
    if board.empty:
        print(f"study {study.study_name!r} has no trials yet")
        return 0
    print(f"study {study.study_name!r}: " + ", ".join(f"{k.lower()}={v}" for k, v in
                                                    state_counts(study).items() if v))
    print(board.to_string(index=False, float_format=lambda v: f"{v:.4g}", max_colwidth=60))
    lineage = study.user_attrs.get("student_lineage")
    if lineage:
        print(f"student responses: {lineage}")
    return 0
