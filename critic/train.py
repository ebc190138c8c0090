"""The critic warmup loop: batches as verl forms them, one forward per micro-batch, BT loss, AdamW."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from critic.config import ExperimentConfig
from critic.data import PairSet
from critic.evaluate import Evaluator
from critic.loss import bradley_terry_loss, bt_temperature
from critic.metrics import step_metrics
from critic.reporting import Reporter, TrailingMeans
from critic.score import score_pairs
from critic.verl_units import plain_verl, verl_batches, verl_lr_lambda


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm became NaN/inf; the sweep prunes the trial with this reason."""

    def __init__(self, step: int, what: str, value: float) -> None:
        super().__init__(f"non-finite {what} ({value}) at step {step}")
        self.step, self.what, self.value = step, what, value


class TrialOutOfMemory(RuntimeError):
    """The device ran out of memory; the sweep may retry with a smaller micro-batch."""


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then sort by length inside chunks of 16 batches so each batch holds similar lengths."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 16
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def total_steps(n_pairs: int, cfg: ExperimentConfig) -> int:
    if cfg.verl.in_use():  # verl's warmup length is in iterations, whatever the data size
        return cfg.train.max_steps
    steps = cfg.train.epochs * (n_pairs // cfg.train.batch_size)  # verl's dataloader drops an incomplete batch
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def step_batches(pairs: PairSet, cfg: ExperimentConfig, rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
    """Every optimizer step's pairs in training order, each with `fresh`: none of them trained on before.

    As verl forms them (`verl_batches`: shuffled pairs; a plain train.* spec through `plain_verl`), or with
    train.length_grouping the same number of full batches per pass, each of pairs of similar length.
    """
    n_steps = total_steps(len(pairs), cfg)
    if not cfg.train.length_grouping:
        verl = cfg.verl if cfg.verl.in_use() else plain_verl(cfg.train, len(pairs), n_steps)
        return verl_batches(len(pairs), verl, rng)
    lengths, size, batches = pairs.pair_lengths(), cfg.train.batch_size, []
    for epoch in range(cfg.train.epochs):
        full = [index for index in length_grouped_batches(lengths, size, rng) if len(index) == size]
        batches.extend((index, epoch == 0) for index in full)
    return batches[:n_steps]


def build_optimizer(model: torch.nn.Module, cfg: ExperimentConfig, n_steps: int):
    """AdamW over the trainable parameters only (a LoRA critic: adapters and value head) and its lr schedule."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]  # no AdamW states for frozen LoRA base weights
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    if cfg.verl.in_use():  # verl's schedule: stepped once per iteration, cosine over the whole RL run
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, verl_lr_lambda(cfg))
    name = "constant_with_warmup" if t.scheduler == "constant" else t.scheduler
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=n_steps)
    return optimizer, scheduler


@dataclass
class TrainOutcome:
    steps: int = 0
    progressive_d_acc: float = float("nan")  # first-epoch d_acc before each update: unbiased on the train distribution
    last_eval: dict[str, float] = field(default_factory=dict)
    eval_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    train_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # every step's metrics
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


def forward_chunks(group: np.ndarray, size: int) -> list[np.ndarray]:
    """A micro-batch cut into forwards of at most `size` pairs (a forward that does not fit raises an OOM)."""
    return [group[start:start + size] for start in range(0, len(group), size)]


def _group_temperature(model, pairs: PairSet, chunks: list[np.ndarray], cfg: ExperimentConfig, device,
                       pad_id: int) -> torch.Tensor:
    """The adaptive T of a whole micro-batch scored in several forwards: a no-grad pass over its chunks."""
    with torch.no_grad():
        scored = [score_pairs(model, pairs, index, pad_id, cfg.score, device)[:2] for index in chunks]
    diff = torch.cat([t_scores - s_scores for t_scores, s_scores in scored])  # (micro,)
    return bt_temperature(diff, cfg.loss)


def train_step(model, pairs: PairSet, batch_index: np.ndarray, cfg: ExperimentConfig, device, pad_id: int):
    """Forward/backward every micro-batch of one optimizer step; returns detached scores and stats.

    The loss groups micro_batch_size pairs (the adaptive T is one per group, as in verl); a group may run as
    several forwards of forward_micro_batch_size pairs, with the same loss and gradients. Nothing here waits
    for the device: token counts come from the host, losses stay tensors.
    """
    micro = cfg.train.micro_batch_size
    forward = cfg.train.forward_micro_batch_size or micro
    teacher, student, losses, temps, tokens = [], [], [], [], 0
    for start in range(0, len(batch_index), micro):
        chunks = forward_chunks(batch_index[start:start + micro], forward)
        group_temperature = None
        if len(chunks) > 1 and cfg.loss.adaptive_temperature:
            group_temperature = _group_temperature(model, pairs, chunks, cfg, device, pad_id)
        for index in chunks:
            t_scores, s_scores, n_tokens = score_pairs(model, pairs, index, pad_id, cfg.score, device)
            loss, temperature = bradley_terry_loss(t_scores, s_scores, cfg.loss, group_temperature)
            (loss * len(index) / len(batch_index)).backward()  # accumulation: mean over the step's pairs
            teacher.append(t_scores.detach())
            student.append(s_scores.detach())
            losses.append(loss.detach() * len(index))
            temps.append(temperature.detach() * len(index))
            tokens += n_tokens
    n = len(batch_index)
    return (torch.cat(teacher), torch.cat(student), torch.stack(losses).sum() / n,
            torch.stack(temps).sum() / n, tokens)


def optimizer_step(model, params, optimizer, scheduler, pairs: PairSet, batch_index: np.ndarray,
                   cfg: ExperimentConfig, device, pad_id: int, step: int,
                   step_fn: Callable = train_step) -> tuple[dict[str, float], int]:
    """Optimizer step number `step` on the pairs `batch_index`: forward/backward, clip, update.

    Returns the step's `critic/*` metrics (scores from before the update) and its forward tokens;
    raises NonFiniteError, before updating, on a NaN/inf loss or gradient norm. `step_fn` is train_step,
    or a sharded one with its contract (critic/distributed.py: several ranks, the same step).
    """
    lr = scheduler.get_last_lr()[0]
    teacher, student, loss, temperature, tokens = step_fn(model, pairs, batch_index, cfg, device, pad_id)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)  # norm before clipping
    loss_value, grad_value = float(loss), float(grad_norm)  # one sync per step
    if not math.isfinite(loss_value):
        raise NonFiniteError(step, "loss", loss_value)
    if not math.isfinite(grad_value):
        raise NonFiniteError(step, "grad_norm", grad_value)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    teacher_lengths = np.array([len(pairs.teacher_ids[i]) for i in batch_index])
    student_lengths = np.array([len(pairs.student_ids[i]) for i in batch_index])
    metrics = step_metrics(teacher.float().cpu().numpy(), student.float().cpu().numpy(),
                           teacher_lengths, student_lengths)
    metrics.update({"critic/loss": loss_value, "critic/grad_norm": grad_value, "critic/lr": lr,
                    "critic/temperature": float(temperature)})
    return metrics, tokens


def train_critic(model: torch.nn.Module, pairs: PairSet, cfg: ExperimentConfig, device: torch.device,
                 pad_id: int, reporter: Reporter, evaluator: Evaluator, progress: bool = False,
                 step_fn: Callable = train_step) -> TrainOutcome:
    """Train `model` in place, streaming `critic/*` metrics every step and held-out metrics every eval."""
    n_steps = total_steps(len(pairs), cfg)
    optimizer, scheduler = build_optimizer(model, cfg, n_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = step_batches(pairs, cfg, np.random.default_rng(cfg.train.seed))
    trailing = TrailingMeans(cfg.eval.every_steps)  # one batch's d_acc is noise; the mean since the last eval is not
    outcome, first_epoch_correct, first_epoch_pairs = TrainOutcome(), 0.0, 0

    def run_eval(step: int, final: bool = False) -> None:
        started = time.perf_counter()
        metrics = evaluator(model)
        outcome.eval_seconds += time.perf_counter() - started
        outcome.last_eval = metrics
        outcome.eval_history.append((step, metrics))
        reporter.log_eval(step, metrics, evaluator.last_scores, final)

    step, started = 0, time.perf_counter()
    if cfg.eval.before_train:
        run_eval(0)
    # disable=None: tqdm draws only on a terminal, so redirected output holds no '\r' bar frames
    bar = tqdm(total=n_steps, desc="steps", leave=False, disable=None if progress else True, dynamic_ncols=True)
    try:
        for batch_index, fresh in batches:
            step_start = time.perf_counter()
            metrics, tokens = optimizer_step(model, params, optimizer, scheduler, pairs, batch_index, cfg,
                                             device, pad_id, step + 1, step_fn)
            step += 1
            if fresh:  # scored before any update on these pairs: unbiased on the training distribution
                first_epoch_correct += metrics["critic/d_acc"] * len(batch_index)
                first_epoch_pairs += len(batch_index)
            elapsed = time.perf_counter() - step_start
            metrics.update({"perf/pairs_per_s": len(batch_index) / elapsed, "perf/tokens_per_s": tokens / elapsed})
            metrics.update(trailing(metrics))
            outcome.train_history.append((step, dict(metrics)))
            reporter.log_train(step, metrics)
            bar.update(1)
            bar.set_postfix(d_acc=f"{metrics['critic/avg_d_acc']:.2f}", loss=f"{metrics['critic/avg_loss']:.3f}")
            if step % cfg.eval.every_steps == 0 and step < n_steps:
                run_eval(step)
    except RuntimeError as exc:  # torch.OutOfMemoryError (GPU) or a failed CPU allocation
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        forward = cfg.train.forward_micro_batch_size or cfg.train.micro_batch_size
        raise TrialOutOfMemory(f"out of memory at step {step + 1} with forwards of {forward} pairs "
                               f"(train.micro_batch_size={cfg.train.micro_batch_size}): {exc}") from exc
    finally:
        bar.close()
    outcome.steps = step
    outcome.progressive_d_acc = first_epoch_correct / max(first_epoch_pairs, 1)
    run_eval(step, final=True)
    outcome.train_seconds = time.perf_counter() - started - outcome.eval_seconds
    return outcome
