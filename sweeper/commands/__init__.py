"""The commands of `sweep.py`, one module each with `add_parser(subparsers)` and `main(args)`.

Building the parser imports no heavy library: each `main` imports what it needs, so `sweep.py --help` is fast.
"""

from __future__ import annotations

import argparse

from sweeper.commands import best, confirm, diagnose, export, generate, init, run, status, train, ui, worker

COMMANDS = (train, run, confirm, init, worker, status, best, export, generate, diagnose, ui)  # the order of --help


def add_commands(sub: argparse._SubParsersAction) -> None:
    for command in COMMANDS:
        command.add_parser(sub)
