"""Pair metrics on fixed scores: the numbers users compare, computed one way everywhere."""

from __future__ import annotations

import numpy as np
from scipy import stats


def pair_metrics(teacher_scores: np.ndarray, student_scores: np.ndarray,
                 teacher_lengths: np.ndarray, student_lengths: np.ndarray) -> dict[str, float]:
    """Accuracy, ties, AUC, log-loss, score levels and length statistics for aligned pairs.

    `d_acc` is the training rule (teacher strictly above student); `d_acc_ties_correct`
    counts ties as correct (the `<=` rule of the users' old test script).
    """
    t = np.asarray(teacher_scores, dtype=np.float64)
    s = np.asarray(student_scores, dtype=np.float64)
    tl = np.asarray(teacher_lengths, dtype=np.float64)
    sl = np.asarray(student_lengths, dtype=np.float64)
    diff = t - s
    scores, lengths = np.concatenate([t, s]), np.concatenate([tl, sl])
    # AUC = P(teacher score > student score) over all teacher/student combinations, ties half (Mann-Whitney U).
    auc = stats.mannwhitneyu(t, s).statistic / (len(t) * len(s))
    spearman = stats.spearmanr(scores, lengths).statistic if np.ptp(scores) > 0 and np.ptp(lengths) > 0 else 0.0
    longer_is_teacher = np.where(tl == sl, 0.5, (tl > sl).astype(np.float64))
    return {
        "d_acc": float(np.mean(diff > 0)),
        "d_acc_ties_correct": float(np.mean(diff >= 0)),
        "tie_rate": float(np.mean(diff == 0)),
        "auc": float(auc),
        "pair_logloss": float(np.mean(np.logaddexp(0.0, -diff))),  # -log sigmoid(diff), T = 1
        "score_diff": float(diff.mean()),
        "teacher_score_mean": float(t.mean()),
        "student_score_mean": float(s.mean()),
        "teacher_score_std": float(t.std()),
        "student_score_std": float(s.std()),
        "length_ratio": float(sl.mean() / max(tl.mean(), 1e-9)),
        "length_baseline_acc": float(longer_is_teacher.mean()),
        "score_length_spearman": float(spearman),
        "n_pairs": float(len(t)),
    }


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
