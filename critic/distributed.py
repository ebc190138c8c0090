"""One trial on several ranks (torchrun): FSDP2-sharded critic, sharded steps and evaluation, rank-0 reporting.

The same story as critic/trial.py, with three pieces swapped in:
- the critic is wrapped with FSDP2 (`fully_shard` per decoder layer, then the root), after LoRA;
- each optimizer step's micro-batch groups are dealt to the ranks (`sharded_train_step`), every loss weighted
  by its share of the *global* batch and the gradients summed, so the update equals the one-process update;
- each rank scores a shard of every held-out set (`ShardedEvaluator`); the per-pair scores are gathered and the
  metrics computed once from all pairs (critic/metrics.py), as in one process.
FSDP runs collectives inside every forward and backward, so every rank must run the same sequence of
forwards: a rank with less work runs "ghost" forwards (a real pair, loss weight 0) to stay in step.

Only rank 0 reports (`RankZeroReporter`); a reporter's verdict at an evaluation (e.g. "pruned") is broadcast,
so every rank stops at the same step. This module imports neither Optuna nor MLflow; sweeper/launch.py starts
the ranks and carries rank 0's reports to the sweep.
"""

from __future__ import annotations

import os
import time
import warnings
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from critic.config import ExperimentConfig
from critic.data import PairSet
from critic.evaluate import Evaluator, score_frame
from critic.loss import bradley_terry_loss
from critic.model import fresh_critic
from critic.reporting import FanoutReporter, Reporter
from critic.score import score_pairs
from critic.train import _group_temperature, forward_chunks, train_critic
from critic.trial import TrialResult, prepare, seed_everything, trial_metrics


class StopTrial(RuntimeError):
    """Rank 0's reporter stopped the trial (pruned, interrupted); raised on every rank at the same step."""


def init_distributed(timeout_s: float) -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU); returns this rank's device.

    `timeout_s` bounds every collective: a rank that hangs fails the trial instead of the sweep.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device
                            if device.type == "cuda" else None)
    return device


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer's list of decoder layers, found by name (works under a LoRA wrapper too)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.split(".")[-1] == "layers":
            return module
    raise ValueError(f"no decoder `layers` list in {type(model).__name__}: cannot shard it per layer")


def shard_critic(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: each decoder layer its own unit (one all-gather per layer), then the root (embeddings, head)."""
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)  # gradients are averaged over ranks (sharded_train_step's weights undo the 1/W)
    return model


def forward_counts(group_size: int, cfg: ExperimentConfig) -> tuple[int, int]:
    """(no-grad forwards, grad forwards) of one micro-batch group in train_step (critic/train.py)."""
    chunks = -(-group_size // (cfg.train.forward_micro_batch_size or cfg.train.micro_batch_size))
    return (chunks if chunks > 1 and cfg.loss.adaptive_temperature else 0), chunks


def sharded_train_step(model, pairs: PairSet, batch_index: np.ndarray, cfg: ExperimentConfig, device, pad_id: int):
    """train_step (critic/train.py) over all ranks: this rank's groups, the whole step's results.

    The global batch's micro-batch groups (the adaptive T's unit) are dealt round robin: rank r takes
    groups r, r + W, ... Returns what train_step returns for the *global* batch, on every rank: teacher and
    student scores in `batch_index` order, the mean loss and temperature, and the forward tokens of all ranks.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    micro, forward = cfg.train.micro_batch_size, cfg.train.forward_micro_batch_size or cfg.train.micro_batch_size
    groups = [np.arange(start, min(start + micro, len(batch_index))) for start in range(0, len(batch_index), micro)]
    ghost = batch_index[:1]  # any real pair: a forward that keeps this rank's collectives in step, weight 0
    positions, teacher, student = [], [], []
    sums = torch.zeros(3, dtype=torch.float64)  # loss x pairs, temperature x pairs, tokens (host side)
    for start in range(0, len(groups), world):
        row = groups[start:start + world]  # one group per rank at this position (the last row may be short)
        no_grad_max = max(forward_counts(len(g), cfg)[0] for g in row)
        grad_max = max(forward_counts(len(g), cfg)[1] for g in row)
        mine = row[rank] if rank < len(row) else np.zeros(0, dtype=np.int64)
        chunks = forward_chunks(mine, forward) if len(mine) else []
        group_temperature, no_grad_done = None, 0
        if len(chunks) > 1 and cfg.loss.adaptive_temperature:  # T of the whole group, as in train_step
            group_temperature = _group_temperature(model, pairs, [batch_index[c] for c in chunks], cfg, device,
                                                   pad_id)
            no_grad_done = len(chunks)
        with torch.no_grad():
            for _ in range(no_grad_max - no_grad_done):
                score_pairs(model, pairs, ghost, pad_id, cfg.score, device)
        for k in range(grad_max):
            real = k < len(chunks)
            index = batch_index[chunks[k]] if real else ghost
            t_scores, s_scores, n_tokens = score_pairs(model, pairs, index, pad_id, cfg.score, device)
            loss, temperature = bradley_terry_loss(t_scores, s_scores, cfg.loss, group_temperature)
            # share of the global batch, times W: FSDP averages the ranks' gradients (the sum is the 1-process one)
            (loss * (world * len(index) / len(batch_index) if real else 0.0)).backward()
            if real:
                positions.append(chunks[k])
                teacher.append(t_scores.detach().float().cpu().numpy())
                student.append(s_scores.detach().float().cpu().numpy())
                sums += torch.tensor([float(loss) * len(index), float(temperature) * len(index), n_tokens],
                                     dtype=torch.float64)
    sums = sums.to(device)  # NCCL reduces device tensors only
    dist.all_reduce(sums)
    sums = sums.cpu()
    teacher_all, student_all = np.zeros(len(batch_index)), np.zeros(len(batch_index))
    for where, t_part, s_part in gather_parts(positions, teacher, student):
        teacher_all[where], student_all[where] = t_part, s_part
    n = len(batch_index)
    as_tensor = lambda values: torch.as_tensor(values, dtype=torch.float32, device=device)  # noqa: E731
    return as_tensor(teacher_all), as_tensor(student_all), as_tensor(sums[0] / n), as_tensor(sums[1] / n), \
        int(sums[2])


def gather_parts(positions: list[np.ndarray], *columns: list[np.ndarray]) -> list[tuple[np.ndarray, ...]]:
    """Every rank's (positions, column values...) pieces, concatenated per rank, from all ranks."""
    local = tuple(np.concatenate(parts) if parts else np.zeros(0) for parts in (positions, *columns))
    local = (local[0].astype(np.int64), *local[1:])
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


class ShardedEvaluator(Evaluator):
    """Each rank scores every W-th batch of a set (long first, as score_set); the scores are gathered."""

    def score_set(self, model: torch.nn.Module, pairs: PairSet):
        rank, world = dist.get_rank(), dist.get_world_size()
        order = np.argsort(-pairs.pair_lengths(), kind="stable")
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        mine = batches[rank::world]
        positions, teacher, student = [], [], []
        was_training = model.training
        model.eval()
        with torch.no_grad():  # not inference_mode: FSDP's sharded parameters are reused by the next step
            for k in range(-(-len(batches) // world)):  # the same number of forwards on every rank
                index = mine[k] if k < len(mine) else order[:1]
                t_scores, s_scores, _ = score_pairs(model, pairs, index, self.pad_id, self.score_cfg, self.device)
                if k < len(mine):
                    positions.append(index)
                    teacher.append(t_scores.float().cpu().numpy())
                    student.append(s_scores.float().cpu().numpy())
        model.train(was_training)
        teacher_all, student_all = np.zeros(len(pairs)), np.zeros(len(pairs))
        for where, t_part, s_part in gather_parts(positions, teacher, student):
            teacher_all[where], student_all[where] = t_part, s_part
        return score_frame(pairs, teacher_all, student_all)


class RankZeroReporter(Reporter):
    """Only rank 0 reports; its reporter's verdict at an evaluation reaches every rank as StopTrial."""

    def __init__(self, inner: Reporter) -> None:
        self.inner, self.rank = inner, dist.get_rank()

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank == 0:
            self.inner.log_train(step, metrics)  # an exception here ends rank 0; torchrun then stops the rest

    def log_eval(self, step: int, metrics: dict[str, float], pair_scores=None, final: bool = False) -> None:
        verdict: list[str | None] = [None]
        if self.rank == 0:
            try:
                self.inner.log_eval(step, metrics, pair_scores, final)
            except Exception as exc:  # e.g. pruned: every rank must stop here, not only rank 0
                verdict = [f"{type(exc).__name__}: {exc}"]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise StopTrial(verdict[0])


def run_sharded_trial(cfg: ExperimentConfig, reporter: Reporter, device: torch.device,
                      every_rank: Reporter | None = None) -> TrialResult:
    """run_trial (critic/trial.py) on every rank of an initialised process group; every rank gets the result.

    `reporter` hears rank 0 only (the sweep's view); `every_rank`, if given, is called on every rank (test hooks).
    """
    started = time.perf_counter()
    _, base, data = prepare(cfg)
    pad_id = base.tokenizer.pad_token_id
    seed_everything(cfg.train.seed)
    model = shard_critic(fresh_critic(base, cfg.model, device))  # after LoRA: FSDP shards what will train
    evaluator = ShardedEvaluator(data.heldout(cfg.eval.confirm_split), cfg.score, cfg.eval.batch_size, device,
                                 pad_id)
    setup_seconds = time.perf_counter() - started
    with warnings.catch_warnings():  # FSDP2 warns that the critic returns a view; nothing edits it in place
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        reporters = FanoutReporter(*filter(None, [every_rank, RankZeroReporter(reporter)]))
        outcome = train_critic(model, data.train, cfg, device, pad_id, reporters, evaluator,
                               step_fn=sharded_train_step)
    timings = {"setup_s": setup_seconds, "train_s": outcome.train_seconds, "eval_s": outcome.eval_seconds,
               "total_s": time.perf_counter() - started}
    return TrialResult(trial_metrics(outcome, data), outcome.eval_history, evaluator.last_scores, data.digests,
                       None, None, timings, dict(data.lineage), outcome.train_history)
