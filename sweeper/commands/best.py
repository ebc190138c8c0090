"""`sweep.py best`: the best trials (the Pareto front for multi-objective studies) and their confirmation."""

from __future__ import annotations

import argparse

from sweeper.commands.common import add_store_args, load_study, print_confirmation


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("best", help="the best trials (the Pareto front for multi-objective studies)")
    add_store_args(p)
    p.add_argument("--top", type=int, default=5, help="how many trials to show")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    import optuna

    from critic.config import SpecError
    from sweeper.board import leaderboard, stored_confirmation  # only optuna and pandas: `best` starts fast

    study = load_study(args)
    board = leaderboard(study)
    complete = board[board["state"] == "COMPLETE"] if not board.empty else board
    if complete.empty:
        raise SpecError(f"study {study.study_name!r} has no COMPLETE trial yet")
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        print(f"Pareto front ({len(front)} trials):")
        print(complete[complete["number"].isin(front)].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return 0
    ascending = study.direction == optuna.study.StudyDirection.MINIMIZE
    top = complete.sort_values("value", ascending=ascending).head(args.top)
    print("search (one seed per trial):")
    print(top.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if "candidate" in board:  # your planned changes, whatever their rank
        print("\nyour planned changes (sweep.candidates; search, one seed each):")
        print(board[board["candidate"] != ""].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    confirmed = stored_confirmation(study)
    if confirmed:
        print_confirmation(confirmed)
    else:
        print("\nnot confirmed yet: the best of many one-seed trials is biased upward; "
              "`sweep.py confirm` re-runs the finalists and the baseline with new seeds")
    return 0
