"""Read a study without the engine or MLflow: open it, count and tabulate its trials, show its confirmation.

`status` and `best` only read the Optuna storage; keeping what they need here (optuna, pandas, the storage
helpers) and out of sweeper.study / runner / confirm_stage, which pull in torch, transformers and MLflow,
keeps those commands well under a second. The other modules re-export these names.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from critic.config import SpecError
from sweeper.stores import make_storage, mask

CONFIRM_SUFFIX = ".confirm"  # <search study><suffix> holds its confirmation runs


def load_study(storage_url: str, study_name: str | None = None) -> optuna.Study:
    """Load a study by name; without a name, the only search study in the storage (its confirmation belongs to it)."""
    storage = make_storage(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    name = study_name
    if name is None:
        searches = [n for n in names if not n.endswith(CONFIRM_SUFFIX)]
        if len(searches) != 1:
            raise SpecError(f"pass --study NAME; the storage holds {names or 'no studies'}")
        name = searches[0]
    if name not in names:
        raise SpecError(f"study {name!r} not found in {mask(storage_url)}; existing: {names or 'none'}")
    return optuna.load_study(study_name=name, storage=storage)


def trial_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """What sets a trial's config apart from the spec: its Optuna params, then the values a candidate fixes outside
    the search space or its ranges (user attr `extra_params`, sweeper/candidates.py)."""
    return {**trial.params, **trial.user_attrs.get("extra_params", {})}


def candidate_name(trial: optuna.trial.FrozenTrial) -> str | None:
    """The sweep.candidates name of a trial that runs one of your planned changes, else None."""
    return trial.user_attrs.get("candidate")


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {s.name: 0 for s in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] += 1
    return counts


def leaderboard(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value(s), params, reason, duration, baseline flag (and the cluster job
    that ran it, where one did)."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    named = any(candidate_name(t) is not None for t in trials)  # a column only where the study has candidates
    jobs = any("job" in t.user_attrs for t in trials)  # run by a Slurm or Ray launcher (sweeper/cluster.py)
    retried = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}  # see CloseAndRetry
    for t in trials:
        row = {"number": t.number, "state": t.state.name,
               "baseline": bool(t.user_attrs.get("baseline", False)),
               **({"candidate": candidate_name(t) or ""} if named else {}),
               "duration_s": t.duration.total_seconds() if t.duration else math.nan}
        values = t.values or [math.nan] * len(study.directions)
        for i, value in enumerate(values):
            row["value" if len(values) == 1 else f"value_{i}"] = value
        row.update({f"param:{k}": v for k, v in trial_params(t).items()})
        retry = retried.get(t.number)
        reason = t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason") or (
            retry.user_attrs.get("retry_reason", "worker died (no heartbeat)") if retry else "")
        row["reason"] = f"{reason}; re-run as trial {retry.number}" if retry else reason
        if jobs:
            row["job"] = t.user_attrs.get("job", "")
        rows.append(row)
    return pd.DataFrame(rows)


def count_failures(study: optuna.Study) -> int:
    """Trials that failed for a recorded reason; stale (re-queued) and interrupted trials do not count."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
               if t.user_attrs.get("fail_reason") not in (None, "interrupted"))


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def stored_confirmation(study: optuna.Study) -> dict[str, Any] | None:
    """The confirmation result stored on the search study (or None)."""
    text = study.user_attrs.get("confirmation")
    return json.loads(text) if text else None


def split_text(result: dict[str, Any]) -> str:
    """Which pairs a stored confirmation scored, in the words every place that shows it uses (sweeper/confirm.py)."""
    if "split" in result:
        return result["split"]["text"]
    return "on the held-out pairs that also selected the finalists"  # stored before the confirmation split existed


def format_table(result: dict[str, Any]) -> str:
    """The confirmation table: one row per config (mean with its interval, difference to the baseline, verdict).

    The verdict reads the simultaneous interval (sim_low, sim_high: Bonferroni over the finalists); the raw
    95% interval of each comparison alone is beside it. Results stored before both existed show NaN there.
    """
    frame = pd.DataFrame(result["table"])
    columns = ["config", "trial", "seeds", "mean_mean", "mean_low", "mean_high", "diff_mean", "diff_low",
               "diff_high", "diff_raw_low", "diff_raw_high", "p_value", "p_adjusted", "verdict"]
    shown = frame.reindex(columns=columns).rename(columns={
        "mean_mean": "mean", "mean_low": "low", "mean_high": "high", "diff_mean": "diff", "diff_low": "sim_low",
        "diff_high": "sim_high", "diff_raw_low": "raw_low", "diff_raw_high": "raw_high", "p_adjusted": "p_adj"})
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def show_bars(progress: bool) -> bool:
    """Progress bars only on a terminal: redirected output (`make sweep > log`) gets one line per trial instead."""
    return progress and sys.stdout.isatty() and sys.stderr.isatty()


def trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """One line for a finished trial: number, state, value(s), duration, params and why it was pruned or failed."""
    values = trial.values or []
    value = (f" value={values[0]:.4f}" if len(values) == 1 else
             " values=[" + ", ".join(f"{v:.4f}" for v in values) + "]" if values else "")
    duration = f" in {trial.duration.total_seconds():.1f}s" if trial.duration else ""
    baseline = " (baseline)" if trial.user_attrs.get("baseline") else ""
    if candidate_name(trial) is not None:
        baseline = f" (candidate {candidate_name(trial)!r})"
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial_params(trial).items())
    reason = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("prune_reason") or ""
    reason = f" -- {' '.join(reason.split())[:160]}" if reason and trial.state != TrialState.COMPLETE else ""
    label = f"trial {trial.number}"
    if trial.user_attrs.get("stage") == "confirm":  # a run of the `<study>.confirm` study: say what it confirms
        label = f"confirm {trial.user_attrs.get('confirm_config')} seed {trial.user_attrs.get('seed_index')}"
        baseline = ""
    return f"[{label}] {trial.state.name}{value}{duration}{baseline} {params}{reason}".rstrip()
