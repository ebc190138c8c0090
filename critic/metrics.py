"""Pair metrics on fixed scores: the numbers users compare, computed one way everywhere.

Every metric is a function of four aligned arrays (teacher/student scores, teacher/student
response lengths) that reduces over the last axis. With 1-D inputs it gives one number; with
(resamples, pairs) inputs it gives one number per resample, which is how the confirmation
stage bootstraps held-out pairs through the very same functions.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats


def _mean(x: np.ndarray) -> np.ndarray:
    return np.mean(x, axis=-1)


def _auc(t, s, tl, sl):
    # P(teacher score > student score) over all teacher/student combinations, ties half (Mann-Whitney U).
    n = t.shape[-1]
    return stats.mannwhitneyu(t, s, axis=-1).statistic / (n * n)


def _spearman(t, s, tl, sl):
    """Rank correlation of scores with lengths (teacher and student pooled); 0 where either is constant."""
    scores, lengths = np.concatenate([t, s], axis=-1), np.concatenate([tl, sl], axis=-1)
    score_ranks = stats.rankdata(scores, axis=-1)
    length_ranks = stats.rankdata(lengths, axis=-1)
    score_ranks = score_ranks - score_ranks.mean(axis=-1, keepdims=True)
    length_ranks = length_ranks - length_ranks.mean(axis=-1, keepdims=True)
    norm = np.sqrt((score_ranks ** 2).sum(axis=-1) * (length_ranks ** 2).sum(axis=-1))
    safe = np.where(norm > 0, norm, 1.0)
    return np.where(norm > 0, (score_ranks * length_ranks).sum(axis=-1) / safe, 0.0)


def _length_baseline(t, s, tl, sl):
    return _mean(np.where(tl == sl, 0.5, (tl > sl).astype(np.float64)))


# name -> f(teacher_scores, student_scores, teacher_lengths, student_lengths), reducing the last axis.
# `d_acc` is the training rule (teacher strictly above student); `d_acc_ties_correct` counts ties
# as correct (the `<=` rule of the users' old test script).
PAIR_METRICS: dict[str, Callable[..., np.ndarray]] = {
    "d_acc": lambda t, s, tl, sl: _mean(t - s > 0),
    "d_acc_ties_correct": lambda t, s, tl, sl: _mean(t - s >= 0),
    "tie_rate": lambda t, s, tl, sl: _mean(t - s == 0),
    "auc": _auc,
    "pair_logloss": lambda t, s, tl, sl: _mean(np.logaddexp(0.0, -(t - s))),  # -log sigmoid(diff), T = 1
    "score_diff": lambda t, s, tl, sl: _mean(t - s),
    "teacher_score_mean": lambda t, s, tl, sl: _mean(t),
    "student_score_mean": lambda t, s, tl, sl: _mean(s),
    "teacher_score_std": lambda t, s, tl, sl: np.std(t, axis=-1),
    "student_score_std": lambda t, s, tl, sl: np.std(s, axis=-1),
    "length_ratio": lambda t, s, tl, sl: _mean(sl) / np.maximum(_mean(tl), 1e-9),
    "length_baseline_acc": _length_baseline,
    "score_length_spearman": _spearman,
    "n_pairs": lambda t, s, tl, sl: np.full(t.shape[:-1], float(t.shape[-1])),
}


# The metrics that are a mean over pairs: the set's value is the mean of each pair's own value (the metric on
# that pair alone), so two critics can be compared pair by pair (the pruner's paired test, sweeper/pruning.py).
# AUC, the standard deviations, ratios and rank correlations are not (tests/test_metrics.py checks both ways).
MEAN_OVER_PAIRS = ("d_acc", "d_acc_ties_correct", "tie_rate", "pair_logloss", "score_diff", "teacher_score_mean",
                   "student_score_mean", "length_baseline_acc")


def _arrays(*arrays) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def pair_metric(name: str, teacher_scores, student_scores, teacher_lengths, student_lengths) -> np.ndarray:
    """One metric of PAIR_METRICS; a float for 1-D inputs, an array for batched (..., pairs) inputs."""
    if name not in PAIR_METRICS:
        raise KeyError(f"unknown pair metric {name!r}; known: {', '.join(PAIR_METRICS)}")
    return PAIR_METRICS[name](*_arrays(teacher_scores, student_scores, teacher_lengths, student_lengths))


def per_pair_values(name: str, teacher_scores, student_scores, teacher_lengths, student_lengths) -> np.ndarray:
    """(..., pairs) each pair's own value of a MEAN_OVER_PAIRS metric: its PAIR_METRICS function on that pair alone."""
    if name not in MEAN_OVER_PAIRS:
        raise KeyError(f"{name!r} is not a mean over pairs, so it has no per-pair values; those that are: "
                       f"{', '.join(MEAN_OVER_PAIRS)}")
    columns = [a[..., None] for a in _arrays(teacher_scores, student_scores, teacher_lengths, student_lengths)]
    return PAIR_METRICS[name](*columns)  # (..., pairs, 1) reduced over its last axis: one set of one pair each


def pair_metrics(teacher_scores: np.ndarray, student_scores: np.ndarray,
                 teacher_lengths: np.ndarray, student_lengths: np.ndarray) -> dict[str, float]:
    """Accuracy, ties, AUC, log-loss, score levels and length statistics for aligned pairs."""
    arrays = _arrays(teacher_scores, student_scores, teacher_lengths, student_lengths)
    return {name: float(metric(*arrays)) for name, metric in PAIR_METRICS.items()}


def step_metrics(teacher_scores: np.ndarray, student_scores: np.ndarray,
                 teacher_lengths: np.ndarray, student_lengths: np.ndarray) -> dict[str, float]:
    """The per-step training metrics (verl's `critic/` names) on the batch before its update."""
    diff = teacher_scores - student_scores
    return {
        "critic/d_acc": float(np.mean(diff > 0)),
        "critic/tie_rate": float(np.mean(diff == 0)),
        "critic/score_diff": float(diff.mean()),
        "critic/teacher_score_mean": float(np.mean(teacher_scores)),
        "critic/student_score_mean": float(np.mean(student_scores)),
        "critic/teacher_score_std": float(np.std(teacher_scores)),
        "critic/student_score_std": float(np.std(student_scores)),
        "critic/length_ratio": float(np.mean(student_lengths) / max(np.mean(teacher_lengths), 1e-9)),
    }
