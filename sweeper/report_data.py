"""What the study report shows, read with few store calls: trials from Optuna, curves from MLflow.

One `search_runs` finds the study's trial runs (by the tags `sweep.study` and `sweep.role`, which every
trial run carries however runs are nested in the UI); then one history read per metric for all runs at
once where the store allows it (the SQL store), else one per run and metric. Curves longer than
MAX_POINTS are averaged over equal step bins, so a report of hundreds of long trials stays a few MB.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import optuna
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from critic.reporting import TRAILING, trailing_name
from critic.sections import LOGGED_PREFIXES
from sweeper.board import best_trials, candidate_name, trial_params

TRAIN_CURVES = (*map(trailing_name, TRAILING), *TRAILING)  # the trailing means first (the trend), then each step
MAX_POINTS = 150  # per curve: enough to see a trend, small enough for hundreds of trials
_RUN_PAGE = 1000
_IDS_PER_QUERY = 500  # run ids per SQL `IN (...)`
KINDS = ("baseline", "candidate", "best", "complete", "pruned", "failed", "running")  # drawing order: highlighted last


@dataclass(frozen=True)
class TrialCurves:
    number: int
    kind: str  # one of KINDS
    state: str
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # metric -> (steps, values)


@dataclass(frozen=True)
class ReportData:
    study_name: str
    objectives: list[str]
    directions: list[str]
    trials: list[FrozenTrial]
    kinds: dict[int, str]  # trial number -> one of KINDS
    candidates: dict[int, str]  # trial number -> the name of the planned change it runs (sweep.candidates)
    curves: list[TrialCurves]
    train_keys: list[str]
    heldout_keys: list[str]
    comparison: list[tuple[str, FrozenTrial | None, dict[str, float]]]  # best_vs_baseline
    param_keys: list[str]
    confirmation: dict | None


def best_vs_baseline(study: optuna.Study) -> list[tuple[str, FrozenTrial | None, dict[str, float]]]:
    """[("best", trial, metrics), ("baseline", trial, metrics), then (name, trial, metrics) per candidate]: the
    trials' stored metrics (user attr `metrics`)."""
    best = best_trials(study)
    trials = study.get_trials(deepcopy=False)
    baseline = [t for t in trials if t.user_attrs.get("baseline")]  # several: an interrupted one was re-run
    latest = max(baseline, key=lambda t: (t.state == TrialState.COMPLETE, t.number)) if baseline else None
    columns = [("best", best[0] if best else None), ("baseline", latest)]
    columns += list({candidate_name(t): t for t in trials if candidate_name(t) is not None}.items())
    return [(name, t, json.loads(t.user_attrs.get("metrics", "{}")) if t else {}) for name, t in columns]


def trial_kinds(study: optuna.Study) -> dict[int, str]:
    """baseline, candidates and best (the Pareto front when multi-objective) first, else by state."""
    best = {t.number for t in best_trials(study)}
    by_state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    kinds = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("baseline"):
            kinds[trial.number] = "baseline"
        elif candidate_name(trial) is not None:
            kinds[trial.number] = "candidate"
        elif trial.number in best:
            kinds[trial.number] = "best"
        else:
            kinds[trial.number] = by_state.get(trial.state, "running")
    return kinds


def trial_runs(client: MlflowClient, experiment_id: str, study_name: str) -> dict[int, tuple[str, set[str]]]:
    """trial number -> (MLflow run id, the metric keys it logged) of the study's search trials (1000 runs a call)."""
    query = f"tags.`sweep.study` = '{study_name}' and tags.`sweep.role` = 'trial'"
    runs, token = {}, None
    while True:
        page = client.search_runs([experiment_id], query, max_results=_RUN_PAGE, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        for run in page:
            number = run.data.tags.get("sweep.trial")
            if number is not None and number.isdigit():  # a later run of the same number (a retry) wins
                runs[int(number)] = (run.info.run_id, set(run.data.metrics))
        token = page.token
        if not token:
            return runs


def bulk_history_reader(client: MlflowClient):
    """The SQL store's get_metric_history_bulk (one metric of many runs in one query), or None.

    MLflow's client has no public method for it (3.x), and one get_metric_history call per run is ~100x slower for a
    study's hundreds of runs, so the store is reached through the client's private `_tracking_client`.
    tests/test_report.py fails when this path stops being taken on a SQL store; REST and file stores lack the method
    and get the public per-run path."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return getattr(store, "get_metric_history_bulk", None)


def metric_histories(client: MlflowClient, run_ids: list[str], key: str) -> dict[str, list[tuple[int, float]]]:
    """run id -> [(step, value)] of one metric, sorted by step; one query per 500 runs on a SQL store."""
    bulk = bulk_history_reader(client)
    out: dict[str, list[tuple[int, float]]] = {run_id: [] for run_id in run_ids}
    if bulk is not None:
        for start in range(0, len(run_ids), _IDS_PER_QUERY):
            for item in bulk(run_ids[start:start + _IDS_PER_QUERY], key, max_results=10**9):
                out[item.run_id].append((item.step, item.value))
    else:
        for run_id in run_ids:
            out[run_id] = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
    return {run_id: sorted(points) for run_id, points in out.items()}


def downsample(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Means over `max_points` bins of consecutive points (steps and values alike); short curves unchanged."""
    finite = np.isfinite(values)
    steps, values = steps[finite], values[finite]
    if len(steps) <= max_points:
        return steps.astype(np.float32), values.astype(np.float32)
    bins = np.array_split(np.arange(len(steps)), max_points)
    return (np.array([steps[b].mean() for b in bins], dtype=np.float32),
            np.array([values[b].mean() for b in bins], dtype=np.float32))


def curve_keys(logged: set[str]) -> tuple[list[str], list[str]]:
    """(training curves, held-out curves) among the logged keys: val first, then the other sets' d_acc."""
    train = [k for k in TRAIN_CURVES if k in logged]
    sets = sorted({k.split("/", 1)[0] for k in logged if k.endswith("/d_acc")} - {*LOGGED_PREFIXES, "val"})
    heldout = [k for k in ("val/d_acc", "val/score_diff", *(f"{s}/d_acc" for s in sets)) if k in logged]
    return train, heldout


def param_order(study: optuna.Study) -> list[str]:
    """The search space's keys in the spec's order (as `run`'s table lists them), then any other sampled key."""
    try:
        keys = list(json.loads(study.user_attrs["spec"])["sweep"]["search_space"])
    except (KeyError, TypeError, ValueError):
        keys = []
    for trial in study.get_trials(deepcopy=False):
        keys += [k for k in trial_params(trial) if k not in keys]
    return keys


def gather(study: optuna.Study, client: MlflowClient) -> ReportData:
    """Everything the report draws; MLflow calls: a few searches plus one history read per curve metric."""
    from sweeper.board import stored_confirmation

    trials = study.get_trials(deepcopy=False)
    kinds = trial_kinds(study)
    experiment_id = study.user_attrs.get("mlflow_experiment_id")
    runs = trial_runs(client, experiment_id, study.study_name) if experiment_id else {}
    runs = {n: run for n, run in runs.items() if n in kinds}
    run_ids = [run_id for run_id, _ in runs.values()]
    train_keys, heldout_keys = curve_keys(set().union(*(keys for _, keys in runs.values())))
    histories = {key: metric_histories(client, run_ids, key) for key in (*train_keys, *heldout_keys)}
    curves = []
    for trial in trials:
        run_id = runs.get(trial.number, (None, None))[0]
        series = {}
        for key, by_run in histories.items():
            points = by_run.get(run_id) or []
            if points:
                steps, values = np.array(points, dtype=np.float64).T
                series[key] = downsample(steps, values)
        curves.append(TrialCurves(trial.number, kinds[trial.number], trial.state.name, series))
    directions = ["maximize" if d == optuna.study.StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
    try:
        names = json.loads(study.user_attrs["spec"])["sweep"]["objective"]
    except (KeyError, TypeError, ValueError):
        names = [f"objective {i}" for i in range(len(directions))]
    names = names if isinstance(names, list) else [names]
    candidates = {t.number: candidate_name(t) for t in trials if candidate_name(t) is not None}
    return ReportData(study.study_name, names, directions, trials, kinds, candidates, curves, train_keys,
                      heldout_keys, best_vs_baseline(study), param_order(study), stored_confirmation(study))


def running_best(values: list[float], maximize: bool) -> list[float]:
    """The best value so far at each position; NaN (no finished value) keeps the previous best."""
    best, out = math.nan, []
    for value in values:
        if math.isfinite(value) and (math.isnan(best) or (value > best if maximize else value < best)):
            best = value
        out.append(best)
    return out
