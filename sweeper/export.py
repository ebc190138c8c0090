"""Export the best trial: a complete experiment spec (yaml/json) or Hydra overrides for verl's critic."""

from __future__ import annotations

import json
from typing import Any

import optuna
import yaml

from critic.config import SpecError, apply_overrides, build_config, to_dict
from sweeper.runner import best_trials
from sweeper.study import SweepSpec

# Our key -> verl's critic key (verl's FSDP critic worker config).
VERL_KEYS = {
    "train.lr": "critic.optim.lr",
    "train.warmup_steps": "critic.optim.lr_warmup_steps",
    "train.scheduler": "critic.optim.lr_scheduler_type",
    "train.epochs": "trainer.total_epochs",
    "train.grad_clip": "critic.grad_clip",
    "train.weight_decay": "critic.optim.weight_decay",
}


def pick_trial(study: optuna.Study, number: int | None = None) -> optuna.trial.FrozenTrial:
    if number is not None:
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not matches:
            raise SpecError(f"trial {number} does not exist in study {study.study_name!r}")
        return matches[0]
    best = best_trials(study)
    if not best:
        raise SpecError(f"study {study.study_name!r} has no COMPLETE trial yet; run the sweep first")
    return best[0]


def trial_spec(spec: SweepSpec, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The complete spec of a trial: base spec + its params, without the sweep section's search."""
    raw = apply_overrides(spec.raw, trial.params)
    cfg = build_config(raw, f"trial {trial.number}")
    out = to_dict(cfg)
    out.pop("sweep", None)
    return out


def _verl_value(key: str, value: Any) -> str:
    if key == "train.scheduler" and value == "linear":
        raise SpecError("verl's critic supports lr_scheduler_type constant or cosine, not linear; "
                        "drop 'linear' from the search space or export as yaml")
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def verl_overrides(spec: SweepSpec, trial: optuna.trial.FrozenTrial) -> list[str]:
    """Hydra overrides for verl; keys verl does not define come from export.verl_keys as +key=value."""
    flat = {f"{section}.{k}": v for section, values in trial_spec(spec, trial).items() for k, v in values.items()}
    lines = [f"{verl}={_verl_value(ours, flat[ours])}" for ours, verl in VERL_KEYS.items()]
    for ours, verl in spec.cfg.export.verl_keys.items():
        if ours not in flat:
            raise SpecError(f"export.verl_keys: {ours!r} is not a config key (e.g. loss.temperature)")
        lines.append(f"{verl if verl.startswith('+') else '+' + verl}={_verl_value(ours, flat[ours])}")
    return lines


def render(spec: SweepSpec, trial: optuna.trial.FrozenTrial, fmt: str) -> str:
    header = (f"best trial {trial.number} of study {spec.cfg.sweep.study_name}: value(s) {trial.values}, "
              f"params {trial.params}")
    if fmt == "yaml":
        return f"# {header}\n# Runs as is: python sweep.py train THIS_FILE\n" + yaml.safe_dump(
            trial_spec(spec, trial), sort_keys=False)
    if fmt == "json":
        return json.dumps({"trial": trial.number, "values": trial.values, "params": trial.params,
                           "spec": trial_spec(spec, trial)}, indent=2)
    if fmt == "verl":
        comment = ("# Hydra overrides for verl's critic. lr_warmup_steps is written explicitly (>= 0), so verl does\n"
                   "# not fall back to lr_warmup_steps_ratio (it only does for negative values). Step counts are\n"
                   "# optimizer steps of this tool's batch size: rescale warmup if verl's critic batch differs.\n")
        return f"# {header}\n{comment}" + " \\\n".join(verl_overrides(spec, trial)) + "\n"
    raise SpecError(f"--format must be yaml, json or verl, got {fmt!r}")
