"""Held-out evaluation: the training scoring path under inference_mode, with larger batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from critic.config import ScoreConfig
from critic.data import PairSet
from critic.metrics import pair_metrics
from critic.score import score_pairs


def score_set(model: torch.nn.Module, pairs: PairSet, score_cfg: ScoreConfig, batch_size: int,
              device: torch.device, pad_id: int) -> pd.DataFrame:
    """Per-pair scores of one set: pair_id, prompt_id, teacher/student score, teacher/student response tokens."""
    order = np.argsort(-pairs.pair_lengths(), kind="stable")  # long first: padding stays small, OOM shows early
    teacher, student = np.zeros(len(pairs)), np.zeros(len(pairs))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            t, s, _ = score_pairs(model, pairs, index, pad_id, score_cfg, device)
            teacher[index], student[index] = t.cpu().numpy(), s.cpu().numpy()
    model.train(was_training)
    return score_frame(pairs, teacher, student)


def score_frame(pairs: PairSet, teacher: np.ndarray, student: np.ndarray) -> pd.DataFrame:
    """The per-pair score table of a set from its (pairs,) teacher and student scores.

    `prompt_id` numbers the set's distinct prompts: pairs that share a prompt (verl's rollout.n responses to
    one prompt) share its teacher response, so paired statistics treat them as one unit.
    """
    return pd.DataFrame({
        "set": pairs.name, "pair_id": np.arange(len(pairs)),
        "prompt_id": pd.factorize(pd.Series(pairs.prompt_text, dtype=object))[0],
        "teacher_score": teacher, "student_score": student,
        "teacher_length": [len(x) for x in pairs.teacher_ids],
        "student_length": [len(x) for x in pairs.student_ids],
    })


def metrics_from_scores(frame: pd.DataFrame) -> dict[str, float]:
    """pair_metrics of a per-pair score table (as returned by score_set)."""
    return pair_metrics(frame["teacher_score"].to_numpy(), frame["student_score"].to_numpy(),
                        frame["teacher_length"].to_numpy(), frame["student_length"].to_numpy())


class Evaluator:
    """Evaluates a critic on every held-out set; keeps the latest per-pair scores."""

    def __init__(self, eval_sets: dict[str, PairSet], score_cfg: ScoreConfig, batch_size: int,
                 device: torch.device, pad_id: int) -> None:
        self.eval_sets, self.score_cfg, self.batch_size = eval_sets, score_cfg, batch_size
        self.device, self.pad_id = device, pad_id
        self.last_scores: pd.DataFrame | None = None

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        metrics, frames = {}, []
        for name, pairs in self.eval_sets.items():
            frame = self.score_set(model, pairs)
            metrics.update({f"{name}/{k}": v for k, v in metrics_from_scores(frame).items()})
            frames.append(frame)
        self.last_scores = pd.concat(frames, ignore_index=True)
        return metrics

    def score_set(self, model: torch.nn.Module, pairs: PairSet) -> pd.DataFrame:
        """One set's per-pair scores (critic/distributed.py shards this over ranks)."""
        return score_set(model, pairs, self.score_cfg, self.batch_size, self.device, self.pad_id)
