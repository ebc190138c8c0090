"""Argument helpers and output shared by the commands. Heavy libraries are imported inside functions, so that
building the parser (and `sweep.py --help`) loads none of torch, transformers, optuna or mlflow."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

LOG_FILE = Path("mlruns") / "sweep.log"  # beside the default stores: tracebacks behind one-line errors


def quiet_libraries() -> None:
    """Library chatter off the console: the sweep prints its own progress, one line per trial and per data file.

    Optuna's per-trial INFO lines and experimental-feature warnings; MLflow's and alembic's INFO lines
    ("Creating initial MLflow database tables", migrations). Worker processes run `sweep.py worker`, so they
    get the same setup; the environment variable also reaches anything else they start.
    """
    import logging
    import warnings

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its and alembic's levels on import
    bars = sys.stdout.isatty() and sys.stderr.isatty()
    if not bars:  # transformers' own bars (loading, saving weights) too
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Both variables are read on import: where the libraries are already imported (sweep.py called from Python, or
    # the tests' fork server, tests/sweep_helpers.py), set the same through their APIs.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not bars and "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # the parent run's importance plot on a study whose trials all scored the same: nothing to act on
    warnings.filterwarnings("ignore", message="Target and region quantiles select the same set of trials")


def log_traceback(exc: BaseException, argv: list[str]) -> Path | None:
    """Append the masked traceback to LOG_FILE; returns its path (None if it cannot be written)."""
    import time
    import traceback

    from critic.redact import mask
    text = "".join(traceback.format_exception(exc))
    try:
        LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
        with LOG_FILE.open("a") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} sweep.py {mask(' '.join(argv))}\n{mask(text)}\n")
    except OSError:
        return None
    return LOG_FILE


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
    """(Optuna storage URL with the password from the environment, MLflow tracking URI) the arguments name.

    The tracking URI is checked here: MLflow retries an unreachable store for minutes before it fails.
    """
    from sweeper.stores import check_tracking_uri, credentials_from_env, default_tracking_uri
    tracking = credentials_from_env(args.tracking_uri or default_tracking_uri(), "SWEEP_TRACKING_PASSWORD")
    check_tracking_uri(tracking)
    return storage_url(args), tracking


def storage_url(args: argparse.Namespace) -> str:
    """The Optuna storage URL the arguments name, with the password from $SWEEP_DB_PASSWORD."""
    from sweeper.stores import credentials_from_env, default_storage
    return credentials_from_env(args.storage or default_storage())


def load_study(args: argparse.Namespace):
    """The study --study/--storage name (the only search study in the storage without --study)."""
    from sweeper.board import load_study as load  # not sweeper.study: that would load MLflow
    return load(storage_url(args), args.study)


def load_search_study(args: argparse.Namespace):
    """Like load_study, refusing a `<study>.confirm` study with the name of the search study to pass instead."""
    from critic.config import SpecError
    study = load_study(args)
    if "confirm_of" in study.user_attrs:
        raise SpecError(f"{study.study_name!r} is a confirmation study; pass its search study: "
                        f"--study {study.user_attrs['confirm_of']}")
    return study


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"[sweep] warning: {warning}", file=sys.stderr)


def handle_signals(launched: bool) -> None:
    """Trials in this process close on SIGINT/SIGTERM; with launched workers this process only tells them."""
    import signal

    from sweeper.signals import stop_on_signals
    if not launched:
        stop_on_signals(signal.SIGINT, signal.SIGTERM)
    else:  # the parent only forwards signals to its workers. Set SIGINT too: a shell starts background jobs
        # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def guarded(stages, sweep):
    """Run the stages; close the sweep's study run with the right status whatever happens. Returns (exit code,
    result)."""
    from sweeper.study import SweepStopped
    try:
        result = stages()
    except KeyboardInterrupt:
        sweep.end("KILLED")
        print("\n[sweep] interrupted: the current trial was closed (Optuna FAIL 'interrupted', MLflow KILLED). "
              "Rerun the same command to resume.", file=sys.stderr)
        return 130, None
    except SweepStopped as exc:
        sweep.finish()
        sweep.end("FAILED")
        print(f"[sweep] stopped: {exc}", file=sys.stderr)
        return 1, None
    except BaseException:
        sweep.end("FAILED")
        raise
    sweep.end("FINISHED")
    return 0, result


def print_confirmation(result: dict) -> None:
    from sweeper.board import format_table, split_text
    counts = sorted({row["seeds"] for row in result["table"]}) or [0]
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"  # more for promising configs
    print(f"\nConfirmation on {result['metric']} ({seeds} new seeds per config, paired with the "
          f"baseline; 95% intervals over seeds and held-out pairs),\nscored {split_text(result)}:")
    print(format_table(result))
    print("\n" + result["verdict"])
