"""One trial: load data -> build critic -> train (streaming metrics) -> evaluate -> results.

This is the whole engine as one readable story. It imports neither Optuna nor
MLflow: the sweep passes a Reporter and reads the TrialResult.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from critic.config import ExperimentConfig
from critic.data import TrialData, load_trial_data
from critic.evaluate import Evaluator
from critic.model import fresh_critic, load_base_critic, select_device, tokenizer_digest, trainable_counts
from critic.reporting import NullReporter, Reporter
from critic.train import TrainOutcome, train_critic


@dataclass
class TrialResult:
    metrics: dict[str, float]  # final held-out metrics, train/* summaries and data/* counts
    eval_history: list[tuple[int, dict[str, float]]]
    pair_scores: pd.DataFrame  # per pair of every held-out set at the final evaluation
    data_digests: dict[str, str]
    model: torch.nn.Module | None = None
    tokenizer: object = None
    timings: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)  # which student produced the responses
    train_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # every step's metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg: ExperimentConfig):
    """Everything a trial needs that does not depend on its hyperparameters (cached per process)."""
    if cfg.model.torch_threads > 0:
        torch.set_num_threads(cfg.model.torch_threads)
    device = select_device(cfg.model.device)
    base = load_base_critic(cfg.model, cfg.data.cache_dir)
    data: TrialData = load_trial_data(cfg.data, base.tokenizer, tokenizer_digest(base.tokenizer), cfg.student)
    return device, base, data


def trial_metrics(outcome: TrainOutcome, data: TrialData) -> dict[str, float]:
    """The final held-out metrics plus data counts and the train/* summaries of a finished training."""
    metrics = dict(outcome.last_eval)
    metrics.update(data.stats)
    metrics["train/steps"] = float(outcome.steps)
    metrics["train/progressive_d_acc"] = outcome.progressive_d_acc
    metrics["train/gap_progressive_minus_val"] = outcome.progressive_d_acc - metrics["val/d_acc"]
    return metrics


def run_trial(cfg: ExperimentConfig, reporter: Reporter | None = None, progress: bool = False,
              keep_model: bool = False) -> TrialResult:
    """Train one critic with `cfg` and evaluate it on every held-out set (train.save_checkpoint keeps the model)."""
    keep_model = keep_model or cfg.train.save_checkpoint  # the caller decides where to write it
    started = time.perf_counter()
    reporter = reporter or NullReporter()
    device, base, data = prepare(cfg)
    pad_id = base.tokenizer.pad_token_id
    seed_everything(cfg.train.seed)
    model = fresh_critic(base, cfg.model, device)
    evaluator = Evaluator(data.heldout(cfg.eval.confirm_split), cfg.score, cfg.eval.batch_size, device, pad_id)
    setup_seconds = time.perf_counter() - started
    outcome = train_critic(model, data.train, cfg, device, pad_id, reporter, evaluator, progress)
    metrics = trial_metrics(outcome, data)
    metrics.update(trainable_counts(model))  # model/trainable_params: all of them, or LoRA adapters + value head
    timings = {"setup_s": setup_seconds, "train_s": outcome.train_seconds, "eval_s": outcome.eval_seconds,
               "total_s": time.perf_counter() - started}
    return TrialResult(metrics, outcome.eval_history, evaluator.last_scores, data.digests,
                       model if keep_model else None, base.tokenizer, timings, dict(data.lineage),
                       outcome.train_history)
