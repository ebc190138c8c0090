"""Export the best trial: a complete experiment spec (yaml/json) or Hydra overrides for verl's critic."""

from __future__ import annotations

import json
import sys
import typing
from typing import Any

import optuna
import yaml

from critic.config import SpecError, one_of, to_dict
from critic.sections import ExportFormat
from sweeper.board import best_trials, candidate_name, split_text, trial_params
from sweeper.confirm import stored_confirmation
from sweeper.study import SweepSpec, config_for
from sweeper.verl_export import verl_export


def pick_trial(study: optuna.Study, number: int | None = None) -> optuna.trial.FrozenTrial:
    """The given trial; else the confirmed winner; else the best search trial (single seed)."""
    if number is None:
        confirmed = stored_confirmation(study)
        number = confirmed["winner"] if confirmed else None
    if number is not None:
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not matches:
            raise SpecError(f"trial {number} does not exist in study {study.study_name!r}")
        return matches[0]
    best = best_trials(study)
    if not best:
        raise SpecError(f"study {study.study_name!r} has no COMPLETE trial yet; run the sweep first")
    return best[0]


def confirmation_note(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> tuple[bool, list[str]]:
    """(shown better than the baseline, or is the baseline; lines saying what the confirmation measured)."""
    result = stored_confirmation(study)
    if result is None:
        return False, [f"NOT CONFIRMED: trial {trial.number}'s value is one seed, and the best of many one-seed "
                       f"trials is biased upward; run `sweep.py confirm` to re-run it with new seeds"]
    metric = result["metric"]
    row = next((r for r in result["table"] if r["trial"] == trial.number), None)
    if row is None:
        confirmed = ", ".join(str(r["trial"]) for r in result["table"])
        return False, [f"NOT CONFIRMED: trial {trial.number} is not among the confirmed trials ({confirmed}); "
                       f"run `sweep.py confirm --trials {trial.number}`"]
    measured = (f"confirmed over {row['seeds']} seeds {split_text(result)}: {metric} = "
                f"{row['mean_mean']:.4f} [{row['mean_low']:.4f}, {row['mean_high']:.4f}]")
    if row["config"] == "baseline":
        return True, [measured + " (this is the baseline)"]
    if "p_adjusted" in row:
        how = f"{row['diff_level']:.1%} simultaneous interval, p={row['p_adjusted']:.3g} (Bonferroni)"
    else:  # stored before issue 18: a 95% interval per comparison and Holm-adjusted p
        how = f"95% interval, p={row['p_holm']:.3g} (Holm)"
    versus = (f"vs baseline: {row['diff_mean']:+.4f} [{row['diff_low']:+.4f}, {row['diff_high']:+.4f}], {how}, "
              f"verdict: {row['verdict']}")
    if row["verdict"] != "better":
        return False, [f"NOT SHOWN BETTER than the baseline (trial {_baseline_trial(result)}): {versus}",
                       measured, f"keep the baseline (export --trial {_baseline_trial(result)}) or widen the search"]
    return True, [measured, versus]


def _baseline_trial(result: dict) -> int:
    return result["table"][0]["trial"]


def trial_spec(spec: SweepSpec, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The complete spec of a trial: base spec + its params, without the sweep section's search."""
    out = to_dict(config_for(spec, trial_params(trial), f"trial {trial.number}"))
    out.pop("sweep", None)
    return out


def render(spec: SweepSpec, trial: optuna.trial.FrozenTrial, fmt: str, verl_version: str | None = None,
           verl_worker: str | None = None, confirmation: list[str] = (), weights: str | None = None,
           sync_step: int | None = None) -> str:
    """The trial as yaml/json spec or verl overrides; `confirmation` lines go into the header (json: a field).

    `weights`: the directory the trial's saved critic was written to (a LoRA trial's adapter is in weights/adapter).
    `sync_step`: the target verl run's V1 separate_async parameter_sync_step (`export --against`).
    """
    name = f" (your planned change {candidate_name(trial)!r})" if candidate_name(trial) is not None else ""
    header = (f"trial {trial.number}{name} of study {spec.cfg.sweep.study_name}: search value(s) {trial.values} "
              f"(one seed), params {trial_params(trial)}" + "".join(f"\n# {line}" for line in confirmation))
    if fmt == "yaml":
        return f"# {header}\n# Runs as is: python sweep.py train THIS_FILE\n" + yaml.safe_dump(
            trial_spec(spec, trial), sort_keys=False)
    if fmt == "json":
        return json.dumps({"trial": trial.number, "values": trial.values, "params": trial_params(trial),
                           "confirmation": list(confirmation), "spec": trial_spec(spec, trial)}, indent=2)
    if fmt == "verl":  # sweeper/verl_export.py: verl's keys for that version, in verl's units
        exported = verl_export(spec, trial, verl_version, verl_worker, weights, sync_step)
        for note in exported.notes:
            print(f"[sweep] verl export note: {note}", file=sys.stderr)
        return f"# {header}\n" + exported.text()
    raise SpecError(f"--format must be {one_of(typing.get_args(ExportFormat))}, got {fmt!r}")
