"""`sweep.py report`: the study's self-contained HTML report, written beside the stores and logged on its parent run."""

from __future__ import annotations

import argparse
from pathlib import Path

from sweeper.commands.common import add_store_args, load_search_study, urls


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="write the study's HTML report (curves, objective, importances, best vs "
                       "baseline, confirmation); opens offline")
    add_store_args(p)
    p.add_argument("-o", "--output", type=Path, help="HTML file (default: <study>-report.html beside the "
                   "SQLite storage, else under mlruns/)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from sweeper.report import write_and_log
    from sweeper.tracking import Tracker

    study = load_search_study(args)
    storage, tracking = urls(args)
    path = write_and_log(study, Tracker(tracking, study.study_name), storage, args.output)
    print(f"[report] {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser (works offline)")
    return 0
