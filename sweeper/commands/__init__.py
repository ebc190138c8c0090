"""The commands of `sweep.py` (and the `critic-sweep` entry point), one module each with `add_parser` and `main`.

Building the parser imports no heavy library: each command's `main` imports what it needs, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from sweeper.commands import (
    best,
    confirm,
    dashboard,
    diagnose,
    export,
    generate,
    init,
    report,
    run,
    status,
    train,
    ui,
    worker,
)

# the order of --help
COMMANDS = (train, run, confirm, init, worker, status, best, report, export, generate, diagnose, ui, dashboard)
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
    parser.add_argument("--debug", action="store_true", help="show the full traceback behind a one-line store error")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a spec or store error is one line on stderr (passwords masked) and exit code 2."""
    for name, value in ENVIRONMENT.items():  # before any library that reads them is imported
        os.environ.setdefault(name, value)
    args = build_parser().parse_args(argv)
    from critic.config import SpecError
    from sweeper.commands.common import log_traceback, quiet_libraries
    from sweeper.outage import StorageUnreachable
    from sweeper.stores import StorageError, mask
    quiet_libraries()
    try:
        return args.func(args) or 0
    except StorageUnreachable as exc:  # waited sweep.storage_outage_s for the storage server (sweeper/outage.py)
        print(f"[sweep] {exc}", file=sys.stderr)
        return 3
    except SpecError as exc:
        print(f"error: {mask(str(exc))}", file=sys.stderr)
        return 2
    except StorageError as exc:  # its traceback goes to the log file, or to the console with --debug
        if args.debug:
            import traceback
            print(mask("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
        log = log_traceback(exc, sys.argv[1:] if argv is None else argv)
        print(f"error: {mask(str(exc))}" + (f" (traceback: {log})" if log and not args.debug else ""),
              file=sys.stderr)
        return 2
