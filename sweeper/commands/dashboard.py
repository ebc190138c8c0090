"""`sweep.py dashboard`: serve optuna-dashboard on the study's storage (live trials, params, importances)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("dashboard", help="serve optuna-dashboard for this storage (127.0.0.1 unless --host is given)")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite under mlruns/); every study in it is "
                   "shown; a password may come from $SWEEP_DB_PASSWORD")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8080, help="port")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from sweeper.stores import credentials_from_env, default_storage, make_storage, mask
    storage = credentials_from_env(args.storage or default_storage())
    # make_storage: the same driver pinning (PostgreSQL) and SQLite lock timeout as the workers that write it
    print(f"[sweep] optuna-dashboard for {mask(storage)} on http://{args.host}:{args.port} (Ctrl-C stops it)",
          flush=True)
    try:
        run_server(make_storage(storage), host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0
