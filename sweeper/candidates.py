"""Candidates: the users' own planned changes, run in the search and always confirmed against the baseline.

A candidate is `sweep.baseline` with the candidate's params on top (the base spec fills every key neither sets),
so "3 epochs" means "my current setting, with 3 epochs". In a new study it is enqueued right after the baseline
and fixes every search-space key: the values the space can propose become the trial's Optuna params (the
sampler learns from them like from any trial); the others (keys outside the space, values outside their range,
such as 3 epochs when the space samples 1..2) travel in the trial's user attr `extra_params`, are not sampled,
and are applied on top (sweeper/objective.py). A candidate is never pruned, and the confirmation stage re-runs it
with new seeds whatever its search rank (sweeper/confirm.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from critic.config import ExperimentConfig, SpecError, apply_overrides, build_config, flatten
from sweeper.space import SpaceEntry, contains

ATTRS = ("candidate", "extra_params")  # the user attrs that make a trial a candidate (kept when it is re-queued)
# Keys every trial of a study shares: the held-out split, and whether the confirmation split is scored (set by the
# confirmation stage on its own runs). Sampling them, or setting them per config, would compare apples and pears.
STUDY_FIXED_KEYS = ("data.val_fraction", "data.confirm_fraction", "data.split_seed", "eval.confirm_split")


@dataclass(frozen=True)
class Candidate:
    name: str
    params: dict[str, Any]  # search-space keys with values the space can propose: the trial's Optuna params
    extra: dict[str, Any]  # everything else the candidate fixes: applied on top, never sampled


def check_fixed_keys(keys: list[str], where: str) -> None:
    """The held-out split and its scoring are the study's, not a trial's: refuse them in `where`."""
    for key in keys:
        if key in STUDY_FIXED_KEYS:
            raise SpecError(f"{where}: {key} is the same for every trial of a study (the held-out split and the "
                            f"confirmation's scoring); set it in the spec's {key.split('.')[0]} section, not here")


def resolve_candidates(raw: dict[str, Any], cfg: ExperimentConfig, entries: list[SpaceEntry],
                       source: str) -> list[Candidate]:
    """Each sweep.candidates entry as the trial it enqueues; SpecError for one that is invalid, changes nothing
    or repeats another."""
    by_key = {entry.key: entry for entry in entries}
    baseline = cfg.sweep.baseline
    seen = {"sweep.baseline": _resolved(raw, baseline, f"{source} (sweep.baseline)")}
    out = []
    for index, candidate in enumerate(cfg.sweep.candidates):
        where = f"{source}: sweep.candidates[{index}] ({candidate.label!r})"
        check_fixed_keys(list(candidate.params), where)
        flat = _resolved(raw, {**baseline, **candidate.params}, where)
        same = next((name for name, other in seen.items() if other == flat), None)
        if same is not None:
            raise SpecError(f"{where} gives the same trial config as {same}; change a value or drop it")
        seen[f"candidate {candidate.label!r}"] = flat
        keys = list(dict.fromkeys([*by_key, *baseline, *candidate.params]))
        params = {k: flat[k] for k in keys if k in by_key and contains(by_key[k].distribution, flat[k])}
        out.append(Candidate(candidate.label, params, {k: flat[k] for k in keys if k not in params}))
    return out


def _resolved(raw: dict[str, Any], values: dict[str, Any], where: str) -> dict[str, Any]:
    """The flat trial config of the spec with `values` applied, validated like any spec (typed values)."""
    return flatten(build_config(apply_overrides(raw, values), where))


def enqueue_candidates(study: optuna.Study, candidates: list[Candidate]) -> None:
    for candidate in candidates:
        study.enqueue_trial(candidate.params, user_attrs={"candidate": candidate.name,
                                                          "extra_params": candidate.extra})
