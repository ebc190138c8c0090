"""Argument helpers and output shared by the commands. Heavy libraries are imported inside functions, so that
building the parser (and `sweep.py --help`) loads none of torch, transformers, optuna or mlflow."""

from __future__ import annotations

import argparse
import sys


def quiet_libraries() -> None:
    """Optuna's per-trial INFO lines and its experimental-feature warnings off: the sweep prints its own progress."""
    import warnings

    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="experiment spec YAML, e.g. experiments/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one spec value (repeatable), typed like the field")


def add_store_args(parser: argparse.ArgumentParser, study_required: bool = False) -> None:
    parser.add_argument("--study", required=study_required, help="study name (default: the spec's sweep.study_name, "
                        "or the only study in the storage)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite under mlruns/); a password may come "
                        "from $SWEEP_DB_PASSWORD")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store under mlruns/)")


def urls(args: argparse.Namespace) -> tuple[str, str]:
    """(Optuna storage URL with the password from the environment, MLflow tracking URI) the arguments name."""
    from sweeper.stores import credentials_from_env, default_storage, default_tracking_uri
    return credentials_from_env(args.storage or default_storage()), args.tracking_uri or default_tracking_uri()


def load_study(args: argparse.Namespace):
    """The study --study/--storage name (the only search study in the storage without --study)."""
    from sweeper.study import load_study as load
    return load(urls(args)[0], args.study)


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"[sweep] warning: {warning}", file=sys.stderr)


def handle_signals(workers: int) -> None:
    import signal

    from sweeper.signals import stop_on_signals
    if workers <= 1:
        stop_on_signals(signal.SIGINT, signal.SIGTERM)
    else:  # the parent only forwards signals to its workers
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def guarded(stages, study, tracker, parent_id: str):
    """Run the stages; close the parent run with the right status whatever happens. Returns (exit code, result)."""
    from sweeper.runner import SweepStopped, finish_parent
    try:
        result = stages()
    except KeyboardInterrupt:
        tracker.end(parent_id, "KILLED")
        print("\n[sweep] interrupted: the current trial was closed (Optuna FAIL 'interrupted', MLflow KILLED). "
              "Rerun the same command to resume.", file=sys.stderr)
        return 130, None
    except SweepStopped as exc:
        finish_parent(study, tracker, parent_id)
        tracker.end(parent_id, "FAILED")
        print(f"[sweep] stopped: {exc}", file=sys.stderr)
        return 1, None
    except BaseException:
        tracker.end(parent_id, "FAILED")
        raise
    tracker.end(parent_id, "FINISHED")
    return 0, result


def print_confirmation(result: dict) -> None:
    from sweeper.confirm_stage import format_table
    print(f"\nConfirmation on {result['metric']} ({len(result['seeds'])} new seeds per config, paired with the "
          f"baseline; 95% intervals over seeds and held-out pairs):")
    print(format_table(result))
    print("\n" + result["verdict"])


def stored_spec(study):
    """The sweep spec stored in the study's user attributes (validated again)."""
    import json

    from sweeper.study import load_sweep_spec
    return load_sweep_spec(study.user_attrs.get("spec_source", "<study>"), raw=json.loads(study.user_attrs["spec"]))
