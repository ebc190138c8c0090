"""`sweep.py diagnose`: measure why a critic's d_acc differs between training and another dataset.

Registered on sweep.py's subcommands by `add_diagnose_command(subparsers)`:
  python sweep.py diagnose (--checkpoint DIR | --trial N | --run RUN_ID) [--data NAME=PATH ...] [--folds K]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from critic.config import SpecError


def add_diagnose_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `diagnose` on a sweep.py-style subparsers object; returns its parser."""
    p = subparsers.add_parser(
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
    p.set_defaults(func=cmd_diagnose)
    return p


def resolve_checkpoint(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The checkpoint directory the arguments name, and the MLflow run it came from (None for --checkpoint).

    --trial N reads the trial's MLflow run id from the study and downloads its `checkpoint` artifact (saved
    with train.save_checkpoint: true), or the parent run's `best_checkpoint` when N is the trial it holds.
    --run RUN_ID downloads that run's `checkpoint` (a trial) or `best_checkpoint` (a study's parent run).
    """
    if args.checkpoint:
        path = Path(args.checkpoint).expanduser().resolve()
        if not path.is_dir():
            raise SpecError(f"--checkpoint {path} is not a directory; pass the folder `sweep.py train` printed "
                            f"after 'checkpoint:'")
        return path, None
    from mlflow import MlflowClient

    from sweeper.cli import _load_study, _urls
    _, tracking = _urls(args)
    client = MlflowClient(tracking)
    if args.trial is not None:
        study = _load_study(args)
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == args.trial]
        if not trials or "mlflow_run_id" not in trials[0].user_attrs:
            raise SpecError(f"trial {args.trial} of study {study.study_name!r} has no MLflow run; "
                            f"pick a trial from `sweep.py status`")
        candidates = [(trials[0].user_attrs["mlflow_run_id"], "checkpoint")]
        parent = study.user_attrs.get("mlflow_parent_run_id")
        if parent and client.get_run(parent).data.tags.get("best.checkpoint_trial") == str(args.trial):
            candidates.append((parent, "best_checkpoint"))
        what = f"trial {args.trial}"
    else:
        candidates = [(args.run, "checkpoint"), (args.run, "best_checkpoint")]
        what = f"run {args.run}"
    for run_id, artifact in candidates:
        if any(a.path == artifact for a in client.list_artifacts(run_id)):
            target = Path(tempfile.mkdtemp(prefix="diagnose-"))
            local = client.download_artifacts(run_id, artifact, str(target))
            return Path(local), run_id
    raise SpecError(f"{what} has no saved critic; rerun it with --set train.save_checkpoint=true "
                    f"(or sweep.save_best_checkpoint: true for the best trial)")


def cmd_diagnose(args: argparse.Namespace) -> int:
    from critic.diagnose import diagnose, parse_data_args
    from critic.diagnose_report import write_report

    if args.max_pairs < 0:
        raise SpecError(f"--max-pairs must be >= 0 (0 = all pairs), got {args.max_pairs}")
    extra = parse_data_args(args.data)
    checkpoint, run_id = resolve_checkpoint(args)
    diagnosis = diagnose(checkpoint, extra, folds=args.folds, max_pairs=args.max_pairs or None,
                         progress=sys.stderr.isatty())
    report, markdown = write_report(diagnosis, Path(args.out) if args.out else checkpoint / "diagnosis")
    print(markdown)
    print(f"[diagnose] wrote {report}, {report.parent / 'figures'}/ and {report.parent / 'diagnosis.json'}",
          file=sys.stderr)
    if run_id is not None:  # the report goes next to the critic it diagnoses
        from mlflow import MlflowClient

        from sweeper.cli import _urls
        MlflowClient(_urls(args)[1]).log_artifacts(run_id, str(report.parent), "diagnosis")
        print(f"[diagnose] logged the report as artifacts 'diagnosis/' of MLflow run {run_id}", file=sys.stderr)
    return 0
