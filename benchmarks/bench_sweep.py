"""Sweep-level efficiency: the demo sweep with the default pruner vs no pruner (same seed and trial count).

Prints, per variant: total optimizer steps, wall time, best val/d_acc; and the per-trial overhead (trial
wall time not spent in training or evaluation) as a percentage of trial time, from the complete trials.

  .venv/bin/python benchmarks/bench_sweep.py [--spec experiments/demo.yaml] [--n-trials 12]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import optuna  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from critic.sections import SweepConfig  # noqa: E402
from sweeper import study as study_mod  # noqa: E402
from sweeper.sweep import Sweep  # noqa: E402


def run_variant(spec_path: str, pruner: str, n_trials: int, folder: Path) -> dict:
    spec = study_mod.load_sweep_spec(spec_path, [f"sweep.pruner={pruner}", f"sweep.n_trials={n_trials}",
                                                 f"sweep.study_name=bench-{pruner}"])
    storage, tracking = f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"
    sweep = Sweep.init(spec, storage, tracking)
    study = sweep.study
    started = time.perf_counter()
    sweep.run_trials(n_trials, progress=False)
    wall = time.perf_counter() - started
    client = MlflowClient(tracking)
    steps, overheads = 0, []
    for trial in study.trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        history = client.get_metric_history(run_id, "critic/loss")
        steps += len(history)  # optimizer steps actually taken, pruned trials included
        metrics = client.get_run(run_id).data.metrics
        if trial.state == optuna.trial.TrialState.COMPLETE and "timing/train_s" in metrics:
            work = metrics["timing/train_s"] + metrics["timing/eval_s"]
            overheads.append(1 - work / trial.duration.total_seconds())
    return {"pruner": pruner, "trials": len(study.trials), "optimizer_steps": steps, "wall_s": round(wall, 1),
            "best_val_d_acc": study.best_value,
            "overhead_pct_median": round(100 * sorted(overheads)[len(overheads) // 2], 2) if overheads else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "experiments" / "demo.yaml"))
    parser.add_argument("--n-trials", type=int, default=12)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for pruner in (SweepConfig().pruner, "none"):  # the default pruner vs none
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_variant(args.spec, pruner, args.n_trials, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    pruned, full = rows
    print(f"\n{'pruner':<10}{'trials':>8}{'opt steps':>11}{'wall s':>9}{'best val/d_acc':>16}{'overhead %':>12}")
    for r in rows:
        print(f"{r['pruner']:<10}{r['trials']:>8}{r['optimizer_steps']:>11}{r['wall_s']:>9}"
              f"{r['best_val_d_acc']:>16.4f}{str(r['overhead_pct_median']):>12}")
    print(json.dumps({"steps_fraction": pruned["optimizer_steps"] / full["optimizer_steps"],
                      "best_gap": full["best_val_d_acc"] - pruned["best_val_d_acc"],
                      "overhead_pct_median": pruned["overhead_pct_median"]}))


if __name__ == "__main__":
    main()
