"""The commands of `sweep.py` (and the `critic-sweep` entry point), one module each with `add_parser` and `main`.

Building the parser imports no heavy library: each command's `main` imports what it needs, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from sweeper.commands import best, confirm, diagnose, export, generate, init, run, status, train, ui, worker

COMMANDS = (train, run, confirm, init, worker, status, best, export, generate, diagnose, ui)  # the order of --help
ENVIRONMENT = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # sweeps often run where nothing outside is reachable
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # one line per closed run, per worker
    "HF_HUB_OFFLINE": "1",  # nothing is downloaded at run time
    "TOKENIZERS_PARALLELISM": "false",
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    for command in COMMANDS:
        command.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep.py", description="Hyperparameter sweeps of the critic warmup.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a spec error is one line on stderr (passwords masked) and exit code 2."""
    for name, value in ENVIRONMENT.items():  # before any library that reads them is imported
        os.environ.setdefault(name, value)
    args = build_parser().parse_args(argv)
    from critic.config import SpecError
    from sweeper.commands.common import quiet_libraries
    from sweeper.stores import mask
    quiet_libraries()
    try:
        return args.func(args) or 0
    except SpecError as exc:
        print(f"error: {mask(str(exc))}", file=sys.stderr)
        return 2
