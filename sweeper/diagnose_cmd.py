"""`sweep.py diagnose`: measure why a critic's d_acc differs between training and another dataset.

Registered by `add_diagnose_command(subparsers)`; until sweep.py does so it also runs on its own:
  python -m sweeper.diagnose_cmd --checkpoint DIR [--data NAME=PATH ...] [--folds K] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
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


def resolve_checkpoint(args: argparse.Namespace) -> Path:
    """The checkpoint directory the arguments name. --trial/--run need the sweep's MLflow store (not wired yet)."""
    if args.checkpoint:
        path = Path(args.checkpoint).expanduser().resolve()
        if not path.is_dir():
            raise SpecError(f"--checkpoint {path} is not a directory; pass the folder `sweep.py train` printed "
                            f"after 'checkpoint:'")
        return path
    what = f"--run {args.run}" if args.run else f"--trial {args.trial}"
    raise SpecError(f"{what} needs the sweep's MLflow store, which `diagnose` cannot read yet; download the run's "
                    f"'checkpoint' artifact (trials with train.save_checkpoint: true) and pass --checkpoint DIR")


def cmd_diagnose(args: argparse.Namespace) -> int:
    from critic.diagnose import diagnose, parse_data_args
    from critic.diagnose_report import write_report

    checkpoint = resolve_checkpoint(args)
    extra = parse_data_args(args.data)
    if args.max_pairs < 0:
        raise SpecError(f"--max-pairs must be >= 0 (0 = all pairs), got {args.max_pairs}")
    diagnosis = diagnose(checkpoint, extra, folds=args.folds, max_pairs=args.max_pairs or None,
                         progress=sys.stderr.isatty())
    report, markdown = write_report(diagnosis, Path(args.out) if args.out else checkpoint / "diagnosis")
    print(markdown)
    print(f"[diagnose] wrote {report}, {report.parent / 'figures'}/ and {report.parent / 'diagnosis.json'}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m sweeper.diagnose_cmd")
    add_diagnose_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diagnose", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
