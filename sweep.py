#!/usr/bin/env python
"""Command line for the critic-warmup sweep tool: a thin layer over the `critic`, `sweeper` and `diagnose` packages.

  python sweep.py train SPEC [--set section.key=value ...] [--json]
  python sweep.py run SPEC [--n-trials N] [--study NAME] [--storage URL] [--tracking-uri URI] [--workers N]
                          [--launcher local|ray|slurm ...]
  python sweep.py status | best | confirm | export | generate | diagnose | ui | init | worker     (each has --help)
"""

import sys

from sweeper.commands import build_parser, main  # noqa: F401  (build_parser: for tools that render the CLI)

if __name__ == "__main__":
    sys.exit(main())
