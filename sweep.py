#!/usr/bin/env python
"""Command line for the critic-warmup sweep tool. A thin layer: every command calls a package function.

  python sweep.py train SPEC [--set section.key=value ...] [--json]
  python sweep.py run SPEC [--n-trials N] ...        (see `python sweep.py -h`)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="experiment spec YAML, e.g. experiments/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one spec value (repeatable), typed like the field")


def cmd_train(args: argparse.Namespace) -> int:
    from sweeper.single import train_once
    return train_once(args.spec, args.overrides, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep.py", description="Hyperparameter sweeps of the critic warmup.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and evaluate one config; prints the final held-out metrics")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with every final metric instead")
    p.set_defaults(func=cmd_train)

    try:
        from sweeper.cli import add_commands
    except ImportError as exc:  # keep `train` usable while the sweep package is incomplete
        if "sweeper.cli" not in str(exc):
            raise
    else:
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from critic.config import SpecError
    try:
        return args.func(args) or 0
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
