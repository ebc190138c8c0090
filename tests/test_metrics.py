"""Pair and step metrics against hand computations on fixed scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from critic.metrics import MEAN_OVER_PAIRS, PAIR_METRICS, pair_metric, pair_metrics, per_pair_values, step_metrics
from tests.helpers import PAIR_METRIC_NAMES

# Four pairs: teacher wins, tie, student wins, teacher wins.
TEACHER = np.array([2.0, 1.0, 0.5, 3.0])
STUDENT = np.array([1.0, 1.0, 1.5, 0.0])  # differences 1, 0, -1, 3
TEACHER_LEN = np.array([10, 20, 30, 40])
STUDENT_LEN = np.array([5, 20, 60, 35])  # teacher longer, equal, shorter, longer


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.fixture
def metrics() -> dict[str, float]:
    return pair_metrics(TEACHER, STUDENT, TEACHER_LEN, STUDENT_LEN)


def test_pair_metrics_has_exactly_the_documented_names(metrics):
    assert set(metrics) == PAIR_METRIC_NAMES
    assert all(isinstance(v, float) for v in metrics.values())


def test_accuracy_rules_and_ties(metrics):
    assert metrics["d_acc"] == 2 / 4  # strict: teacher above student
    assert metrics["d_acc_ties_correct"] == 3 / 4  # the tie counts as correct
    assert metrics["tie_rate"] == 1 / 4
    assert metrics["n_pairs"] == 4.0


def test_auc_over_all_teacher_student_combinations(metrics):
    # teacher 2.0 beats all 4 students; 1.0 ties two 1.0s and beats 0.0 -> 2; 0.5 beats 0.0 -> 1; 3.0 beats all 4
    assert metrics["auc"] == pytest.approx((4 + 2 + 1 + 4) / 16)


def test_pair_logloss_at_temperature_one(metrics):
    # -log sigmoid(d) = log(1 + exp(-d))
    expected = (softplus(-1.0) + softplus(0.0) + softplus(1.0) + softplus(-3.0)) / 4
    assert metrics["pair_logloss"] == pytest.approx(expected)


def test_score_levels(metrics):
    assert metrics["score_diff"] == pytest.approx(3.0 / 4)
    assert metrics["teacher_score_mean"] == pytest.approx(6.5 / 4)
    assert metrics["student_score_mean"] == pytest.approx(3.5 / 4)
    # population standard deviations: squared deviations from 1.625 and from 0.875
    assert metrics["teacher_score_std"] == pytest.approx(math.sqrt((0.375**2 + 0.625**2 + 1.125**2 + 1.375**2) / 4))
    assert metrics["student_score_std"] == pytest.approx(math.sqrt((0.125**2 * 2 + 0.625**2 + 0.875**2) / 4))


def test_length_statistics(metrics):
    assert metrics["length_ratio"] == pytest.approx(30 / 25)  # mean student length / mean teacher length
    assert metrics["length_baseline_acc"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # equal lengths count 0.5


def test_score_length_spearman_uses_average_ranks(metrics):
    # scores  [2, 1, 0.5, 3 | 1, 1, 1.5, 0] -> ranks [7, 4, 2, 8, 4, 4, 6, 1]   (three 1.0s share rank 4)
    # lengths [10, 20, 30, 40 | 5, 20, 60, 35] -> ranks [2, 3.5, 5, 7, 1, 3.5, 8, 6]
    score_ranks = np.array([7, 4, 2, 8, 4, 4, 6, 1], dtype=float)
    length_ranks = np.array([2, 3.5, 5, 7, 1, 3.5, 8, 6])
    assert metrics["score_length_spearman"] == pytest.approx(np.corrcoef(score_ranks, length_ranks)[0, 1])


def test_all_ties():
    scores = np.full(3, 0.25)
    metrics = pair_metrics(scores, scores.copy(), np.array([4, 5, 6]), np.array([4, 5, 6]))
    assert metrics["d_acc"] == 0.0 and metrics["d_acc_ties_correct"] == 1.0 and metrics["tie_rate"] == 1.0
    assert metrics["auc"] == 0.5
    assert metrics["pair_logloss"] == pytest.approx(math.log(2))
    assert metrics["length_baseline_acc"] == 0.5
    assert metrics["score_length_spearman"] == 0.0  # constant scores: defined as 0, not NaN


def test_step_metrics_match_the_hand_computation():
    metrics = step_metrics(TEACHER, STUDENT, TEACHER_LEN, STUDENT_LEN)
    assert metrics == pytest.approx({
        "critic/d_acc": 0.5,
        "critic/tie_rate": 0.25,
        "critic/score_diff": 0.75,
        "critic/teacher_score_mean": 1.625,
        "critic/student_score_mean": 0.875,
        "critic/teacher_score_std": math.sqrt(3.6875 / 4),
        "critic/student_score_std": math.sqrt(1.1875 / 4),
        "critic/length_ratio": 1.2,
    })


def test_step_and_pair_metrics_agree_on_shared_names(metrics):
    step = step_metrics(TEACHER, STUDENT, TEACHER_LEN, STUDENT_LEN)
    for name, value in step.items():
        assert metrics[name.removeprefix("critic/")] == pytest.approx(value)


def test_mean_over_pairs_are_exactly_the_metrics_whose_pairs_average_to_the_set_value():
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=50), rng.normal(size=50)
    teacher_len, student_len = rng.integers(5, 60, size=50), rng.integers(5, 60, size=50)
    averaging = set()
    for name in PAIR_METRICS:
        alone = PAIR_METRICS[name](*[np.asarray(a, dtype=np.float64)[:, None]
                                     for a in (teacher, student, teacher_len, student_len)])
        whole = pair_metric(name, teacher, student, teacher_len, student_len)
        if np.isclose(alone.mean(), whole, rtol=0, atol=100 * 50 * np.finfo(np.float64).eps):  # 50 values of ~1
            averaging.add(name)
    assert averaging == set(MEAN_OVER_PAIRS)
    values = per_pair_values("d_acc", TEACHER, STUDENT, TEACHER_LEN, STUDENT_LEN)
    assert values.tolist() == [1.0, 0.0, 0.0, 1.0]  # each pair's own d_acc: teacher strictly above
    with pytest.raises(KeyError, match="'auc' is not a mean over pairs"):
        per_pair_values("auc", TEACHER, STUDENT, TEACHER_LEN, STUDENT_LEN)
