"""Sweep commands (run, init, worker, status, best, export, ui); `sweep.py` registers them."""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import optuna

from critic.config import SpecError
from sweeper import study as study_mod
from sweeper.runner import SweepStopped, best_trials, finish_parent, leaderboard, run_trials
from sweeper.signals import stop_on_signals
from sweeper.stores import credentials_from_env, default_storage, default_tracking_uri, mask

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _store_args(parser: argparse.ArgumentParser, study_required: bool = False) -> None:
    parser.add_argument("--study", required=study_required, help="study name (default: the spec's sweep.study_name, "
                        "or the only study in the storage)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite under mlruns/); a password may come "
                        "from $SWEEP_DB_PASSWORD")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store under mlruns/)")


def _urls(args: argparse.Namespace) -> tuple[str, str]:
    return credentials_from_env(args.storage or default_storage()), args.tracking_uri or default_tracking_uri()


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"sweep.n_trials={args.n_trials}"] if args.n_trials else [])
    spec = study_mod.load_sweep_spec(args.spec, overrides)  # every spec error stops here, before any trial
    for warning in spec.warnings:
        print(f"[sweep] warning: {warning}", file=sys.stderr)
    storage, tracking = _urls(args)
    from sweeper.workers import CloseAndRetry
    study, tracker, parent_id = study_mod.init_study(spec, storage, tracking, args.study, args.new_study,
                                                     CloseAndRetry(tracking))
    print(f"[sweep] study {study.study_name!r} in {mask(storage)}\n[sweep] MLflow runs page: {tracker.ui_link()} "
          f"(after `python sweep.py ui`)")
    _handle_signals(args.workers)
    confirm = spec.cfg.sweep.confirm
    confirming = confirm.top_k > 0 and bool(spec.cfg.sweep.baseline)

    def stages() -> dict | None:
        if args.workers > 1:
            from sweeper.workers import launch_workers
            launch_workers(study, spec, storage, tracking, args.workers, progress=not args.no_progress)
        else:
            run_trials(study, spec, tracker, parent_id, spec.cfg.sweep.n_trials, progress=not args.no_progress)
        finish_parent(study, tracker, parent_id)
        if not confirming:
            return None
        from sweeper.confirm_stage import run_confirmation
        return run_confirmation(study, spec, storage, tracker, parent_id, confirm.top_k, confirm.seeds,
                                workers=args.workers, progress=not args.no_progress)

    code, result = _guarded(stages, study, tracker, parent_id)
    if code:
        return code
    print(summary_table(study, spec))
    if result is not None:
        _print_confirmation(result)
    elif not spec.cfg.sweep.baseline:
        print("\n[sweep] no confirmation: set sweep.baseline (your current setting) to test finalists against it")
    print(f"\nOpen the UI: python sweep.py ui   then {tracker.ui_link()}")
    return 0


def _handle_signals(workers: int) -> None:
    if workers <= 1:
        stop_on_signals(signal.SIGINT, signal.SIGTERM)
    else:  # the parent only forwards signals to its workers
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _guarded(stages, study: optuna.Study, tracker, parent_id: str):
    """Run the stages; close the parent run with the right status whatever happens. Returns (exit code, result)."""
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


def _print_confirmation(result: dict) -> None:
    from sweeper.confirm_stage import format_table
    print(f"\nConfirmation on {result['metric']} ({len(result['seeds'])} new seeds per config, paired with the "
          f"baseline; 95% intervals over seeds and held-out pairs):")
    print(format_table(result))
    print("\n" + result["verdict"])


def cmd_confirm(args: argparse.Namespace) -> int:
    study = _load_study(args)
    if "confirm_of" in study.user_attrs:
        raise SpecError(f"{study.study_name!r} is a confirmation study; pass the search study "
                        f"--study {study.user_attrs['confirm_of']}")
    spec = study_mod.load_sweep_spec(study.user_attrs.get("spec_source", "<study>"),
                                     raw=json.loads(study.user_attrs["spec"]))
    storage, tracking = _urls(args)
    from sweeper.tracking import Tracker
    tracker = Tracker(tracking, study.study_name)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    tracker.client.update_run(parent_id, status="RUNNING")
    confirm = spec.cfg.sweep.confirm
    top_k = confirm.top_k if args.top_k is None else args.top_k
    seeds = confirm.seeds if args.seeds is None else args.seeds
    if seeds < 2 or (top_k < 1 and not args.trials):
        raise SpecError(f"confirm needs --seeds >= 2 and --top-k >= 1 (or --trials); got seeds={seeds}, top_k={top_k}")
    _handle_signals(args.workers)
    from sweeper.confirm_stage import run_confirmation
    code, result = _guarded(lambda: run_confirmation(study, spec, storage, tracker, parent_id, top_k, seeds,
                                                     args.trials, args.workers, not args.no_progress),
                            study, tracker, parent_id)
    if code:
        return code
    _print_confirmation(result)
    return 0


def summary_table(study: optuna.Study, spec: study_mod.SweepSpec) -> str:
    """Best trial vs the baseline on every tracked metric, plus their params."""
    best = best_trials(study)
    baseline = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")]
    columns = [("best", best[0] if best else None), ("baseline", baseline[0] if baseline else None)]
    metrics = {name: json.loads(t.user_attrs.get("metrics", "{}")) if t else {} for name, t in columns}
    keys = sorted(set().union(*[m.keys() for m in metrics.values()]))
    lines = [f"{'':<34}{'best':>14}{'baseline':>14}"]
    lines.append(f"{'trial':<34}" + "".join(f"{(t.number if t else '-'):>14}" for _, t in columns))
    lines.append(f"{'state':<34}" + "".join(f"{(t.state.name if t else '-'):>14}" for _, t in columns))
    for key in keys:
        lines.append(f"{key:<34}" + "".join(f"{metrics[n].get(key, math.nan):>14.4f}" for n, _ in columns))
    for key in [e.key for e in spec.entries]:
        cells = [str(t.params.get(key, "-")) if t else "-" for _, t in columns]
        lines.append(f"{key:<34}" + "".join(f"{c[:13]:>14}" for c in cells))
    return "\n".join(lines)


def cmd_init(args: argparse.Namespace) -> int:
    spec = study_mod.load_sweep_spec(args.spec, args.overrides)
    for warning in spec.warnings:
        print(f"[sweep] warning: {warning}", file=sys.stderr)
    storage, tracking = _urls(args)
    study, tracker, parent_id = study_mod.init_study(spec, storage, tracking, args.study, args.new_study)
    tracker.end(parent_id, "FINISHED")  # workers set it RUNNING again while they work
    print(f"[sweep] initialised study {study.study_name!r} in {mask(storage)}; join it from any machine with:\n"
          f"  python sweep.py worker --study {study.study_name} --storage '{_without_password(storage)}' "
          f"--tracking-uri '{_without_password(tracking)}'\n"
          f"(put the database password in $SWEEP_DB_PASSWORD; it is never printed)")
    return 0


def _without_password(url: str) -> str:
    return mask(url).replace(":***@", "@")


def cmd_worker(args: argparse.Namespace) -> int:
    from sweeper.workers import run_worker
    storage, tracking = _urls(args)
    return run_worker(storage, args.study, tracking, args.worker_index, progress=not args.no_progress)


def _load_study(args: argparse.Namespace) -> optuna.Study:
    storage, _ = _urls(args)
    storage_obj = study_mod.make_storage(storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage_obj, include_best_trial=False)]
    name = args.study
    if name is None:
        from sweeper.confirm import SUFFIX
        searches = [n for n in names if not n.endswith(SUFFIX)]  # a confirmation study belongs to its search
        if len(searches) != 1:
            raise SpecError(f"pass --study NAME; the storage holds {names or 'no studies'}")
        name = searches[0]
    if name not in names:
        raise SpecError(f"study {name!r} not found in {mask(storage)}; existing: {names or 'none'}")
    return optuna.load_study(study_name=name, storage=storage_obj)


def cmd_status(args: argparse.Namespace) -> int:
    from sweeper.workers import watch
    study = _load_study(args)
    if args.watch:
        return watch(study)
    board = leaderboard(study)
    if board.empty:
        print(f"study {study.study_name!r} has no trials yet")
        return 0
    print(f"study {study.study_name!r}: " + ", ".join(f"{k.lower()}={v}" for k, v in
                                                    study_mod.state_counts(study).items() if v))
    print(board.to_string(index=False, float_format=lambda v: f"{v:.4g}", max_colwidth=60))
    lineage = study.user_attrs.get("student_lineage")
    if lineage:
        print(f"student responses: {lineage}")
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    study = _load_study(args)
    board = leaderboard(study)
    complete = board[board["state"] == "COMPLETE"] if not board.empty else board
    if complete.empty:
        raise SpecError(f"study {study.study_name!r} has no COMPLETE trial yet")
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        print(f"Pareto front ({len(front)} trials):")
        print(complete[complete["number"].isin(front)].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        return 0
    ascending = study.direction == optuna.study.StudyDirection.MINIMIZE
    top = complete.sort_values("value", ascending=ascending).head(args.top)
    print("search (one seed per trial):")
    print(top.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    from sweeper.confirm import stored_confirmation
    confirmed = stored_confirmation(study)
    if confirmed:
        _print_confirmation(confirmed)
    else:
        print("\nnot confirmed yet: the best of many one-seed trials is biased upward; "
              "`sweep.py confirm` re-runs the finalists and the baseline with new seeds")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sweeper.export import confirmation_note, pick_trial, render
    study = _load_study(args)
    spec = study_mod.load_sweep_spec(study.user_attrs.get("spec_source", "<study>"),
                                     raw=json.loads(study.user_attrs["spec"]))
    trial = pick_trial(study, args.trial)
    shown_better, confirmation = confirmation_note(study, trial)
    if not shown_better and not args.allow_unconfirmed:
        for line in confirmation:
            print(f"[sweep] warning: {line}", file=sys.stderr)
    text = render(spec, trial, args.format, args.verl_version, args.verl_worker, confirmation)
    if args.output:
        Path(args.output).write_text(text)
        print(f"[sweep] wrote {args.output}")
    else:
        print(text, end="")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    _, tracking = _urls(args)
    from sweeper.stores import artifact_root
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking, "--host", args.host,
               "--port", str(args.port)]
    root = artifact_root(tracking)
    if root:
        command += ["--default-artifact-root", root]
    print(f"[sweep] MLflow UI on http://{args.host}:{args.port} — open an experiment's runs page "
          f"(#/experiments/<id>/runs); `sweep.py run` prints the direct link")
    return subprocess.call(command)


def add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="experiment spec YAML, e.g. experiments/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one spec value (repeatable), typed like the field")


def cmd_train(args: argparse.Namespace) -> int:
    from sweeper.single import train_once
    return train_once(args.spec, args.overrides, as_json=args.json)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train and evaluate one config; prints the final held-out metrics")
    add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with every final metric instead")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="run (or resume) a sweep until n_trials trials are finished")
    add_spec_args(p)
    _store_args(p)
    p.add_argument("--n-trials", type=int, help="override sweep.n_trials")
    p.add_argument("--new-study", action="store_true", help="start a fresh study when the stored one differs")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine sharing the study")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("confirm", help="re-run the top finalists and the baseline with new seeds; paired verdict")
    _store_args(p)
    p.add_argument("--top-k", type=int, help="finalists to confirm (default: the spec's sweep.confirm.top_k)")
    p.add_argument("--seeds", type=int, help="new seeds per config (default: the spec's sweep.confirm.seeds)")
    p.add_argument("--trials", type=lambda text: [int(x) for x in text.split(",")], metavar="N,M",
                   help="confirm these trial numbers instead of the top-k")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_confirm)

    p = sub.add_parser("init", help="create the study, schema and MLflow experiment once, before workers join")
    add_spec_args(p)
    _store_args(p)
    p.add_argument("--new-study", action="store_true", help="start a fresh study when the stored one differs")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("worker", help="join an initialised study and run trials until it is done")
    _store_args(p, study_required=True)
    p.add_argument("--worker-index", type=int, default=0, help="distinguishes sampler seeds between workers")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("status", help="one row per trial: number, state, params, objective, duration, reason")
    _store_args(p)
    p.add_argument("--watch", action="store_true", help="poll the storage and show every worker's trials")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("best", help="the best trials (the Pareto front for multi-objective studies)")
    _store_args(p)
    p.add_argument("--top", type=int, default=5, help="how many trials to show")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("export", help="write the best config as a spec (yaml/json) or verl Hydra overrides")
    _store_args(p)
    p.add_argument("--format", choices=["yaml", "json", "verl"], default="yaml", help="output format")
    p.add_argument("--trial", type=int, help="export this trial instead of the confirmed winner (or the best)")
    p.add_argument("--allow-unconfirmed", action="store_true",
                   help="no warning on stderr for a trial not confirmed better than the baseline")
    p.add_argument("--verl-version", help="--format verl: verl release whose keys to write, X.Y (default: 0.9)")
    p.add_argument("--verl-worker", choices=["legacy", "engine"],
                   help="--format verl: the critic worker, for its clip key (default: that version's default)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_export)

    from sweeper.diagnose_cmd import add_diagnose_command
    from sweeper.generate_cmd import add_generate_command
    add_generate_command(sub)
    add_diagnose_command(sub)

    p = sub.add_parser("ui", help="start the MLflow UI for this store (127.0.0.1 unless --host is given)")
    _store_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=5000, help="port")
    p.set_defaults(func=cmd_ui)
