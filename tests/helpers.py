"""Small builders shared by the engine tests: tiny parquet files, tiny specs, hand-made pair sets."""

from __future__ import annotations

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
