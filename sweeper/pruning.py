"""Pruning that waits for each trial's lr warmup and acts on evidence, and the reason of every pruned trial.

Optuna's pruners as they are decided the demo on noise and on warmup (12 trials, Hyperband with its first rung
at eval.every_steps = 20: 9 pruned, two of them cut at values above the final value of every completed trial,
two cut at step 20 inside their own 28- and 50-step lr warmup; one run's held-out d_acc moves by about 0.014
between consecutive evaluations, as much as configs differ). So every pruner built here is Optuna's own,
wrapped in a thin `Gate`:

1. Warmup: a trial is compared only from its own FROM_STEP_ATTR on, its lr warmup plus one evaluation interval
   (`first_comparable_step`; for a verl section train.warmup_steps is verl's lr warmup in optimizer steps,
   critic/verl_units.py). Before that its lr has not reached its value, whatever the other trials did.
2. Evidence (`sweep.pruner: paired`, the default): Optuna's MedianPruner says whether the trial is below the
   median of the completed trials at this step; the trial is pruned only if, in addition, a one-sided paired
   t-test over the held-out prompts at this same step says it is worse than the median trial (p < P_THRESHOLD).
   Each prompt's outcome is the mean of its pairs' own values of the objective metric (critic/metrics.py
   `per_pair_values`, the metric's one code path); pairs of one prompt share its teacher response, so the
   prompt is the unit. The objective stores these outcomes on the trial at every evaluation (VALUES_ATTR).

Why paired by default and not Hyperband: Hyperband splits a small budget into brackets and cuts the bottom 2/3
at fixed rungs, by rank alone; the median pruner compares trials at the same step, which is what a paired test
needs, and the test turns "below the median" into "below it beyond the noise of the held-out pairs".
`median` and `hyperband` remain (Optuna's decision, no noise test; the warmup gate still applies).
"""

from __future__ import annotations

import base64
import collections
from dataclasses import dataclass

import numpy as np
import optuna
import pandas as pd
from optuna.study import StudyDirection
from optuna.trial import TrialState
from scipy import stats

from critic.metrics import MEAN_OVER_PAIRS, per_pair_values
from critic.sections import ExperimentConfig, SpecError

FROM_STEP_ATTR = "pruning.from_step"  # the first step the trial may be compared at
VALUES_ATTR = "pruning.prompt_values@"  # + step: the trial's held-out outcome per prompt at that evaluation
CAUSE_ATTR = "prune_cause"  # why, in words shared by every trial pruned for the same reason (the summary counts)
# A trial is tested at every evaluation after its warmup, each test at P_THRESHOLD: the chance of ever cutting
# a trial as good as the median is at most P_THRESHOLD x its number of evaluations (Bonferroni), while a trial
# clearly worse on hundreds of prompts has a p-value orders of magnitude below it.
P_THRESHOLD = 0.01
NON_FINITE_CAUSE = "non-finite loss or gradient norm"


def first_comparable_step(cfg: ExperimentConfig) -> int:
    """The trial's lr warmup (train.warmup_steps, verl's included) plus one evaluation interval at full lr."""
    return cfg.train.warmup_steps + cfg.eval.every_steps


def check_pruner(cfg: ExperimentConfig, objectives: list[str], source: str) -> None:
    """sweep.pruner: paired needs a held-out objective that is a mean over pairs; raises SpecError saying the fix."""
    if cfg.sweep.pruner != "paired" or len(objectives) != 1:  # several objectives: nothing is pruned
        return
    set_name, _, metric = objectives[0].partition("/")
    if set_name == "train" or metric not in MEAN_OVER_PAIRS:
        raise SpecError(f"{source}: sweep.pruner: paired compares trials prompt by prompt on the held-out pairs, "
                        f"which needs an objective that is a mean over pairs (<set>/ one of "
                        f"{', '.join(MEAN_OVER_PAIRS)}); {objectives[0]!r} is not. Set sweep.pruner: median "
                        f"(Optuna's, no noise test) or none")


def prompt_values(pair_scores: pd.DataFrame, objective: str) -> np.ndarray:
    """(prompts,) the objective metric's mean per-pair value of each prompt of the objective's set, by prompt_id."""
    set_name, _, metric = objective.partition("/")
    part = pair_scores[pair_scores["set"] == set_name]
    values = per_pair_values(metric, part["teacher_score"], part["student_score"], part["teacher_length"],
                             part["student_length"])
    prompts = part["prompt_id"].to_numpy()
    return np.bincount(prompts, weights=values) / np.bincount(prompts)


def encode(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


def record_prompt_values(trial: optuna.Trial, step: int, pair_scores: pd.DataFrame, objective: str) -> None:
    """Store the trial's per-prompt outcomes at this evaluation, for the paired test of this and later trials."""
    trial.set_user_attr(f"{VALUES_ATTR}{step}", encode(prompt_values(pair_scores, objective)))


def one_sided_p(better_by: np.ndarray) -> float:
    """p-value of "the trial is at least as good" from per-prompt differences (> 0 where the trial is better)."""
    if np.all(better_by == better_by[0]):  # no spread (e.g. every prompt the same): the sign decides
        return 0.0 if better_by[0] < 0 else 1.0
    return float(stats.ttest_1samp(better_by, 0.0, alternative="less").pvalue)


@dataclass(frozen=True)
class Decision:
    cause: str  # shared by every trial pruned for the same reason
    detail: str  # this trial's numbers


class Gate(optuna.pruners.BasePruner):
    """Optuna's `wrapped` pruner, asked only from each trial's FROM_STEP_ATTR on; with `p_threshold`, its "prune"
    also needs the paired test to find the trial worse than the median completed trial at that step."""

    def __init__(self, wrapped: optuna.pruners.BasePruner, objective: str, p_threshold: float | None = None) -> None:
        if p_threshold is not None and not 0.0 < p_threshold < 1.0:
            raise ValueError(f"p_threshold must be in (0, 1) or None, but got {p_threshold=}")
        self.wrapped, self.objective, self.p_threshold = wrapped, objective, p_threshold
        self.decisions: dict[int, Decision] = {}  # trial number -> why it was pruned (the objective records it)

    @property
    def paired(self) -> bool:
        return self.p_threshold is not None

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < trial.user_attrs.get(FROM_STEP_ATTR, 0):
            return False
        if not self.wrapped.prune(study, trial):
            return False
        value = trial.intermediate_values[step]
        if not self.paired:
            name = type(self.wrapped).__name__
            self.decisions[trial.number] = Decision(
                f"cut by Optuna's {name} (no noise test)",
                f"pruned by Optuna's {name} at step {step} ({self.objective}={value:.4f}), after its lr warmup")
            return True
        decision = self._paired(study, trial, step, value)
        if decision is not None:
            self.decisions[trial.number] = decision
        return decision is not None

    def _paired(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, step: int,
                value: float) -> Decision | None:
        """The decision when the paired test finds the trial worse than the median trial at `step`, else None."""
        key = f"{VALUES_ATTR}{step}"
        if key not in trial.user_attrs:
            return None
        maximize = study.direction == StudyDirection.MAXIMIZE
        rivals = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if step in t.intermediate_values and key in t.user_attrs]
        if not rivals:
            return None
        rivals.sort(key=lambda t: t.intermediate_values[step], reverse=maximize)  # best first
        median = rivals[len(rivals) // 2]  # of an even number, the weaker middle trial: the harder test
        ours, theirs = decode(trial.user_attrs[key]), decode(median.user_attrs[key])
        if len(ours) != len(theirs):  # different held-out prompts: not comparable prompt by prompt
            return None
        p = one_sided_p(ours - theirs if maximize else theirs - ours)
        if p >= self.p_threshold:
            return None
        return Decision(
            f"worse than the median trial at the same step beyond noise (paired test, p<{self.p_threshold:g})",
            f"pruned at step {step}: {self.objective} {value:.4f} is below the median completed trial "
            f"{median.number} ({median.intermediate_values[step]:.4f}) at that step beyond noise: paired t-test "
            f"over {len(ours)} held-out prompts, p={p:.2g} < {self.p_threshold:g}")


def make_pruner(cfg: ExperimentConfig) -> optuna.pruners.BasePruner:
    """sweep.pruner as an Optuna pruner: `paired` (default), `median`, `hyperband` gated by warmup, or none."""
    objective = cfg.sweep.objectives[0]
    if cfg.sweep.pruner == "paired":  # below the median (2+ completed trials at the step) and the paired test
        return Gate(optuna.pruners.MedianPruner(n_startup_trials=2, n_min_trials=2), objective, P_THRESHOLD)
    if cfg.sweep.pruner == "median":
        return Gate(optuna.pruners.MedianPruner(n_startup_trials=3), objective)
    if cfg.sweep.pruner == "hyperband":
        return Gate(optuna.pruners.HyperbandPruner(min_resource=cfg.eval.every_steps, reduction_factor=3), objective)
    return optuna.pruners.NopPruner()


def wants_prompt_values(pruner: optuna.pruners.BasePruner) -> bool:
    return isinstance(pruner, Gate) and pruner.paired


def decision_for(pruner: optuna.pruners.BasePruner, trial_number: int) -> Decision | None:
    """Why `pruner` just pruned the trial (None for a pruner built elsewhere, e.g. a test's own)."""
    return pruner.decisions.pop(trial_number, None) if isinstance(pruner, Gate) else None


def pruned_summary(study: optuna.Study) -> str:
    """One line: how many finished trials were pruned, grouped by cause."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    causes = collections.Counter(t.user_attrs.get(CAUSE_ATTR, "no cause recorded") for t in finished
                                 if t.state == TrialState.PRUNED)
    line = f"pruned {sum(causes.values())} of {len(finished)}"
    return line + (": " + "; ".join(f"{n} {cause}" for cause, n in causes.most_common()) if causes else "")
