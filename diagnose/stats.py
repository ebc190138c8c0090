"""Measurements behind `diagnose`: pure functions of per-pair scores, token ids and training curves.

Nothing here judges; diagnose.verdicts turns these numbers into verdicts with its thresholds.
Scores always come from critic.evaluate.score_set (the engine's one scoring path).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon

from critic.data import PairSet
from critic.metrics import per_pair_values
from critic.reporting import series
from critic.stats import SCORE_COLUMNS, crossed_spread, prompt_codes

LENGTH_MATCH_TOLERANCE = 0.10  # two responses are "length-matched" when they differ by < 10% of the longer one


def d_acc_se(scores: pd.DataFrame) -> float:
    """Standard error of d_acc on these scored pairs, the pairs of a prompt counted together (critic.stats).

    Pairs that share a prompt share its teacher response: they are not independent draws.
    """
    prompts = prompt_codes(scores)
    if len(scores) < 2 or prompts.max() < 1:
        return math.nan
    correct = per_pair_values("d_acc", *(scores[c].to_numpy() for c in SCORE_COLUMNS))[None]  # (1 critic, N)
    return max(float(crossed_spread(correct, prompts).se), 1.0 / len(scores))  # 0 or 1 on few pairs is not certainty


def identical_responses(pairs: PairSet) -> np.ndarray:
    """(N,) bool: teacher and student token ids are the same (the engine scores them as one row: a tie)."""
    return np.array([np.array_equal(t, s) for t, s in zip(pairs.teacher_ids, pairs.student_ids)], dtype=bool)


def length_buckets(scores: pd.DataFrame, identical: np.ndarray,
                   tolerance: float = LENGTH_MATCH_TOLERANCE) -> dict[str, float]:
    """Strict d_acc on length-matched pairs and on pairs where the teacher is clearly longer / shorter.

    A critic that learned "longer is better" is right where the teacher is longer and wrong where it is
    shorter; a critic that learned quality is right on both. Identical responses (ties by construction)
    are left out: they say nothing about length.
    """
    teacher_len = scores["teacher_length"].to_numpy(float)
    student_len = scores["student_length"].to_numpy(float)
    correct = (scores["teacher_score"] > scores["student_score"]).to_numpy()
    relative = (teacher_len - student_len) / np.maximum(np.maximum(teacher_len, student_len), 1)
    differ = ~identical
    buckets = {"length_matched": differ & (np.abs(relative) < tolerance), "teacher_longer": relative >= tolerance,
               "teacher_shorter": relative <= -tolerance}
    out: dict[str, float] = {}
    for name, chosen in buckets.items():
        out[f"{name}_pairs"] = float(chosen.sum())
        out[f"{name}_d_acc"] = float(correct[chosen].mean()) if chosen.any() else math.nan
    return out


def _quantiles(values: np.ndarray, prefix: str) -> dict[str, float]:
    return {f"{prefix}_mean": float(values.mean()), f"{prefix}_median": float(np.median(values)),
            f"{prefix}_p90": float(np.quantile(values, 0.9))}


def text_stats(pairs: PairSet) -> dict[str, float]:
    """Token lengths (mean, median, p90) of prompts and responses, and the identical-response rate."""
    out = {"identical_rate": float(identical_responses(pairs).mean())}
    for part, seqs in (("prompt", pairs.prompt_ids), ("teacher", pairs.teacher_ids), ("student", pairs.student_ids)):
        out.update(_quantiles(np.array([len(x) for x in seqs], dtype=float), f"{part}_tokens"))
    return out


def score_levels(metrics: dict[str, float]) -> dict[str, float]:
    """Absolute level (mean of teacher and student means), pooled std and the standardized score_diff."""
    pooled = math.sqrt((metrics["teacher_score_std"] ** 2 + metrics["student_score_std"] ** 2) / 2)
    return {"score_level": (metrics["teacher_score_mean"] + metrics["student_score_mean"]) / 2,
            "score_pooled_std": pooled,
            "standardized_diff": metrics["score_diff"] / pooled if pooled > 0 else math.nan}


def unigram_counts(sequences: list[np.ndarray], vocab_size: int) -> np.ndarray:
    """(vocab_size,) token counts over a list of id arrays."""
    if not sequences:
        return np.zeros(vocab_size)
    return np.bincount(np.concatenate(sequences).astype(np.int64), minlength=vocab_size)[:vocab_size].astype(float)


def js_distance(counts_a: np.ndarray, counts_b: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, 0 = same distribution, 1 = disjoint) of two unigram count vectors."""
    if counts_a.sum() == 0 or counts_b.sum() == 0:
        return math.nan
    return float(jensenshannon(counts_a, counts_b, base=2))


def token_divergence(pairs: PairSet, reference: PairSet, vocab_size: int) -> dict[str, float]:
    """JS distance of prompt, teacher and student unigram distributions from those of `reference`."""
    out = {}
    for part in ("prompt", "teacher", "student"):
        ours = unigram_counts(getattr(pairs, f"{part}_ids"), vocab_size)
        theirs = unigram_counts(getattr(reference, f"{part}_ids"), vocab_size)
        out[f"js_{part}"] = js_distance(ours, theirs)
    return out


def progressive_d_acc(final_metrics: dict[str, float], train_history, steps_per_epoch: int) -> tuple[float, str]:
    """First-epoch training d_acc (each batch scored before its update) and where the number came from."""
    value = final_metrics.get("train/progressive_d_acc", math.nan)
    if math.isfinite(value):
        return value, "train/progressive_d_acc"
    steps, values = series(train_history, "critic/d_acc")
    first_epoch = values[steps <= steps_per_epoch]
    if len(first_epoch) == 0:
        return math.nan, "no training history"
    return float(first_epoch.mean()), f"mean critic/d_acc over {len(first_epoch)} first-epoch steps"


def window_mean(history, key: str, fraction: float, min_steps: int, where: str = "last") -> float:
    """Mean of a training metric over the first or last `fraction` of its steps (at least `min_steps`)."""
    _, values = series(history, key)
    if len(values) == 0:
        return math.nan
    size = min(len(values), max(min_steps, int(round(fraction * len(values)))))
    part = values[-size:] if where == "last" else values[:size]
    return float(np.median(part) if key == "critic/grad_norm" else part.mean())  # grad spikes: median


def late_trend(history, key: str) -> float:
    """Change of a metric over the second half of training, from a least-squares line (NaN if < 4 points)."""
    steps, values = series(history, key)
    half = len(values) // 2
    if len(values) - half < 4:
        return math.nan
    slope, _ = np.polyfit(steps[half:], values[half:], 1)
    return float(slope * (steps[-1] - steps[half]))


def fold_summary(folds: pd.DataFrame) -> pd.DataFrame:
    """mean, std, min, max of every numeric column of the per-fold table."""
    numeric = folds.drop(columns=["fold"]).select_dtypes("number")
    return pd.DataFrame({"mean": numeric.mean(), "std": numeric.std(ddof=1), "min": numeric.min(),
                         "max": numeric.max()})
