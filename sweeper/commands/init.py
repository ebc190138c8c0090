"""`sweep.py init`: create the study, schema and MLflow experiment once, before workers join."""

from __future__ import annotations

import argparse

from sweeper.commands.common import add_spec_args, add_store_args, print_warnings, urls


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("init", help="create the study, schema and MLflow experiment once, before workers join")
    add_spec_args(p)
    add_store_args(p)
    p.add_argument("--new-study", action="store_true", help="start a fresh study when the stored one differs")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from sweeper.stores import mask, without_password
    from sweeper.study import init_study, load_sweep_spec

    spec = load_sweep_spec(args.spec, args.overrides)
    print_warnings(spec.warnings)
    storage, tracking = urls(args)
    study, tracker, parent_id = init_study(spec, storage, tracking, args.study, args.new_study)
    tracker.end(parent_id, "FINISHED")  # workers set it RUNNING again while they work
    print(f"[sweep] initialised study {study.study_name!r} in {mask(storage)}; join it from any machine with:\n"
          f"  python sweep.py worker --study {study.study_name} --storage '{without_password(storage)[0]}' "
          f"--tracking-uri '{without_password(tracking)[0]}'\n"
          f"(put the database password in $SWEEP_DB_PASSWORD; it is never printed)")
    return 0
