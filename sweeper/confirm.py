"""The confirmation stage: re-run the finalists and the baseline with new seeds, then compare them.

A search trial is one seed; the best of many noisy trials is the one whose seed was luckiest. So the
top-K distinct configurations and the baseline are re-run with seed indices 1..S (the search ran
index 0, whose result selected the finalists and would bias them upward), each index setting both
train.seed (data order) and model.init_seed (value head / tiny critic) to base + index, on the same
held-out pairs. The runs live in a second Optuna study `<study>.confirm` in the same storage: one
enqueued trial per (configuration, seed) with the configuration's params fixed, so workers claim
them like search trials, an interrupted run is enqueued again and a finished one is never repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from critic.config import ExperimentConfig, SpecError
from sweeper.board import stored_confirmation  # noqa: F401  (re-exported; `best` reads it without the engine)
from sweeper.stores import make_storage
from sweeper.study import CONFIRM_SUFFIX, FINISHED, SweepSpec

STAGE_ATTRS = ("stage", "confirm_config", "config_trial", "seed_index")  # kept when a dead worker's trial is re-queued


def confirm_study_name(search_study: str) -> str:
    return search_study + CONFIRM_SUFFIX


def seed_overrides(cfg: ExperimentConfig, seed_index: int) -> dict[str, int]:
    """Seed index -> the spec values it sets (index 0 = the spec's own seeds, as in the search)."""
    if not seed_index:
        return {}
    return {"train.seed": cfg.train.seed + seed_index, "model.init_seed": cfg.model.init_seed + seed_index}


@dataclass(frozen=True)
class PlanItem:
    config: str  # "baseline" or "trial-<n>"
    trial: int  # the search trial whose parameters are replicated
    params: dict[str, Any]
    seed: int  # seed index, >= 1


def _label(trial: FrozenTrial, is_baseline: bool) -> str:
    return "baseline" if is_baseline else f"trial-{trial.number}"


def choose_finalists(study: optuna.Study, top_k: int, numbers: list[int] | None = None
                     ) -> tuple[FrozenTrial, list[FrozenTrial]]:
    """The baseline trial and the finalists: the given trial numbers, or the top_k distinct COMPLETE configs.

    Automatic choice skips the baseline and trials whose params equal it or an earlier finalist:
    re-running them would only re-measure the same configuration.
    """
    trials = study.get_trials(deepcopy=False)
    baselines = [t for t in trials if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE]
    if not baselines:
        raise SpecError(f"study {study.study_name!r} has no COMPLETE baseline trial; confirmation compares "
                        f"finalists to sweep.baseline (the setting you use today): set it in the spec and "
                        f"run the sweep with --new-study")
    baseline = baselines[0]
    if numbers:
        by_number = {t.number: t for t in trials}
        missing = [n for n in numbers if n not in by_number or by_number[n].state != TrialState.COMPLETE]
        if missing:
            raise SpecError(f"--trials: {missing} are not COMPLETE trials of study {study.study_name!r}")
        return baseline, [by_number[n] for n in numbers if n != baseline.number]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("baseline")]
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    complete.sort(key=lambda t: (-t.values[0] if maximize else t.values[0], t.number))
    finalists, seen = [], [baseline.params]
    for trial in complete:
        if trial.params not in seen:
            finalists.append(trial)
            seen.append(trial.params)
        if len(finalists) == top_k:
            break
    return baseline, finalists


def make_plan(baseline: FrozenTrial, finalists: list[FrozenTrial], seeds: int) -> list[PlanItem]:
    configs = [(baseline, True)] + [(t, False) for t in finalists]
    return [PlanItem(_label(t, b), t.number, dict(t.params), s) for s in range(1, seeds + 1) for t, b in configs]


class ConfirmPlan:
    """The runner's view of a confirmation study: which (config, seed) runs are done, and enqueueing the rest."""

    def __init__(self, items: list[PlanItem]) -> None:
        self.items = items
        self.n_trials = len(items)
        self.is_search = False

    @classmethod
    def of(cls, study: optuna.Study) -> "ConfirmPlan":
        return cls([PlanItem(**item) for item in study.user_attrs["confirm_plan"]])

    @staticmethod
    def key(trial: FrozenTrial) -> tuple[str, int]:
        return trial.user_attrs.get("confirm_config", ""), int(trial.user_attrs.get("seed_index", -1))

    @staticmethod
    def _settled(trial: FrozenTrial) -> bool:
        """Done for good: a value, a prune (diverged), or a failure with a reason other than an interrupt."""
        if trial.state in FINISHED:
            return True
        return trial.state == TrialState.FAIL and trial.user_attrs.get("fail_reason") not in (None, "interrupted")

    def finished(self, study: optuna.Study, counts: dict[str, int]) -> int:
        wanted = {(i.config, i.seed) for i in self.items}
        return len({self.key(t) for t in study.get_trials(deepcopy=False) if self._settled(t)} & wanted)

    def refill(self, study: optuna.Study) -> None:
        """Enqueue every planned run that has no settled, waiting or running trial (called under the lock)."""
        busy = {self.key(t) for t in study.get_trials(deepcopy=False)
                if self._settled(t) or t.state in (TrialState.WAITING, TrialState.RUNNING)}
        for item in self.items:
            if (item.config, item.seed) not in busy:
                study.enqueue_trial(item.params, user_attrs={
                    "stage": "confirm", "confirm_config": item.config, "config_trial": item.trial,
                    "seed_index": item.seed,
                    "baseline": item.config == "baseline"})


def open_confirm_study(search: optuna.Study, spec: SweepSpec, storage_url: str, items: list[PlanItem]
                       ) -> optuna.Study:
    """Create or load `<study>.confirm` beside the search study; store the plan and what workers need."""
    storage = make_storage(storage_url, spec.cfg.sweep.heartbeat_interval, spec.cfg.sweep.grace_period)
    study = optuna.create_study(study_name=confirm_study_name(search.study_name), storage=storage,
                                directions=search.directions, sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.NopPruner(), load_if_exists=True)
    for key in ("spec", "spec_source", "mlflow_parent_run_id", "mlflow_experiment_id"):
        if key in search.user_attrs and key not in study.user_attrs:
            study.set_user_attr(key, search.user_attrs[key])
    study.set_user_attr("confirm_of", search.study_name)
    study.set_user_attr("confirm_plan", [item.__dict__ for item in items])
    return study


def plan_summary(items: list[PlanItem]) -> str:
    configs = list(dict.fromkeys(i.config for i in items))
    seeds = sorted({i.seed for i in items})
    return f"{len(configs)} configs ({', '.join(configs)}) x {len(seeds)} seeds (indices {seeds}) = {len(items)} runs"


def params_text(params: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


