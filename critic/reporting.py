"""How the engine streams metrics out. The engine knows this interface, not MLflow or Optuna.

The sweep passes a reporter that forwards to MLflow and asks Optuna whether to
prune; a reporter may raise to stop the trial (e.g. optuna.TrialPruned), and
the exception reaches the caller of `run_trial` unchanged.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


class Reporter:
    """No-op base: subclasses override what they need."""

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        """Called after every optimizer step with `critic/*` and `perf/*` metrics."""

    def log_eval(self, step: int, metrics: dict[str, float], pair_scores: pd.DataFrame | None = None,
                 final: bool = False) -> None:
        """Called after every held-out evaluation with `<set>/<metric>` metrics, the per-pair score table of
        every set they come from (critic/evaluate.py `score_frame`; the pruner's paired test reads it), and
        `final`: the evaluation after the last step (training is over: nothing left to prune)."""


class NullReporter(Reporter):
    pass


class RecordingReporter(Reporter):
    """Keeps every metric in memory: [(step, {...}), ...] for train and eval."""

    def __init__(self) -> None:
        self.train: list[tuple[int, dict[str, float]]] = []
        self.eval: list[tuple[int, dict[str, float]]] = []

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        self.train.append((step, dict(metrics)))

    def log_eval(self, step: int, metrics: dict[str, float], pair_scores: pd.DataFrame | None = None,
                 final: bool = False) -> None:
        self.eval.append((step, dict(metrics)))


class FanoutReporter(Reporter):
    """Sends every call to several reporters, in order."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        for reporter in self.reporters:
            reporter.log_train(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float], pair_scores: pd.DataFrame | None = None,
                 final: bool = False) -> None:
        for reporter in self.reporters:
            reporter.log_eval(step, metrics, pair_scores, final)


# Per-step metrics that jump with each batch's content get a trailing mean beside them, `critic/avg_<name>`:
# the trend at a glance. `avg_` because MLflow's chart view orders sections and the charts inside each one by
# name (JavaScript's sort), so `critic/avg_*` are its first charts; the report and figures draw them first too.
TRAILING = ("critic/d_acc", "critic/loss", "critic/score_diff")


def trailing_name(key: str) -> str:
    """'critic/d_acc' -> 'critic/avg_d_acc', the name of its trailing mean."""
    section, _, name = key.rpartition("/")
    return f"{section}/avg_{name}"


class TrailingMeans:
    """The mean of each TRAILING metric over the last `window` steps (all steps so far while fewer)."""

    def __init__(self, window: int) -> None:
        self.recent = {key: collections.deque(maxlen=window) for key in TRAILING}

    def __call__(self, metrics: dict[str, float]) -> dict[str, float]:
        """Add one step's metrics; returns `critic/avg_*` for this step."""
        out = {}
        for key, recent in self.recent.items():
            if key in metrics:
                recent.append(metrics[key])
                out[trailing_name(key)] = float(sum(recent) / len(recent))
        return out


def series(history, key: str):
    """(steps, values) of one metric in a [(step, {metric: value}), ...] history, as float arrays; NaNs dropped."""
    import math

    import numpy as np
    points = [(step, metrics[key]) for step, metrics in history if key in metrics and math.isfinite(metrics[key])]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
