"""`sweep.py export`: the best (confirmed) config as a spec (yaml/json) or verl Hydra overrides."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from critic.sections import ExportFormat
from sweeper.commands.common import add_store_args, load_study, stored_spec


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write the best config as a spec (yaml/json) or verl Hydra overrides")
    add_store_args(p)
    p.add_argument("--format", choices=typing.get_args(ExportFormat), default="yaml", help="output format")
    p.add_argument("--trial", type=int, help="export this trial instead of the confirmed winner (or the best)")
    p.add_argument("--allow-unconfirmed", action="store_true",
                   help="no warning on stderr for a trial not confirmed better than the baseline")
    p.add_argument("--verl-version", help="--format verl: verl release whose keys to write, X.Y (default: 0.9)")
    p.add_argument("--verl-worker", choices=["legacy", "engine"],
                   help="--format verl: the critic worker, for its clip key (default: that version's default)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from sweeper.export import confirmation_note, pick_trial, render

    study = load_study(args)
    spec = stored_spec(study)
    trial = pick_trial(study, args.trial)
    shown_better, confirmation = confirmation_note(study, trial)
    if not shown_better and not args.allow_unconfirmed:
        for line in confirmation:
            print(f"[sweep] warning: {line}", file=sys.stderr)
    text = render(spec, trial, args.format, args.verl_version, args.verl_worker, confirmation)
    if args.output:
        Path(args.output).write_text(text)
        print(f"[sweep] wrote {args.output}")
    else:
        print(text, end="")
    return 0
