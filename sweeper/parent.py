"""The study's parent run in MLflow: its curves by trial number while trials finish, its summaries at the end."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

from sweeper.board import best_trials, leaderboard, state_counts
from sweeper.tracking import Metric, now_ms


class ParentUpdater:
    """Study-level curves on the parent run (trial value and best value by trial number), so its charts show data."""

    def __init__(self, sweep) -> None:
        self.tracker, self.parent_id = sweep.tracker, sweep.parent_id

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        metrics = []
        if trial.state == TrialState.COMPLETE and trial.values:
            metrics.append(Metric("sweep/trial_value", trial.values[0], now_ms(), trial.number))
        best = best_trials(study)
        if best and len(study.directions) == 1:
            metrics.append(Metric("sweep/best_value", best[0].value, now_ms(), trial.number))
            self.tracker.set_tags(self.parent_id, {"best.trial": best[0].number, "best.value": best[0].value,
                                                   **{f"best.{k}": v for k, v in best[0].params.items()}})
        counts = state_counts(study)
        metrics.extend(Metric(f"sweep/n_{s.lower()}", counts[s], now_ms(), trial.number)
                       for s in ("COMPLETE", "PRUNED", "FAIL"))
        self.tracker.log_metrics(self.parent_id, metrics)


def finish_parent(sweep) -> None:
    """Leaderboard CSV, best trial JSON and Optuna's plots (HTML) on the parent run; a full disk is one line, never
    a failed sweep (the results are in the stores already, and `sweep.py run SPEC` on the study logs them again)."""
    try:
        _log_summaries(sweep.study, sweep.tracker, sweep.parent_id)
    except OSError as exc:
        print(f"[sweep] warning: the study's leaderboard and plots not all logged to its run ({exc}); rerun "
              f"`sweep.py run` on the study once there is space", file=sys.stderr, flush=True)


def _log_summaries(study: optuna.Study, tracker, parent_id: str) -> None:
    board = leaderboard(study)
    tracker.log_frame(parent_id, board, "leaderboard.csv")
    best = best_trials(study)
    if best:
        tracker.log_text(parent_id, json.dumps([{"number": t.number, "values": t.values, "params": t.params}
                                                for t in best], indent=2), "best_trials.json")
    plots = {"optimization_history": optuna.visualization.plot_optimization_history,
             "param_importances": optuna.visualization.plot_param_importances,
             "parallel_coordinate": optuna.visualization.plot_parallel_coordinate,
             "intermediate_values": optuna.visualization.plot_intermediate_values}
    with tempfile.TemporaryDirectory() as tmp:
        for name, plot in plots.items():
            try:
                figure = plot(study) if len(study.directions) == 1 else plot(study, target=lambda t: t.values[0])
            except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as exc:  # importances: 2+ trials
                tracker.set_tags(parent_id, {f"plot.{name}": f"skipped: {exc}"[:500]})
                continue
            path = Path(tmp) / f"{name}.html"
            figure.write_html(path, include_plotlyjs=True)
            tracker.log_file(parent_id, path, "optuna")
