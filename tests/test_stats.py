"""Confirmation statistics on synthetic per-pair scores with a known truth (no training).

The calibration tests run the estimation and decision functions that `compare` runs (per_pair_values ->
crossed_spread -> decide / interval), vectorised over R simulated experiments at once.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import integrate
from scipy import stats as scipy_stats

from critic.metrics import pair_metrics, per_pair_values
from critic.stats import (
    ConfigScores,
    Spread,
    compare,
    critical_value,
    crossed_spread,
    decide,
    detectable_difference,
    interval,
    p_value,
    prompt_codes,
    prompt_resamples,
    tail_probability,
)

SEEDS = [1, 2, 3]
REPS = 2000  # simulated experiments per scenario
MC_SD = math.sqrt(0.05 * 0.95 / REPS)  # binomial sd of a 5% rate over REPS: 0.49 percentage points


def simulate(rng: np.random.Generator, effects, reps: int = REPS, seeds: int = 3, prompts: int = 100,
             per_prompt: int = 1, seed_sd: float = 0.0, config_prompt_sd: float = 0.0, config_pair_sd: float = 0.0,
             seed_pair_sd: float = 0.0):
    """(reps, configs, seeds, pairs) teacher and student scores, and the (pairs,) prompt of each pair.

    The true mean score_diff of config c is effects[..., c]. Teacher scores are per prompt (shared by the
    prompt's `per_prompt` pairs, as in GAD); terms: a prompt difficulty common to all configs, a config x
    prompt response, a per-(config, seed) shift, and on the student side a pair difficulty, a config x pair
    response and a seed x pair term (the seed x pair interaction).
    """
    effects = np.broadcast_to(np.asarray(effects, dtype=np.float64), (reps, np.shape(effects)[-1]))
    n_configs, n_pairs = effects.shape[1], prompts * per_prompt
    teacher = (effects[:, :, None, None] + rng.normal(size=(reps, 1, 1, prompts))
               + config_prompt_sd * rng.normal(size=(reps, n_configs, 1, prompts))
               + seed_sd * rng.normal(size=(reps, n_configs, seeds, 1)))
    student = (rng.normal(size=(reps, 1, 1, n_pairs)) + config_pair_sd * rng.normal(size=(reps, n_configs, 1, n_pairs))
               + seed_pair_sd * rng.normal(size=(reps, n_configs, seeds, n_pairs)))
    teacher = np.broadcast_to(np.repeat(teacher, per_prompt, axis=-1), student.shape)
    return teacher, student, np.repeat(np.arange(prompts), per_prompt)


def per_pair(metric: str, teacher, student) -> np.ndarray:
    lengths = np.ones(teacher.shape[-1])
    return per_pair_values(metric, teacher, student, lengths, lengths)


def as_configs(teacher, student, prompts, labels) -> dict[str, ConfigScores]:
    """One simulated experiment (configs, seeds, pairs) as the ConfigScores that `gather` builds."""
    out = {}
    for c, label in enumerate(labels):
        frames, values = {}, {}
        for s, seed in enumerate(SEEDS[:teacher.shape[1]]):
            frames[seed] = pd.DataFrame({"pair_id": np.arange(len(prompts)), "prompt_id": prompts,
                                         "teacher_score": teacher[c, s], "student_score": student[c, s],
                                         "teacher_length": 10, "student_length": 12})
            values[seed] = pair_metrics(teacher[c, s], student[c, s], np.full(len(prompts), 10),
                                        np.full(len(prompts), 12))
        out[label] = ConfigScores(label, {s: v for s, v in values.items()}, frames)
    return out


def with_metric(configs: dict[str, ConfigScores], metric: str) -> dict[str, ConfigScores]:
    return {k: ConfigScores(k, {s: v[metric] for s, v in c.seed_values.items()}, c.pair_frames)
            for k, c in configs.items()}


def experiment(seed: int, effects=(0.0, 0.0), labels=("baseline", "finalist"), metric="score_diff", **kwargs):
    teacher, student, prompts = simulate(np.random.default_rng(seed), effects, reps=1, **kwargs)
    return with_metric(as_configs(teacher[0], student[0], prompts, labels), metric)


# --- the pieces -----------------------------------------------------------------------------------

def test_one_seed_and_one_pair_per_prompt_is_the_textbook_standard_error():
    values = np.array([[0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    spread = crossed_spread(values, np.arange(8))
    assert float(spread.se) == pytest.approx(values.std(ddof=1) / math.sqrt(8), rel=1e-12)


def test_copies_of_a_prompt_add_no_information():
    """Repeating every pair 4 times within its prompt leaves the se as it is; as separate prompts it halves."""
    rng = np.random.default_rng(1)
    values = rng.normal(size=(1, 40))  # one seed: the prompt part is all there is
    copies = np.repeat(values, 4, axis=-1)
    one = crossed_spread(values, np.arange(40))
    assert float(crossed_spread(copies, np.repeat(np.arange(40), 4)).se) == pytest.approx(float(one.se), rel=1e-12)
    assert float(crossed_spread(copies, np.arange(160)).se) == pytest.approx(float(one.se) / 2, rel=0.01)


def test_seed_part_is_the_spread_of_the_per_seed_metric():
    rng = np.random.default_rng(2)
    values, prompts = rng.normal(size=(3, 90)), rng.integers(0, 25, 90)
    spread = crossed_spread(values, prompts)
    assert float(spread.mean) == pytest.approx(values.mean(), rel=1e-12)
    assert float(spread.seed_var) == pytest.approx(values.mean(axis=1).var(ddof=1) / 3, rel=1e-12)


def test_old_runs_without_prompt_id_count_each_pair_as_its_own_prompt():
    frame = pd.DataFrame({"pair_id": [0, 1, 2], "teacher_score": [1.0, 2.0, 3.0]})
    assert prompt_codes(frame).tolist() == [0, 1, 2]
    assert prompt_codes(frame.assign(prompt_id=[7, 7, 3])).tolist() == [0, 0, 1]


def test_prompt_bootstrap_draws_whole_prompts():
    prompts = np.repeat(np.arange(6), [1, 2, 3, 4, 2, 1])
    sizes = np.bincount(prompts)
    blocks = prompt_resamples(prompts, 50, np.random.default_rng(3))
    assert sum(len(block) for block in blocks) == 50
    for block in blocks:
        for row in block:
            drawn = np.bincount(row, minlength=len(prompts))  # times each pair was drawn
            for prompt in range(len(sizes)):  # all pairs of a prompt equally often
                assert len(set(drawn[prompts == prompt])) == 1


@pytest.mark.parametrize("share,seed_df,prompt_df,expected_df",
                         [(1.0, 2, 50, 2), (0.0, 2, 50, 50), (1.0, 4, np.inf, 4)])
def test_reference_is_student_t_when_one_part_is_everything(share, seed_df, prompt_df, expected_df):
    # the tail is within 3e-5 of exact; over the t density near q (~0.06 per side) that moves q by < 3e-4
    assert float(critical_value(0.95, share, seed_df, prompt_df)) == pytest.approx(
        scipy_stats.t.ppf(0.975, expected_df), abs=3e-4)


@pytest.mark.parametrize("t,share,seed_df,prompt_df", [(2.5, 0.5, 2, 40), (4.0, 0.9, 2, 99), (3.0, 0.2, 4, 20),
                                                       (6.0, 0.7, 1, 30)])
def test_reference_tail_matches_adaptive_quadrature(t, share, seed_df, prompt_df):
    a, b = math.sqrt(share), math.sqrt(1 - share)
    t_seed = scipy_stats.t(seed_df)
    exact = integrate.quad(lambda x: scipy_stats.t.pdf(x, prompt_df) * (t_seed.sf((t - b * x) / a)
                                                                         + t_seed.cdf((-t - b * x) / a)),
                           -np.inf, np.inf, epsabs=1e-12)[0]
    assert float(tail_probability(t, share, seed_df, prompt_df)) == pytest.approx(exact, abs=3e-5)  # node count's bound


def test_interval_ends_are_where_the_p_value_is_one_minus_the_level():
    spread = Spread(*(np.array(v) for v in ([0.3, -0.1], [0.01, 0.002], [0.004, 0.02], [2.0, 4.0], [99.0, 30.0])))
    for level in (0.95, 0.99):
        low, high = interval(spread, level)
        assert p_value(spread, low) == pytest.approx(1 - level, abs=1e-9)
        assert p_value(spread, high) == pytest.approx(1 - level, abs=1e-9)


# --- compare ------------------------------------------------------------------------------------

def test_identical_scores_give_exactly_no_difference():
    configs = experiment(0, metric="d_acc")
    twin = ConfigScores("twin", configs["baseline"].seed_values, configs["baseline"].pair_frames)
    _, (row,) = compare("d_acc", "maximize", configs["baseline"], [twin], SEEDS, n_resamples=200)
    assert (row.diff.mean, row.diff.low, row.diff.high, row.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert row.verdict == "no difference" and row.form == "exact"


def test_compare_runs_the_calibrated_functions():
    """compare's exact path is crossed_spread + decide on the per-pair values: the functions calibrated below."""
    teacher, student, prompts = simulate(np.random.default_rng(4), [0.0, 0.2], reps=1, prompts=30, per_prompt=4,
                                         config_prompt_sd=1.0, seed_sd=0.2, seed_pair_sd=0.5)
    configs = with_metric(as_configs(teacher[0], student[0], prompts, ["baseline", "f"]), "d_acc")
    _, (row,) = compare("d_acc", "maximize", configs["baseline"], [configs["f"]], SEEDS)
    values = per_pair("d_acc", teacher[0], student[0])
    diff = crossed_spread(values[1] - values[0], prompts)
    p, _, verdict = decide(diff, 1.0, 0.05, 1)
    assert (row.diff.mean, row.diff.se, row.p_value, row.verdict) == pytest.approx(
        (float(diff.mean), float(diff.se), float(p), str(verdict)), rel=1e-12)
    assert row.n_prompts == 30 and row.n_pairs == 120


def test_verdict_and_printed_interval_agree_with_several_finalists():
    """Bonferroni over 3: a finalist whose raw 95% interval excludes 0 but whose p is above 0.05/3 is
    'no difference', and its printed (simultaneous) interval includes 0; a clear winner's excludes it."""
    seen = set()
    for seed in range(40):
        configs = experiment(seed, (0.0, 0.15, 0.0, 0.0), ("baseline", "a", "b", "c"), config_pair_sd=1.0, prompts=60)
        _, rows = compare("score_diff", "maximize", configs["baseline"], [configs[k] for k in "abc"], SEEDS)
        for row in rows:
            excludes_zero = row.diff.low > 0 or row.diff.high < 0
            assert excludes_zero == (row.verdict != "no difference"), row
            assert row.diff.level == pytest.approx(1 - 0.05 / 3)
            assert row.p_adjusted == pytest.approx(min(1, 3 * row.p_value))
            raw_excludes = row.diff_raw.low > 0 or row.diff_raw.high < 0
            seen.add((raw_excludes, excludes_zero))
        if {(True, False), (True, True)} <= seen:
            break
    assert (True, False) in seen and (True, True) in seen  # both cases happened


@pytest.mark.parametrize("direction,expected", [("maximize", "worse"), ("minimize", "better")])
def test_direction_decides_better_or_worse(direction, expected):
    configs = experiment(1, (0.0, -2.0), config_pair_sd=0.5)
    _, (row,) = compare("score_diff", direction, configs["baseline"], [configs["finalist"]], SEEDS)
    assert row.diff.high < 0 and row.verdict == expected


def test_missing_seeds_make_a_finalist_unstable():
    configs = experiment(2, (0.0, 1.5))
    flaky = configs["finalist"]
    partial = ConfigScores("finalist", {s: v for s, v in flaky.seed_values.items() if s != 3}, flaky.pair_frames)
    _, (row,) = compare("score_diff", "maximize", configs["baseline"], [partial], SEEDS)
    assert row.verdict == "unstable" and row.missing_seeds == [3] and row.seeds == [1, 2]


def test_training_metrics_without_pairs_use_seeds_only():
    base = ConfigScores("baseline", {1: 0.80, 2: 0.82, 3: 0.81}, None)
    other = ConfigScores("other", {1: 0.90, 2: 0.93, 3: 0.91}, None)
    _, (row,) = compare("train/progressive_d_acc", "maximize", base, [other], SEEDS)
    se = np.std([0.10, 0.11, 0.10], ddof=1) / math.sqrt(3)
    assert row.form == "seeds only" and row.diff.se == pytest.approx(se)
    assert row.diff_raw.high - row.diff.mean == pytest.approx(scipy_stats.t.ppf(0.975, 2) * se, rel=1e-6)


def test_auc_is_compared_conservatively_on_a_prompt_bootstrap():
    configs = experiment(5, (0.0, 0.0), metric="auc", prompts=40, per_prompt=4, config_prompt_sd=1.0,
                         seed_pair_sd=0.5)
    base, row = compare("auc", "maximize", configs["baseline"], [configs["finalist"]], SEEDS, n_resamples=400)
    assert row[0].form == base.form == "conservative" and row[0].n_prompts == 40
    assert row[0].diff.prompt_df == 39 and 0 < row[0].diff.seed_share < 1


def test_detectable_difference_shrinks_with_more_prompts():
    mde = []
    for prompts in (50, 800):
        configs = experiment(3, prompts=prompts, config_pair_sd=1.0, seed_pair_sd=0.3)
        mde.append(detectable_difference(compare("score_diff", "maximize", configs["baseline"],
                                                 [configs["finalist"]], SEEDS)[1]))
    assert mde[1] < mde[0] / 2


# --- calibration ----------------------------------------------------------------------------------
# Bounds (REPS = 2000 experiments each): a rate r is off when it is more than 3 binomial sds from its
# target (3 * MC_SD = 1.46 pp at 5%): a correct method fails one such check with probability ~0.001.
FPR_MAX = 0.05 + 3 * MC_SD  # 6.46%: the old pair bootstrap (8-11%) and Welch df (6-8%) exceed it
FPR_MIN = 0.05 - 3 * MC_SD  # 3.54%, where the reference is exact (one part of the variance dominates)
COVER_MIN, COVER_MAX = 0.95 - 3 * MC_SD, 0.95 + 3 * MC_SD
# mean estimated se^2 / variance of the estimates over REPS: the latter has a relative sd of
# sqrt(2 / (REPS - 1)) = 3.2%, so 1 +- 3 of those (double counting the interaction gives up to 1.9)
VARIANCE_RATIO = (1 - 3 * math.sqrt(2 / (REPS - 1)), 1 + 3 * math.sqrt(2 / (REPS - 1)))

# name: (simulate() arguments, exact). Exact: one part of se^2 dominates and is estimated without bias, so
# the rates must also not fall below the lower bounds. Not exact, hence conservative (upper bounds only):
# no prompt main effect (its estimate, clipped at 0, is a floor under se^2) or seed and prompt parts alike
# (the Behrens-Fisher reference is conservative between its exact ends).
SCENARIOS = {
    "seed-dominated": (dict(seed_sd=1.0, config_pair_sd=0.5, seed_pair_sd=0.3), True),
    "pair-dominated": (dict(config_pair_sd=1.0, seed_pair_sd=0.1), True),
    "interaction-dominated": (dict(config_pair_sd=0.1, seed_pair_sd=1.0), False),
    "clustered, 4 pairs per prompt": (dict(prompts=100, per_prompt=4, config_prompt_sd=1.0, config_pair_sd=0.3,
                                           seed_pair_sd=0.2), True),
    "clustered, 8 pairs per prompt": (dict(prompts=60, per_prompt=8, config_prompt_sd=1.0, config_pair_sd=0.3,
                                           seed_pair_sd=0.2), True),
    "mixed (seed and prompt parts alike)": (dict(seed_sd=0.1, config_pair_sd=1.0, seed_pair_sd=1.0), False),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_false_positive_rate_is_nominal(name):
    """Two configs that are the same in truth: 'better' or 'worse' on d_acc in at most 5% of experiments."""
    kwargs, exact = SCENARIOS[name]
    teacher, student, prompts = simulate(np.random.default_rng(10), [0.0, 0.0], **kwargs)
    values = per_pair("d_acc", teacher, student)
    _, _, verdict = decide(crossed_spread(values[:, 1] - values[:, 0], prompts), 1.0, 0.05, 1)
    rate = np.mean(verdict != "no difference")
    assert rate <= FPR_MAX, f"{name}: {rate:.2%}"
    if exact:
        assert rate >= FPR_MIN, f"{name}: {rate:.2%}"


@pytest.mark.parametrize("name", SCENARIOS)
def test_interval_covers_the_true_difference_and_se_matches_the_spread(name):
    kwargs, exact = SCENARIOS[name]
    teacher, student, prompts = simulate(np.random.default_rng(11), [0.0, 0.3], **kwargs)
    values = per_pair("score_diff", teacher, student)
    diff = crossed_spread(values[:, 1] - values[:, 0], prompts)
    low, high = interval(diff)
    coverage = np.mean((low <= 0.3) & (0.3 <= high))
    assert coverage >= COVER_MIN, f"{name}: {coverage:.2%}"
    if exact:
        assert coverage <= COVER_MAX, f"{name}: {coverage:.2%}"
    ratio = np.mean(diff.se ** 2) / np.var(diff.mean, ddof=1)
    assert VARIANCE_RATIO[0] <= ratio <= VARIANCE_RATIO[1], f"{name}: estimated / true variance {ratio:.3f}"


def _top_k(rng, trial_effects, k, **kwargs):
    """Select the top k of many trials by score_diff on selection pairs (one seed each),
    then simulate the confirmation of those k and the baseline on fresh pairs and seeds."""
    n_trials = trial_effects.shape[1]
    teacher, student, _ = simulate(rng, np.c_[np.zeros(REPS), trial_effects], seeds=1, prompts=100, config_pair_sd=1.0)
    selection = per_pair("score_diff", teacher, student).mean(axis=(-2, -1))[:, 1:]  # (REPS, trials)
    chosen = np.argsort(-selection, axis=1)[:, :k]
    effects = np.c_[np.zeros(REPS), np.take_along_axis(trial_effects, chosen, axis=1)]
    assert n_trials > k
    return effects, simulate(rng, effects, prompts=100, per_prompt=4, config_prompt_sd=1.0, config_pair_sd=0.3,
                             seed_pair_sd=0.3)


def test_top_k_of_many_trials_confirmed_on_fresh_pairs():
    """30 trials, the top 3 on selection pairs confirmed on fresh pairs and seeds (Bonferroni over 3).

    All equal in truth: some verdict other than 'no difference' in at most 5% of experiments (FWER).
    Trials that truly differ: the three simultaneous intervals all cover their true differences in >= 95%.
    """
    rng = np.random.default_rng(12)
    _, (teacher, student, prompts) = _top_k(rng, np.zeros((REPS, 30)), 3)
    values = per_pair("d_acc", teacher, student)
    _, _, verdict = decide(crossed_spread(values[:, 1:] - values[:, :1], prompts), 1.0, 0.05, 3)
    family_error = np.mean((verdict != "no difference").any(axis=1))
    assert family_error <= FPR_MAX, f"{family_error:.2%}"  # Bonferroni: at most 5% (below, as it is conservative)

    effects, (teacher, student, prompts) = _top_k(rng, rng.normal(scale=0.2, size=(REPS, 30)), 3)
    values = per_pair("score_diff", teacher, student)
    low, high = interval(crossed_spread(values[:, 1:] - values[:, :1], prompts), 1 - 0.05 / 3)
    truth = effects[:, 1:] - effects[:, :1]
    coverage = np.mean(((low <= truth) & (truth <= high)).all(axis=1))
    assert coverage >= COVER_MIN, f"{coverage:.2%}"


def _two_looks(effects, first: int = 3, last: int = 8, **kwargs):
    """The confirmation's two looks (sweeper.confirm) on REPS simulated experiments of a finalist and the baseline:
    (verdict of the two-look rule, verdict on the first seeds alone, verdict on all seeds alone)."""
    teacher, student, prompts = simulate(np.random.default_rng(13), effects, seeds=last, **kwargs)
    values = per_pair("d_acc", teacher, student)
    diff = values[:, 1] - values[:, 0]  # (REPS, seeds, pairs)
    early = crossed_spread(diff[:, :first], prompts)
    verdict_early = decide(early, 1.0, 0.05, 1)[2]
    verdict_all = decide(crossed_spread(diff, prompts), 1.0, 0.05, 1)[2]
    promising = early.mean > 0  # sweeper.confirm.promising: the mean over the first seeds favours the finalist
    return np.where(promising, verdict_all, verdict_early), verdict_early, verdict_all


SEED_DOMINATED = SCENARIOS["seed-dominated"][0]


def test_more_seeds_for_what_looks_better_keeps_false_claims_at_their_level():
    """All equal in truth, seed noise dominating (the decision benchmark's under-trained baseline): with the second
    look, 'better' in at most 2.5% (one side of the 5% two-sided test) and any verdict in at most 5%."""
    verdict, _, _ = _two_looks([0.0, 0.0], **SEED_DOMINATED)
    one_side_sd = math.sqrt(0.025 * 0.975 / REPS)
    better = np.mean(verdict == "better")
    assert 0.025 - 3 * one_side_sd <= better <= 0.025 + 3 * one_side_sd, f"{better:.2%}"
    assert np.mean(verdict != "no difference") <= FPR_MAX


def test_more_seeds_for_what_looks_better_finds_what_three_seeds_miss():
    """A true difference that eight seeds find in ~90% of experiments and three in ~30% (measured: 92% and 29%):
    the two-look rule finds it as often as eight seeds always would, less the rare experiments where it looked
    worse after three (which then get no more seeds)."""
    verdict, early, full = _two_looks([0.0, 2.0], **SEED_DOMINATED)
    power, power_early, power_full = (float(np.mean(v == "better")) for v in (verdict, early, full))
    assert power <= power_full and power_full - power <= 0.01, (power, power_full)
    assert power >= power_early + 0.4, (power, power_early)
