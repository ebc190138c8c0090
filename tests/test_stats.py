"""Confirmation statistics on synthetic per-pair scores with a known effect (no training)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from critic.metrics import pair_metrics
from sweeper.stats import ConfigScores, compare, detectable_difference, estimate, holm, p_value

SEEDS = [1, 2, 3]


def synthetic(rng: np.random.Generator, effects: dict[str, float], n_pairs: int = 200, seeds=SEEDS,
              seed_sd: float = 0.3, pair_sd: float = 1.0, noise_sd: float = 0.5,
              metric: str = "score_diff") -> dict[str, ConfigScores]:
    """Scores whose true mean score_diff is `effect` per config, over the population of pairs and seeds.

    Each pair has a shared difficulty (cancels in paired differences) and a config-specific response
    (does not: a new draw of pairs moves the comparison); each seed shifts the whole config.
    """
    difficulty = rng.normal(size=n_pairs)
    lengths = rng.integers(5, 60, size=(2, n_pairs))
    out = {}
    for label, effect in effects.items():
        response = rng.normal(scale=pair_sd, size=n_pairs)  # config x pair interaction
        frames, values = {}, {}
        for seed in seeds:
            shift = rng.normal(scale=seed_sd)
            teacher = effect + difficulty + response + shift + rng.normal(scale=noise_sd, size=n_pairs)
            student = difficulty + rng.normal(scale=noise_sd, size=n_pairs)
            frames[seed] = pd.DataFrame({"pair_id": np.arange(n_pairs), "teacher_score": teacher,
                                         "student_score": student, "teacher_length": lengths[0],
                                         "student_length": lengths[1]})
            values[seed] = pair_metrics(teacher, student, lengths[0], lengths[1])[metric]
        out[label] = ConfigScores(label, values, frames)
    return out


def test_estimate_adds_seed_and_pair_variance():
    est = estimate(np.array([1.0, 2.0, 3.0]), pair_variance=0.5)
    assert est.mean == 2.0
    assert est.se == pytest.approx(math.sqrt(1.0 / 3 + 0.5))
    # Welch-Satterthwaite: (v_s + v_p)^2 / (v_s^2 / (S - 1))
    assert est.df == pytest.approx((1 / 3 + 0.5) ** 2 / ((1 / 3) ** 2 / 2))
    assert est.high - est.mean == pytest.approx(scipy_stats.t.ppf(0.975, est.df) * est.se)


def test_holm_matches_the_step_down_definition():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
    assert holm([0.02, 0.01, 0.5]) == pytest.approx([0.04, 0.03, 0.5])


def test_identical_scores_give_exactly_no_difference():
    configs = synthetic(np.random.default_rng(0), {"baseline": 0.0}, metric="d_acc")
    twin = ConfigScores("twin", configs["baseline"].seed_values, configs["baseline"].pair_frames)
    _, (row,) = compare("d_acc", "maximize", configs["baseline"], [twin], SEEDS, n_resamples=200)
    assert (row.diff.mean, row.diff.low, row.diff.high, row.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert row.verdict == "no difference"


def test_interval_covers_the_true_difference_at_the_nominal_rate():
    """200 independent experiments (new pairs, new seeds): the 95% interval must cover the truth in >= 88%.

    Binomial(200, 0.95) falls below 176 (88%) with probability ~1e-5, so a correct method fails this
    almost never; a method that ignored one variance source (seeds or pairs) covers far less here
    (both sources are of similar size), and fails.
    """
    rng = np.random.default_rng(123)
    covered = 0
    for _ in range(200):
        configs = synthetic(rng, {"baseline": 0.0, "finalist": 0.3})
        _, (row,) = compare("score_diff", "maximize", configs["baseline"], [configs["finalist"]], SEEDS,
                            n_resamples=200, rng_seed=int(rng.integers(1 << 30)))
        covered += row.diff.low <= 0.3 <= row.diff.high
    assert covered >= 176, covered


def test_ignoring_pairs_would_undercover():
    """The same experiments with only the seed part of the variance cover far less: the pair part matters."""
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(100):
        configs = synthetic(rng, {"baseline": 0.0, "finalist": 0.3}, seed_sd=0.02, noise_sd=0.1)
        b, f = configs["baseline"], configs["finalist"]
        diffs = np.array([f.seed_values[s] - b.seed_values[s] for s in SEEDS])
        naive = estimate(diffs, pair_variance=0.0)
        covered += naive.low <= 0.3 <= naive.high
    assert covered < 80, covered


def test_zero_effect_is_rarely_significant_and_a_large_one_always():
    rng = np.random.default_rng(5)
    false_positives, detected = 0, 0
    for _ in range(100):
        configs = synthetic(rng, {"baseline": 0.0, "same": 0.0, "large": 3.0}, metric="d_acc", seed_sd=0.1)
        _, rows = compare("d_acc", "maximize", configs["baseline"], [configs["same"], configs["large"]], SEEDS,
                          n_resamples=200, rng_seed=int(rng.integers(1 << 30)))
        false_positives += rows[0].verdict != "no difference"
        detected += rows[1].verdict == "better"
    assert false_positives <= 12, false_positives  # expected <= 5 (Holm, 5%); 12 is > 3 sd above that
    assert detected >= 95, detected


@pytest.mark.parametrize("direction,expected", [("maximize", "worse"), ("minimize", "better")])
def test_direction_decides_better_or_worse(direction, expected):
    configs = synthetic(np.random.default_rng(1), {"baseline": 0.0, "weak": -2.0})
    _, (row,) = compare("score_diff", direction, configs["baseline"], [configs["weak"]], SEEDS, n_resamples=200)
    assert row.diff.high < 0 and row.verdict == expected


def test_missing_seeds_make_a_finalist_unstable():
    configs = synthetic(np.random.default_rng(2), {"baseline": 0.0, "diverges": 1.5})
    flaky = configs["diverges"]
    partial = ConfigScores("diverges", {s: v for s, v in flaky.seed_values.items() if s != 3}, flaky.pair_frames)
    _, (row,) = compare("score_diff", "maximize", configs["baseline"], [partial], SEEDS, n_resamples=200)
    assert row.verdict == "unstable" and row.missing_seeds == [3] and row.seeds == [1, 2]


def test_training_metrics_without_pairs_use_seeds_only():
    base = ConfigScores("baseline", {1: 0.80, 2: 0.82, 3: 0.81}, None)
    other = ConfigScores("other", {1: 0.90, 2: 0.93, 3: 0.91}, None)
    _, (row,) = compare("train/progressive_d_acc", "maximize", base, [other], SEEDS)
    assert row.diff.se == pytest.approx(np.std([0.10, 0.11, 0.10], ddof=1) / math.sqrt(3))
    assert row.p_value == pytest.approx(p_value(row.diff))


def test_detectable_difference_shrinks_with_more_pairs():
    small = synthetic(np.random.default_rng(3), {"baseline": 0.0, "f": 0.0}, n_pairs=50, seed_sd=0.0)
    large = synthetic(np.random.default_rng(3), {"baseline": 0.0, "f": 0.0}, n_pairs=800, seed_sd=0.0)
    mde = [detectable_difference(compare("score_diff", "maximize", c["baseline"], [c["f"]], SEEDS,
                                         n_resamples=200)[1]) for c in (small, large)]
    assert mde[1] < mde[0] / 2
