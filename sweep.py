#!/usr/bin/env python
"""Command line for the critic-warmup sweep tool: a thin layer over the `critic` and `sweeper` packages.

  python sweep.py train SPEC [--set section.key=value ...] [--json]
  python sweep.py run SPEC [--n-trials N] [--study NAME] [--storage URL] [--tracking-uri URI] [--workers N]
  python sweep.py status | best | export | ui | init | worker     (each has --help)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # sweeps often run where nothing outside is reachable
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one line per closed run, per worker
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    from sweeper.commands import add_commands
    parser = argparse.ArgumentParser(prog="sweep.py", description="Hyperparameter sweeps of the critic warmup.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from critic.config import SpecError
    from sweeper.stores import mask
    try:
        return args.func(args) or 0
    except SpecError as exc:
        print(f"error: {mask(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
