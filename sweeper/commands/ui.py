"""`sweep.py ui`: start the MLflow UI on this store."""

from __future__ import annotations

import argparse
import subprocess
import sys

from sweeper.commands.common import add_store_args, urls


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ui", help="start the MLflow UI for this store (127.0.0.1 unless --host is given)")
    add_store_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=5000, help="port")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from sweeper.stores import artifact_root
    _, tracking = urls(args)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking, "--host", args.host,
               "--port", str(args.port)]
    root = artifact_root(tracking)
    if root:
        command += ["--default-artifact-root", root]
    print(f"[sweep] MLflow UI on http://{args.host}:{args.port} — open an experiment's runs page "
          f"(#/experiments/<id>/runs); `sweep.py run` prints the direct link")
    return subprocess.call(command)
