"""`sweep.py diagnose`: measure why a critic's d_acc differs between training and another dataset.

  python sweep.py diagnose (--checkpoint DIR | --trial N | --run RUN_ID) [--data NAME=PATH ...] [--folds K]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweeper.commands.common import load_study, urls


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "diagnose", help="measure each proposed cause of a d_acc gap (shift, ties, overfitting, length, calibration)",
        description="Score a trained critic on its training split, its val split and every named file with the "
                    "engine's evaluation code, judge each proposed cause of a d_acc gap, and write report.md, "
                    "figures/ and diagnosis.json; the Markdown is also printed.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory written with "
                        "train.save_checkpoint: true (`sweep.py train` prints its path)")
    source.add_argument("--trial", type=int, metavar="N", help="the checkpoint of trial N of a sweep")
    source.add_argument("--run", metavar="RUN_ID", help="the checkpoint artifact of an MLflow run")
    p.add_argument("--study", metavar="NAME", help="with --trial: the study (default: the only one in the storage)")
    p.add_argument("--storage", help="with --trial: the Optuna storage URL (default: sqlite under mlruns/)")
    p.add_argument("--tracking-uri", help="with --trial/--run: the MLflow tracking URI (default: sqlite under mlruns/)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="another parquet file (or demo:NAME) to diagnose besides the spec's data.eval_sets; "
                        "repeatable")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="also train K critics with the checkpoint's spec, each holding out one of K folds of the "
                        "training split, and report the spread of d_acc (costs K trainings)")
    p.add_argument("--out", metavar="DIR", help="report folder (default: <checkpoint>/diagnosis)")
    p.add_argument("--max-pairs", type=int, default=2000, metavar="N",
                   help="score at most N pairs per dataset, a seeded sample (0 = all); default 2000")
    p.set_defaults(func=main)
    return p


def resolve_checkpoint(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The checkpoint directory the arguments name, and the MLflow run it came from (None for --checkpoint).

    --trial N reads the trial's MLflow run id from the study and downloads its `checkpoint` artifact (saved
    with train.save_checkpoint: true), or the parent run's `best_checkpoint` when N is the trial it holds.
    --run RUN_ID downloads that run's `checkpoint` (a trial) or `best_checkpoint` (a study's parent run).
    """
    from critic.config import SpecError
    if args.checkpoint:
        path = Path(args.checkpoint).expanduser().resolve()
        if not path.is_dir():
            raise SpecError(f"--checkpoint {path} is not a directory; pass the folder `sweep.py train` printed "
                            f"after 'checkpoint:'")
        return path, None
    from diagnose.checkpoints import download_checkpoint, trial_candidates
    from sweeper.tracking import Tracker
    client = Tracker(urls(args)[1]).client  # diagnose/ reads an MLflow client; it imports nothing of sweeper
    if args.trial is not None:
        return download_checkpoint(client, trial_candidates(load_study(args), args.trial, client),
                                   f"trial {args.trial}")
    return download_checkpoint(client, [(args.run, "checkpoint"), (args.run, "best_checkpoint")], f"run {args.run}")


def main(args: argparse.Namespace) -> int:
    from critic.config import SpecError
    from diagnose.diagnosis import diagnose, parse_data_args
    from diagnose.report import write_report
    from sweeper.figures import training_progress

    if args.max_pairs < 0:
        raise SpecError(f"--max-pairs must be >= 0 (0 = all pairs), got {args.max_pairs}")
    extra = parse_data_args(args.data)
    checkpoint, run_id = resolve_checkpoint(args)
    diagnosis = diagnose(checkpoint, extra, folds=args.folds, max_pairs=args.max_pairs or None,
                         progress=sys.stderr.isatty())
    report, markdown = write_report(diagnosis, Path(args.out) if args.out else checkpoint / "diagnosis",
                                    training_progress)
    print(markdown)
    print(f"[diagnose] wrote {report}, {report.parent / 'figures'}/ and {report.parent / 'diagnosis.json'}",
          file=sys.stderr)
    if run_id is not None:  # the report goes next to the critic it diagnoses
        from sweeper.tracking import Tracker
        Tracker(urls(args)[1]).log_dir(run_id, report.parent, "diagnosis")
        print(f"[diagnose] logged the report as artifacts 'diagnosis/' of MLflow run {run_id}", file=sys.stderr)
    return 0
