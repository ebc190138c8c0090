"""The sweep spec and what a study is made of: validation before any trial, each trial's config, the fingerprint a
resumed study must match, the sampler.

The spec, its search space and the MLflow parent run id are stored in the
study's user attributes (sweeper/sweep.py), so a worker on any machine only
needs the study name and the storage URL.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from critic.config import (
    CONFIRM_SET,
    ExperimentConfig,
    SpecError,
    SweepConfig,
    allowed_values,
    apply_overrides,
    build_config,
    flatten,
    read_spec,
)
from critic.metrics import PAIR_METRICS
from sweeper.board import CONFIRM_SUFFIX, load_study, state_counts  # noqa: F401  (re-exported; board reads studies)
from sweeper.candidates import Candidate, check_fixed_keys, resolve_candidates
from sweeper.pruning import check_pruner
from sweeper.space import SpaceEntry, check_effective, check_in_space, parse_space, space_signature
from sweeper.tracking import git_commit

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # a trial that needs no rerun
MULTI_OBJECTIVE_SAMPLERS = ("nsga2", "gp", "random")  # of sweep.sampler's values, those for several objectives
_EVAL_METRICS = set(PAIR_METRICS)  # what pair_metrics reports for every set
_TRAIN_METRICS = {"train/progressive_d_acc", "train/gap_progressive_minus_val"}


@dataclass
class SweepSpec:
    raw: dict[str, Any]  # the spec with --set overrides applied
    cfg: ExperimentConfig
    entries: list[SpaceEntry]
    source: str
    warnings: list[str] = field(default_factory=list)  # ranges that partly cannot take effect (printed by run/init)
    candidates: list[Candidate] = field(default_factory=list)  # sweep.candidates, as enqueued


def _check_objectives(cfg: ExperimentConfig, source: str) -> None:
    names, directions = cfg.sweep.objectives, cfg.sweep.directions
    if len(names) != len(directions):
        raise SpecError(f"{source}: sweep.objective has {len(names)} entries but sweep.direction has {len(directions)}")
    sets = {"val", *cfg.data.eval_sets}
    for name in names:
        set_name, _, metric = name.partition("/")
        if set_name == CONFIRM_SET:
            raise SpecError(f"{source}: sweep.objective {name!r}: the search never scores the confirmation split "
                            f"(it is kept for the confirmation stage, which compares val/<metric> there); use "
                            f"val/{metric}")
        if name not in _TRAIN_METRICS and not (set_name in sets and metric in _EVAL_METRICS):
            raise SpecError(f"{source}: sweep.objective {name!r} is not a metric the engine reports; use "
                            f"<set>/<metric> with set in {sorted(sets)} and metric in {sorted(_EVAL_METRICS)}, "
                            f"or one of {sorted(_TRAIN_METRICS)}")
    for direction in directions:
        if direction not in ("maximize", "minimize"):
            raise SpecError(f"{source}: sweep.direction must be maximize or minimize, got {direction!r}")
    multi = len(names) > 1
    samplers = MULTI_OBJECTIVE_SAMPLERS if multi else \
        tuple(s for s in allowed_values(SweepConfig, "sampler") if s != "nsga2")  # NSGA-II needs several objectives
    if cfg.sweep.sampler not in samplers:
        raise SpecError(f"{source}: sweep.sampler {cfg.sweep.sampler!r} is not available for a "
                        f"{'multi' if multi else 'single'}-objective study; choose one of {', '.join(samplers)}")
    check_pruner(cfg, names, source)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.sweep.study_name):
        raise SpecError(f"{source}: sweep.study_name may use letters, digits, '-', '_' and '.', got "
                        f"{cfg.sweep.study_name!r}")


def load_sweep_spec(path: str, overrides: list[str] | None = None, raw: dict | None = None) -> SweepSpec:
    """Read and validate everything a sweep needs before any trial runs."""
    source = str(path)
    raw = apply_overrides(raw if raw is not None else read_spec(path), overrides or [])
    cfg = build_config(raw, source)
    _check_objectives(cfg, source)
    check_fixed_keys(list(cfg.sweep.search_space), f"{source}: sweep.search_space")
    check_fixed_keys(list(cfg.sweep.baseline), f"{source}: sweep.baseline")
    if cfg.eval.confirm_split:
        raise SpecError(f"{source}: eval.confirm_split is for the confirmation stage's own runs (search trials never "
                        f"score the confirmation split); remove it from the spec")
    entries = parse_space(cfg.sweep.search_space)
    if not entries:
        raise SpecError(f"{source}: sweep.search_space is empty; add entries like "
                        "train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}")
    check_in_space(entries, cfg.sweep.baseline, f"{source}: sweep.baseline")
    warnings_ = check_effective(entries, flatten(cfg), source)
    for entry in entries:  # each bound on its own must give a valid trial config
        values = entry.distribution.choices if hasattr(entry.distribution, "choices") else \
            [entry.distribution.low, entry.distribution.high]
        for value in values:
            build_config(apply_overrides(raw, {entry.key: value}), f"{source} (search_space {entry.key}={value})")
    build_config(apply_overrides(raw, cfg.sweep.baseline), f"{source} (sweep.baseline)")
    candidates = resolve_candidates(raw, cfg, entries, source)
    return SweepSpec(raw, cfg, entries, source, warnings_, candidates)


def config_for(spec: SweepSpec | dict[str, Any], params: dict[str, Any], source: str) -> ExperimentConfig:
    """The config of one trial: the spec (or its raw mapping) with the trial's params applied, validated."""
    raw = spec.raw if isinstance(spec, SweepSpec) else spec
    return build_config(apply_overrides(raw, params), source)


class SweepStopped(RuntimeError):
    """The study stopped on purpose (too many failures); the message says why."""


def finished_count(counts: dict[str, int]) -> int:
    """Trials that count towards n_trials, from `state_counts`: COMPLETE or PRUNED (a FAIL is retried)."""
    return sum(counts[state.name] for state in FINISHED)


def fingerprint(spec: SweepSpec) -> dict[str, Any]:
    """What must match to resume a study: objective(s), direction(s), the search space, and the held-out split
    (another val or confirmation split scores the resumed trials on other pairs than the stored ones)."""
    d = spec.cfg.data
    split = {"train_path": d.train_path, "val_fraction": d.val_fraction, "confirm_fraction": d.confirm_fraction,
             "split_seed": d.split_seed, "fold": d.fold, "n_folds": d.n_folds}
    return {"objective": spec.cfg.sweep.objective, "direction": spec.cfg.sweep.direction,
            "search_space": space_signature(spec.entries), "split": split}


def fingerprint_differs(stored: dict[str, Any], spec: SweepSpec) -> bool:
    """Compared on the keys the stored fingerprint has: studies made before "split" existed resume as before."""
    current = json.loads(json.dumps(fingerprint(spec)))
    return any(json.loads(json.dumps(value)) != current.get(key) for key, value in stored.items())


def make_sampler(spec: SweepSpec, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    # Distinct seeds per worker: identical seeds would make parallel workers propose identical trials.
    seed = spec.cfg.sweep.seed + worker_index
    name = spec.cfg.sweep.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, multivariate=True, group=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed)


def run_tags(spec: SweepSpec, study_name: str) -> dict[str, str]:
    return {"sweep.study": study_name, "sweep.sampler": spec.cfg.sweep.sampler, "sweep.pruner": spec.cfg.sweep.pruner,
            "git.commit": git_commit(), "sweep.objective": json.dumps(spec.cfg.sweep.objective)}


def stored_spec(study: optuna.Study) -> SweepSpec:
    """The sweep spec stored in the study's user attributes (at its creation), validated again: the one place a
    spec is rebuilt from a study, for workers, `confirm`, `export` and `status --watch`."""
    attrs = study.user_attrs
    return load_sweep_spec(attrs.get("spec_source", "<study>"), raw=json.loads(attrs["spec"]))
