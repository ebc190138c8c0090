"""`sweep.py ui`: start the MLflow UI on this store."""

from __future__ import annotations

import argparse
import os
import signal
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
    # MLflow's server starts job-queue consumers of its own (for its GenAI jobs, which a sweep never submits): off
    # unless the user's environment turns them on, and in any case the server runs as a process group that is
    # stopped whole, so no consumer outlives the UI when this command is interrupted or terminated.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = subprocess.Popen(command, start_new_session=True, env=env)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return server.wait()
    except KeyboardInterrupt:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        return 130
