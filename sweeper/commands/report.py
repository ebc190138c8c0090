"""`sweep.py report`: the study's self-contained HTML report, written beside the stores and logged on its parent run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweeper.commands.common import add_store_args, load_search_study, urls

ARTIFACT_DIR = "report"  # on the parent run: report/<study>-report.html


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="write the study's HTML report (curves, objective, importances, best vs "
                       "baseline, confirmation); opens offline")
    add_store_args(p)
    p.add_argument("-o", "--output", type=Path, help="HTML file (default: <study>-report.html beside the "
                   "SQLite storage, else under mlruns/)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from sweeper.tracking import Tracker

    study = load_search_study(args)
    storage, tracking = urls(args)
    path = write_and_log(study, Tracker(tracking, study.study_name), storage, args.output)
    print(f"[report] {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser (works offline)")
    return 0


def write_and_log(study, tracker, storage_url: str, output: Path | None = None) -> Path:
    """Write the report and attach it to the study's parent run (when the study has one)."""
    from sweeper.report import report_path, write_report
    path = write_report(study, tracker.client, output or report_path(storage_url, study.study_name))
    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    if parent_id:
        tracker.log_file(parent_id, path, ARTIFACT_DIR)
    return path


def report_quietly(sweep) -> None:
    """The report at the end of `run`/`confirm`: a failure is one warning line and a tag, never a failed sweep."""
    try:
        path = write_and_log(sweep.study, sweep.tracker, sweep.storage_url)
    except Exception as exc:  # the sweep's results are stored already; the report is a view of them
        reason = f"{type(exc).__name__}: {exc}"
        print(f"[sweep] warning: the report could not be built ({reason}); retry with `sweep.py report`",
              file=sys.stderr)
        try:
            sweep.tracker.set_tags(sweep.parent_id, {"report.error": reason[:5000]})
        except Exception:  # the tracking store itself may be what failed
            pass
        return
    print(f"[sweep] report: {path} (also on the parent run, {ARTIFACT_DIR}/{path.name})")
