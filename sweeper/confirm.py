"""The confirmation stage: re-run the finalists, your candidates and the baseline with new seeds, then compare them.

A search trial is one seed scored on the val pairs; the best of many noisy trials is the one whose seed, and
whose luck on those pairs, was best. So the top-K distinct configurations, every sweep.candidates entry (your
planned changes, whatever their search rank) and the baseline are re-run with seed indices 1..S (the search ran
index 0, whose result selected the finalists and would bias them upward), each index setting both train.seed
(data order) and model.init_seed (value head / tiny critic) to base + index, and scored on the confirmation split
(data.confirm_fraction: prompts no search trial trained on, scored or selected with). The runs live in a second
Optuna study `<study>.confirm` in the same storage: one enqueued trial per (configuration, seed) with the
configuration's params fixed, so workers claim them like search trials, an interrupted run is enqueued again and
a finished one is never repeated.

Two looks, one verdict. After seed indices 1..seeds, a config whose mean is better than the baseline's over the
same seeds (and that has all its seeds) is promising: it and the baseline get indices seeds+1..max_seeds, and its
verdict is read once, on all of them. The others are judged on their first seeds; they look no better, so their
verdict can only be "worse" or "no difference". Extending only what looks better is futility stopping: a "better"
claim still needs the final test on all seeds to pass, so its error rate is at most that test's (alpha/2 per side;
tests/test_stats.py measures it by simulation), and no alpha is spent on the first look. Three seeds are too few
when the baseline's own seed noise is large (the decision benchmark's under-trained critic: sd 0.049 over seeds,
docs/benchmarks.md); eight resolve a margin of ~4.5 noise standard errors, and the added runs go only where a
"better" verdict is possible.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from critic.config import CONFIRM_SET, DataConfig, ExperimentConfig, SpecError
from sweeper.board import candidate_name, stored_confirmation, trial_params  # noqa: F401  (re-exported)
from sweeper.stores import make_storage
from sweeper.study import CONFIRM_SUFFIX, FINISHED, SweepSpec

STAGE_ATTRS = ("stage", "confirm_config", "config_trial", "seed_index")  # kept when a dead worker's trial is re-queued


def confirm_study_name(search_study: str) -> str:
    return search_study + CONFIRM_SUFFIX


# A confirmation run is judged on its final scores only, and scoring val, the confirmation split and shifted every
# eval.every_steps is half of a demo confirmation run (8.2 of 16.8 s measured; once at the end: 2.6 of 11.3 s): it
# evaluates once, after its last step. Its training is the search run's (evaluation draws no random numbers;
# tests/test_candidates.py checks that the final scores are equal).
EVALUATE_AT_THE_END = 10**9


def confirmation_overrides(cfg: ExperimentConfig, seed_index: int) -> dict[str, Any]:
    """What a confirmation run changes in its config: seed index i sets train.seed and model.init_seed to the spec's
    value + i; the run scores the confirmation split (when the spec carves one), once, after its last step.
    Index 0 is the search's own run."""
    if not seed_index:
        return {}
    seeds = {"train.seed": cfg.train.seed + seed_index, "model.init_seed": cfg.model.init_seed + seed_index}
    split = {"eval.confirm_split": True} if cfg.data.confirm_fraction > 0 else {}
    return {**seeds, **split, "eval.every_steps": EVALUATE_AT_THE_END}


def confirmation_metric(objective: str, data: DataConfig) -> str:
    """The metric the confirmation compares for a search objective: val/<m> becomes confirm/<m>, the same metric on
    the confirmation split (when data.confirm_fraction > 0); any other metric is compared as the search measured it."""
    set_name, _, metric = objective.partition("/")
    return f"{CONFIRM_SET}/{metric}" if set_name == "val" and data.confirm_fraction > 0 else objective


def describe_split(objective: str, metric: str, data: DataConfig, n_pairs: int) -> dict[str, Any]:
    """Which pairs the confirmation scores, with the words every output uses (sweeper.board.split_text prints it)."""
    set_name = metric.partition("/")[0]
    fresh = set_name == CONFIRM_SET
    if fresh:
        text = (f"on the confirmation split: {n_pairs} pairs never seen by the search (data.confirm_fraction "
                f"{data.confirm_fraction:g} of the prompts; the search selected on val)")
    elif not n_pairs:
        text = f"on {metric}, a training metric (no held-out pairs)"
    else:
        why = ("data.confirm_fraction is 0; set it > 0 for pairs the search never saw" if set_name == "val" else
               "only val/<metric> objectives are confirmed on the confirmation split")
        text = (f"on the {n_pairs} {set_name} pairs that also selected the finalists, so their luck there is "
                f"re-measured ({why})")
    return {"set": set_name, "objective": objective, "n_pairs": n_pairs, "fresh": fresh, "text": text}


@dataclass(frozen=True)
class PlanItem:
    config: str  # "baseline", a candidate's name, or "trial-<n>"
    trial: int  # the search trial whose parameters are replicated
    params: dict[str, Any]  # its Optuna params
    seed: int  # seed index, >= 1
    extra: dict[str, Any] = field(default_factory=dict)  # a candidate's values outside the space (extra_params)
    kind: str = "finalist"  # baseline | candidate | finalist


def _label(trial: FrozenTrial, kind: str) -> str:
    return {"baseline": "baseline", "candidate": candidate_name(trial)}.get(kind) or f"trial-{trial.number}"


def choose_finalists(study: optuna.Study, top_k: int, numbers: list[int] | None = None
                     ) -> tuple[FrozenTrial, list[FrozenTrial], list[FrozenTrial]]:
    """The baseline trial, the candidates' trials, and the finalists: the given trial numbers, or the top_k
    distinct COMPLETE configs the search found.

    Candidates are confirmed whatever their rank, so the automatic choice skips them, the baseline, and trials
    whose params equal one of those or an earlier finalist: re-running them would only re-measure a configuration.
    """
    trials = study.get_trials(deepcopy=False)
    baselines = [t for t in trials if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE]
    if not baselines:
        raise SpecError(f"study {study.study_name!r} has no COMPLETE baseline trial; confirmation compares "
                        f"finalists to sweep.baseline (the setting you use today): set it in the spec and "
                        f"run the sweep with --new-study")
    baseline = baselines[0]
    candidates = list({candidate_name(t): t for t in trials if candidate_name(t) is not None}.values())  # latest
    seen = [trial_params(t) for t in (baseline, *candidates)]
    if numbers:
        by_number = {t.number: t for t in trials}
        missing = [n for n in numbers if n not in by_number or by_number[n].state != TrialState.COMPLETE]
        if missing:
            raise SpecError(f"--trials: {missing} are not COMPLETE trials of study {study.study_name!r}")
        confirmed_anyway = {t.number for t in (baseline, *candidates)}
        return baseline, candidates, [by_number[n] for n in numbers if n not in confirmed_anyway]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and not t.user_attrs.get("baseline")]
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    complete.sort(key=lambda t: (-t.values[0] if maximize else t.values[0], t.number))
    finalists = []
    for trial in complete:
        if len(finalists) == top_k:
            break
        if trial_params(trial) not in seen:
            finalists.append(trial)
            seen.append(trial_params(trial))
    return baseline, candidates, finalists


def make_plan(baseline: FrozenTrial, candidates: list[FrozenTrial], finalists: list[FrozenTrial],
              seeds: int) -> list[PlanItem]:
    """The first look: every config with seed indices 1..seeds."""
    configs = [(baseline, "baseline"), *((t, "candidate") for t in candidates), *((t, "finalist") for t in finalists)]
    return [PlanItem(_label(t, kind), t.number, dict(t.params), s, dict(t.user_attrs.get("extra_params", {})), kind)
            for s in range(1, seeds + 1) for t, kind in configs]


def promising(study: optuna.Study, items: list[PlanItem], maximize: bool) -> list[str]:
    """The configs of the plan that look better than the baseline: a higher (lower) mean over the seeds both have,
    and a result for every seed planned for them (a config that diverged on one is not given more)."""
    values: dict[str, dict[int, float]] = {}
    for (label, seed), trial in ConfirmPlan.completed(study).items():
        values.setdefault(label, {})[seed] = trial.values[0]
    base = values.get("baseline", {})
    chosen = []
    for label in dict.fromkeys(i.config for i in items if i.kind != "baseline"):
        own = values.get(label, {})
        planned = {i.seed for i in items if i.config == label}
        shared = sorted(planned & own.keys() & base.keys())
        if planned <= own.keys() and len(shared) >= 2:
            diff = statistics.fmean(own[s] - base[s] for s in shared)
            if (diff > 0) == maximize and diff != 0:
                chosen.append(label)
    return chosen


def extend_plan(items: list[PlanItem], labels: list[str], seeds: range) -> list[PlanItem]:
    """The second look: the given configs and the baseline with the seed indices `seeds` added."""
    first = {i.config: i for i in items if i.config in ("baseline", *labels)}
    return items + [replace(item, seed=s) for s in seeds for item in first.values()]


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

    @classmethod
    def completed(cls, study: optuna.Study) -> dict[tuple[str, int], FrozenTrial]:
        """(config, seed) -> its COMPLETE trial; the latest wins where a run was repeated."""
        return {cls.key(t): t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}

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
                identity = {"candidate": item.config} if item.kind == "candidate" else {}
                study.enqueue_trial(item.params, user_attrs={
                    "stage": "confirm", "confirm_config": item.config, "config_trial": item.trial,
                    "seed_index": item.seed, "baseline": item.kind == "baseline", "extra_params": item.extra,
                    **identity})


def open_confirm_study(search: optuna.Study, spec: SweepSpec, storage_url: str, items: list[PlanItem]
                       ) -> optuna.Study:
    """Create or load `<study>.confirm` beside the search study; store the plan and what workers need."""
    storage = make_storage(storage_url, spec.cfg.sweep.heartbeat_interval, spec.cfg.sweep.grace_period,
                           outage_s=spec.cfg.sweep.outage_window_s)
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


