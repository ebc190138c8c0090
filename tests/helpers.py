"""Small builders shared by the engine tests: tiny parquet files, tiny specs, hand-made pair sets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from critic.config import ExperimentConfig, apply_overrides, build_config
from critic.data import PairSet
from critic.demo import make_demo_frame

COLUMNS = ["content", "teacher_response", "student_response"]
PAIR_METRIC_NAMES = {"d_acc", "d_acc_ties_correct", "tie_rate", "auc", "pair_logloss", "score_diff",
                     "teacher_score_mean", "student_score_mean", "teacher_score_std", "student_score_std",
                     "length_ratio", "length_baseline_acc", "score_length_spearman", "n_pairs"}


def write_pairs(path: Path, rows: list[tuple] | pd.DataFrame, columns: list[str] = COLUMNS) -> Path:
    """Write (prompt, teacher, student) rows as a parquet file, the users' format."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def demo_pairs(path: Path, n: int, name: str = "train") -> Path:
    """The first `n` rows of a demo set as a parquet file: realistic text, distinct prompts."""
    return write_pairs(path, make_demo_frame(name).head(n).reset_index(drop=True))


def tiny_config(train_path: Path, cache_dir: Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """A spec small enough for a CPU test: tiny preset, short sequences, 4-pair steps, one torch thread."""
    raw = {
        # No confirmation split: an engine test's 16-48 pairs would leave it a pair or two (or none, an error).
        "data": {"train_path": str(train_path), "cache_dir": str(cache_dir), "val_fraction": 0.25,
                 "confirm_fraction": 0.0, "max_prompt_length": 32, "max_response_length": 24},
        "model": {"preset": "tiny", "device": "cpu", "torch_threads": 1},
        "train": {"lr": 1e-3, "batch_size": 4, "micro_batch_size": 4, "max_steps": 3},
        "eval": {"every_steps": 2, "batch_size": 16},
    }
    return build_config(apply_overrides(raw, overrides or {}), source="tiny test spec")


def hand_pair_set(pairs: list[tuple[list[int], list[int], list[int], bool, bool]], name: str = "hand") -> PairSet:
    """A PairSet from raw ids: [(prompt_ids, teacher_ids, student_ids, teacher_ends_eos, student_ends_eos)]."""
    ids = lambda k: [np.asarray(p[k], dtype=np.int32) for p in pairs]  # noqa: E731
    return PairSet(name, ids(0), ids(1), ids(2), [f"prompt {i}" for i in range(len(pairs))],
                   np.array([p[3] for p in pairs], dtype=bool), np.array([p[4] for p in pairs], dtype=bool))


def without_perf(log: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict[str, float]]]:
    """A reporter's log minus wall-clock throughput, which differs between identical runs."""
    return [(step, {k: v for k, v in metrics.items() if not k.startswith("perf/")}) for step, metrics in log]


def simulate_device(monkeypatch, device_pairs: int) -> None:
    """A device that fits `device_pairs` pairs per forward: a training forward of more raises a real torch OOM."""
    import torch

    from critic import train
    split = train.forward_chunks

    def chunks(group: np.ndarray, size: int) -> list[np.ndarray]:
        for index in split(group, size):
            if len(index) > device_pairs:
                raise torch.OutOfMemoryError(f"simulated: a micro-batch of {len(index)} pairs does not fit a device "
                                             f"of {device_pairs} pairs")
        return split(group, size)

    monkeypatch.setattr(train, "forward_chunks", chunks)


# --- Numeric tolerances, derived rather than measured on one machine ------------------------------------------
F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7: the unit roundoff of float32 is half of it
# Numeric tests run at one torch thread and at several: another thread count splits every reduction another
# way, the change of summation order that another machine's kernels make (issue 24).
THREAD_SETTINGS = (1, max(2, os.cpu_count() or 1))


def decoder_sum_length(hidden: int, intermediate: int, layers: int, tokens: int) -> int:
    """How many float32 terms the sequential sums that produce one score add up over, summed over the layers.

    Per decoder layer: the q/k/v and o projections and the MLP's up and down projections reduce over hidden
    or intermediate (3 * hidden + intermediate), attention over the row's tokens twice (scores' softmax
    normaliser and the weighted sum of values: 2 * tokens); the value head reduces over hidden once more.
    """
    return layers * (3 * hidden + intermediate + 2 * tokens) + hidden


def reorder_tolerance(magnitude: float, terms: int) -> float:
    """Bound on |a - b| when a and b are the same float32 computation with its sums taken in another order.

    Higham's bound for a sum of n terms is (n - 1) * u * sum|terms| with u = eps / 2 for each of the two
    results, so their difference is within n * eps * magnitude where `magnitude` bounds the sum of |terms|
    along the way (the largest |value| compared; activations are normalised, so they do not grow with depth).
    It is a worst case: a real machine lands orders of magnitude inside it, and any change in what is summed
    (a wrong mask, a dropped micro-batch, a missing scale) moves scores by 1e-3..1e-1, far outside it.
    """
    return terms * F32_EPS * magnitude


def adam_max_update(steps: int, betas: tuple[float, float], lr: float) -> float:
    """The largest total change AdamW can make to one parameter in `steps` steps at learning rate <= lr.

    Each step moves a parameter by lr * m_hat / (sqrt(v_hat) + eps); by Cauchy-Schwarz over the gradient
    history, |m_hat| / sqrt(v_hat) <= sqrt(sum_i a_i^2 / b_i) with a_i, b_i the bias-corrected EMA weights of
    gradient i in m and v (Kingma & Ba 2015, section 2.1: the step is bounded by about lr whatever the
    gradients, even a gradient that is pure rounding noise).
    """
    beta1, beta2 = betas
    total = 0.0
    for t in range(1, steps + 1):
        a = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1 ** t) for i in range(1, t + 1)]
        b = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2 ** t) for i in range(1, t + 1)]
        total += lr * float(np.sqrt(sum(x * x / y for x, y in zip(a, b))))
    return total


def tiny_tolerance(reference, tokens: int, batch_tokens: int = 0) -> float:
    """reorder_tolerance for the tiny preset critic: rows of up to `tokens` tokens; `batch_tokens` adds the sum
    over a batch's tokens that a weight's gradient takes (0 for scores)."""
    from critic.model import TINY_SHAPE

    terms = decoder_sum_length(TINY_SHAPE["hidden_size"], TINY_SHAPE["intermediate_size"],
                               TINY_SHAPE["num_hidden_layers"], tokens) + batch_tokens
    return reorder_tolerance(float(np.abs(np.asarray(reference, dtype=np.float64)).max()), terms)
