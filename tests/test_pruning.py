"""Pruning that waits for each trial's lr warmup and acts on evidence: a real Optuna SQLite study driven through the
objective's own reporter (ask/tell, per-pair held-out outcomes at every evaluation), then the real objective."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from critic.config import SpecError, build_config
from sweeper import pruning
from sweeper import study as study_mod
from sweeper.objective import OptunaReporter
from sweeper.sweep import Sweep
from tests.sweep_helpers import mlflow_uri, tiny_sweep_spec

N_PROMPTS = 450  # about the demo's held-out prompts
EVERY = 20
EASY = np.random.default_rng(0).random(N_PROMPTS) < 0.88  # what a decent critic gets right: shared by all trials


def outcomes(flips: int, seed: int) -> np.ndarray:
    """A decent critic's per-prompt correctness (d_acc about 0.88) with `flips` prompts it got the other way."""
    correct = EASY.copy()
    where = np.random.default_rng(seed).choice(N_PROMPTS, size=flips, replace=False)
    correct[where] = ~correct[where]
    return correct


def scores(correct: np.ndarray) -> pd.DataFrame:
    """The per-pair score table an evaluation hands the reporter (critic/evaluate.py score_frame's columns)."""
    return pd.DataFrame({"set": "val", "pair_id": np.arange(N_PROMPTS), "prompt_id": np.arange(N_PROMPTS),
                         "teacher_score": np.where(correct, 1.0, -1.0), "student_score": 0.0,
                         "teacher_length": 10, "student_length": 10})


def spec_config(warmup_steps: int):
    return build_config({"train": {"warmup_steps": warmup_steps}, "eval": {"every_steps": EVERY},
                         "sweep": {"objective": "val/d_acc", "direction": "maximize"}})


@pytest.fixture
def study(tmp_path):
    return optuna.create_study(study_name="pruning", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                               direction="maximize", pruner=pruning.make_pruner(spec_config(0)))


def run(study, warmup_steps: int, curve: list[np.ndarray]) -> tuple[optuna.trial.FrozenTrial, int | None]:
    """One trial: its outcomes at steps 20, 40, ..., the last one its final evaluation, reported as the objective
    does; (trial, step it was cut at)."""
    trial = study.ask()
    reporter = OptunaReporter(trial, "val/d_acc", report=True, prune=True, cfg=spec_config(warmup_steps))
    for index, correct in enumerate(curve):
        step = EVERY * (index + 1)
        try:
            final = index == len(curve) - 1
            reporter.log_eval(step, {"val/d_acc": float(correct.mean())}, scores(correct), final)
        except optuna.TrialPruned as exc:
            trial.set_user_attr("prune_reason", str(exc))
            study.tell(trial, state=TrialState.PRUNED)
            return study.trials[trial.number], step
    study.tell(trial, float(curve[-1].mean()))
    return study.trials[trial.number], None


def steady_trials(study, n: int = 3) -> None:
    """Completed trials of about the same quality, each evaluation a little different (evaluation noise)."""
    for number in range(n):
        run(study, 0, [outcomes(8, seed=100 * number + step) for step in range(5)])


def test_a_slow_starting_config_that_ends_best_survives(study):
    steady_trials(study)
    # lr warmup of 50 steps: far behind at 20 and 40, within noise of the others at 80, the best at the end
    best = EASY | (np.random.default_rng(5).random(N_PROMPTS) < 0.5)  # d_acc about 0.94
    slow = [outcomes(150, 1), outcomes(80, 2), outcomes(40, 3), outcomes(10, 4), best]
    trial, cut_at = run(study, 50, slow)
    assert cut_at is None and trial.state == TrialState.COMPLETE
    assert study.best_trial.number == trial.number
    # Optuna's MedianPruner alone would have cut it at step 20, inside its warmup
    early = optuna.trial.create_trial(value=None, state=TrialState.RUNNING,
                                      intermediate_values={EVERY: trial.intermediate_values[EVERY]})
    assert optuna.pruners.MedianPruner(n_startup_trials=2, n_min_trials=2).prune(study, early)


def test_a_trial_inside_its_warmup_is_never_pruned_and_a_clearly_worse_one_is_after_it(study):
    steady_trials(study)
    worse = [outcomes(150, seed) for seed in range(5)]  # d_acc about 0.6 at every step: clearly worse
    trial, cut_at = run(study, 50, worse)
    assert trial.user_attrs[pruning.FROM_STEP_ATTR] == 70  # warmup 50 + one evaluation interval of 20
    assert cut_at == 80  # steps 20, 40 and 60 are inside the warmup (+ one evaluation): never compared
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs[pruning.CAUSE_ATTR] == ("worse than the median trial at the same step beyond noise "
                                                    "(paired test, p<0.01)")
    assert "pruned at step 80: val/d_acc" in trial.user_attrs["prune_reason"]
    assert f"paired t-test over {N_PROMPTS} held-out prompts" in trial.user_attrs["prune_reason"]
    # the same trial without a warmup is cut at its first evaluation
    _, cut_at = run(study, 0, worse)
    assert cut_at == EVERY
    # with a warmup of 80 steps only its final evaluation (step 100) comes after it: trained to the end, kept
    trial, cut_at = run(study, 80, worse)
    assert cut_at is None and trial.state == TrialState.COMPLETE
    assert pruning.pruned_summary(study) == ("pruned 2 of 6: 2 worse than the median trial at the same step beyond "
                                             "noise (paired test, p<0.01)")


def test_a_trial_below_the_median_within_noise_is_not_pruned(study):
    steady_trials(study)
    # a few prompts worse than the others at every step: below the median, as Optuna's MedianPruner sees it
    slightly = [outcomes(8, seed) & (np.arange(N_PROMPTS) >= 4) for seed in range(5)]
    trial, cut_at = run(study, 0, slightly)
    assert cut_at is None and trial.state == TrialState.COMPLETE
    assert all(trial.intermediate_values[step] < np.median([t.intermediate_values[step] for t in study.trials[:3]])
               for step in trial.intermediate_values)
    assert pruning.pruned_summary(study) == "pruned 0 of 4"


def test_paired_pruner_refuses_an_objective_that_is_not_a_mean_over_pairs(tmp_path):
    spec = tiny_sweep_spec(tmp_path, sweep={"objective": "val/auc", "pruner": "paired"})
    with pytest.raises(SpecError, match=r"'val/auc' is not. Set sweep.pruner: median"):
        study_mod.load_sweep_spec(str(spec))


def test_the_real_objective_stores_what_the_pruner_needs(tmp_path):
    spec = study_mod.load_sweep_spec(str(tiny_sweep_spec(tmp_path, sweep={"pruner": "paired", "n_trials": 3})))
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path)
    sweep = Sweep.init(spec, storage, tracking)
    study = sweep.study
    sweep.run_trials(3, progress=False)
    for trial in study.trials:
        config = study_mod.config_for(spec, trial.params, "trial")
        assert trial.user_attrs[pruning.FROM_STEP_ATTR] == config.train.warmup_steps + config.eval.every_steps
        stored = {int(k.rpartition("@")[2]) for k in trial.user_attrs if k.startswith(pruning.VALUES_ATTR)}
        assert stored == set(trial.intermediate_values)  # the per-prompt outcomes of every evaluation
        values = pruning.decode(trial.user_attrs[f"{pruning.VALUES_ATTR}{trial.last_step}"])
        # the d_acc of the per-prompt outcomes is the reported one (the demo data has one pair per prompt)
        assert values.mean() == pytest.approx(trial.intermediate_values[trial.last_step], abs=1e-6)
        if trial.state == TrialState.PRUNED:
            assert trial.last_step >= trial.user_attrs[pruning.FROM_STEP_ATTR]
