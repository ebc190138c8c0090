"""`sweep.py run`: run (or resume) a sweep, then confirm its finalists against the baseline."""

from __future__ import annotations

import argparse

from sweeper.cluster import add_launcher_args
from sweeper.commands.common import (
    add_spec_args,
    add_store_args,
    guarded,
    handle_signals,
    print_confirmation,
    print_warnings,
    urls,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run (or resume) a sweep until n_trials trials are finished")
    add_spec_args(p)
    add_store_args(p)
    p.add_argument("--n-trials", type=int, help="override sweep.n_trials")
    p.add_argument("--new-study", action="store_true", help="start a fresh study when the stored one differs")
    p.add_argument("--workers", type=int, default=1, help="workers sharing the study (processes on this machine, "
                   "or Ray tasks / Slurm array tasks with --launcher)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_launcher_args(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    from critic.data import generate_students
    from sweeper.cluster import make_launcher
    from sweeper.pruning import pruned_summary
    from sweeper.stores import mask
    from sweeper.study import load_sweep_spec
    from sweeper.sweep import Sweep
    from sweeper.workers import CloseAndRetry

    overrides = list(args.overrides) + ([f"sweep.n_trials={args.n_trials}"] if args.n_trials else [])
    spec = load_sweep_spec(args.spec, overrides)  # every spec error stops here, before any trial
    print_warnings(spec.warnings)
    storage, tracking = urls(args)
    launch = make_launcher(args, spec, storage, tracking)  # its own errors too, before the study is opened
    generate_students(spec.cfg, progress=not args.no_progress)  # once, before any worker's trial reads them
    sweep = Sweep.init(spec, storage, tracking, args.study, args.new_study, CloseAndRetry(tracking))
    study = sweep.study
    print(f"[sweep] study {study.study_name!r} in {mask(storage)}\n[sweep] MLflow runs page: "
          f"{sweep.tracker.ui_link()} (after `python sweep.py ui`)")
    handle_signals(launch is not None)
    confirm = spec.cfg.sweep.confirm
    confirming = (confirm.top_k > 0 or bool(spec.candidates)) and bool(spec.cfg.sweep.baseline)

    def stages() -> dict | None:
        sweep.run(args.workers, progress=not args.no_progress, launch=launch)
        sweep.finish()
        result = sweep.confirm(confirm.top_k, confirm.seeds, workers=args.workers, progress=not args.no_progress,
                               launch=launch) if confirming else None
        sweep.report()  # after the confirmation: the report shows it
        return result

    code, result = guarded(stages, sweep)
    if code:
        return code
    print(summary_table(study, spec))
    print(f"\n[sweep] {pruned_summary(study)}")
    if result is not None:
        print_confirmation(result)
    elif not spec.cfg.sweep.baseline:
        print("\n[sweep] no confirmation: set sweep.baseline (your current setting) to test finalists against it")
    print(f"\nOpen the UI: python sweep.py ui   then {sweep.tracker.ui_link()}")
    return 0


def summary_table(study, spec) -> str:
    """Best trial vs the baseline (and your candidates) on every tracked metric, plus their params."""
    import math

    from sweeper.board import trial_params
    from sweeper.report_data import best_vs_baseline
    compared = best_vs_baseline(study)  # the report's table reads the same trials and numbers
    columns = [(name, t) for name, t, _ in compared]
    metrics = {name: values for name, _, values in compared}
    keys = sorted(set().union(*[m.keys() for m in metrics.values()]))
    lines = [f"{'':<34}" + "".join(f"{name[:13]:>14}" for name, _ in columns)]
    lines.append(f"{'trial':<34}" + "".join(f"{(t.number if t else '-'):>14}" for _, t in columns))
    lines.append(f"{'state':<34}" + "".join(f"{(t.state.name if t else '-'):>14}" for _, t in columns))
    for key in keys:
        lines.append(f"{key:<34}" + "".join(f"{metrics[n].get(key, math.nan):>14.4f}" for n, _ in columns))
    for key in dict.fromkeys([e.key for e in spec.entries] + [k for _, t in columns if t for k in trial_params(t)]):
        values = [trial_params(t).get(key, "-") if t else "-" for _, t in columns]
        cells = [f"{v:.6g}" if isinstance(v, float) else str(v) for v in values]  # 5.06e-05, not a cut '5.0576407'
        lines.append(f"{key:<34}" + "".join(f"{c[:13]:>14}" for c in cells))
    return "\n".join(lines)
