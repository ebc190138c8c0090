"""verl's units -> this tool's optimizer steps: the one mapping (`verl_steps`), verl's lr schedule and batch order
(every trial's default batch order: a plain train.* spec is a verl run too, `plain_verl`).

verl runs the critic warmup as PPO iterations (checked against verl 0.5-0.9: trainer/ppo/ray_trainer.py,
workers/fsdp_workers.py and critic/dp_critic.py up to 0.7, workers/engine_workers.py from 0.6,
utils/torch_functional.py). One iteration draws `train_batch_size` prompts, `rollout_n` responses each, and
`update_critic` runs `ppo_epochs` passes over that batch in mini-batches of `ppo_mini_batch_size x rollout_n`
sequences (verl multiplies the mini-batch by rollout_n), each split into micro-batches of
`ppo_micro_batch_size_per_gpu` per GPU. Here one sequence is one teacher/student pair.

| verl (`verl:` section)                      | this tool                                                     |
|---------------------------------------------|---------------------------------------------------------------|
| ppo_mini_batch_size x rollout_n             | train.batch_size: pairs per optimizer step                    |
| ppo_micro_batch_size_per_gpu                | train.micro_batch_size: pairs per forward and per adaptive T  |
| ppo_epochs x train_batch_size / mini        | optimizer steps per iteration (S)                             |
| critic_warmup                               | train.max_steps = (critic_warmup - 1) x S                     |
| lr_warmup_steps (scheduler steps)           | train.warmup_steps = lr_warmup_steps x S / P; lr held S / P steps |
| total_training_steps                        | the cosine's horizon: total_training_steps x P scheduler steps |
| parameter_sync_step (P, V1 separate_async)  | update_critic calls (= scheduler steps) per iteration         |

Why critic_warmup - 1: verl's global_steps starts at 1 (ray_trainer.py `self.global_steps += 1` before the
loop) and the actor updates once `critic_warmup <= global_steps`, after that iteration's rewards and values
were computed, so the policy's first update sees a critic trained for critic_warmup - 1 iterations.
Why the lr is held: verl steps the critic's scheduler once per `update_critic` call, not per optimizer step,
and its cosine decays over the whole RL run (`total_training_steps`). The classic trainer and V1's sync and
colocate_async modes call update_critic once per iteration (P = 1); V1's separate_async mode
(trainer/ppo/v1/trainer_base.py `step`) runs P = `trainer.v1.separate_async.parameter_sync_step` local updates
per iteration, each on train_batch_size / P prompts, and scales the scheduler's horizon by P (`on_train_begin`),
so there `lr_warmup_steps` counts local updates: lr_warmup_steps=4 is one iteration at P=4, four at P=1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from critic.sections import ExperimentConfig, SpecError, TrainConfig, VerlConfig

REQUIRED = ("train_batch_size", "ppo_mini_batch_size", "ppo_micro_batch_size_per_gpu", "critic_warmup")
DERIVED = ("batch_size", "micro_batch_size", "max_steps", "warmup_steps", "epochs")  # train.* the section sets


@dataclass(frozen=True)
class VerlSteps:
    """A verl warmup in this tool's units (see the module's table)."""
    pairs_per_iteration: int
    batch_size: int  # pairs per optimizer step
    micro_batch_size: int
    mini_batches_per_iteration: int
    steps_per_iteration: int
    warmup_iterations: int  # critic-only iterations before the actor's first update
    max_steps: int
    warmup_steps: int  # optimizer steps until the lr reaches its peak
    steps_per_scheduler_step: int  # optimizer steps of one update_critic call: S / parameter_sync_step


def verl_steps(verl: VerlConfig) -> VerlSteps:
    """The one mapping from verl's units to optimizer steps; `verl` must have passed `check_verl`."""
    mini_batches = verl.train_batch_size // verl.ppo_mini_batch_size
    per_iteration = verl.ppo_epochs * mini_batches
    warmup_iterations = verl.critic_warmup - 1
    per_scheduler_step = per_iteration // verl.parameter_sync_step
    return VerlSteps(pairs_per_iteration=verl.train_batch_size * verl.rollout_n,
                     batch_size=verl.ppo_mini_batch_size * verl.rollout_n,
                     micro_batch_size=verl.ppo_micro_batch_size_per_gpu,
                     mini_batches_per_iteration=mini_batches, steps_per_iteration=per_iteration,
                     warmup_iterations=warmup_iterations, max_steps=warmup_iterations * per_iteration,
                     warmup_steps=verl.lr_warmup_steps * per_scheduler_step,
                     steps_per_scheduler_step=per_scheduler_step)


def check_verl(verl: VerlConfig, scheduler: str, where: str) -> None:
    """The verl section's own rules and the ones verl itself asserts; raises SpecError saying the fix."""
    unset = [name for name in REQUIRED if getattr(verl, name) is None]
    if unset:
        raise SpecError(f"{where}verl: set {', '.join('verl.' + n for n in unset)} too (a verl section describes "
                        f"the whole warmup: {', '.join(REQUIRED)}), or remove the verl section and describe the "
                        f"trial with train.*")
    for name in ("train_batch_size", "rollout_n", "ppo_mini_batch_size", "ppo_epochs", "ppo_micro_batch_size_per_gpu",
                 "n_gpus", "parameter_sync_step"):
        if getattr(verl, name) < 1:
            raise SpecError(f"{where}verl.{name} must be >= 1, got {getattr(verl, name)}")
    if verl.lr_warmup_steps < 0:
        raise SpecError(f"{where}verl.lr_warmup_steps must be >= 0 (verl reads a negative value as 'use "
                        f"lr_warmup_steps_ratio'), got {verl.lr_warmup_steps}")
    if verl.critic_warmup < 2:
        raise SpecError(f"{where}verl.critic_warmup must be >= 2, got {verl.critic_warmup}: verl's actor first "
                        f"updates at iteration critic_warmup, so critic_warmup=N trains the critic alone for N-1 "
                        f"iterations")
    if verl.train_batch_size % verl.ppo_mini_batch_size:
        raise SpecError(f"{where}verl.train_batch_size ({verl.train_batch_size}) must be a multiple of "
                        f"verl.ppo_mini_batch_size ({verl.ppo_mini_batch_size}): verl splits each iteration's "
                        f"batch into whole mini-batches")
    local = verl.train_batch_size // verl.parameter_sync_step
    if verl.train_batch_size % verl.parameter_sync_step or local % verl.ppo_mini_batch_size:
        raise SpecError(f"{where}verl.train_batch_size ({verl.train_batch_size}) must be verl.parameter_sync_step "
                        f"({verl.parameter_sync_step}) local updates of whole mini-batches of "
                        f"verl.ppo_mini_batch_size ({verl.ppo_mini_batch_size}) prompts (verl's V1 separate_async "
                        f"trainer splits each iteration so); change one of them")
    mini_pairs = verl.ppo_mini_batch_size * verl.rollout_n
    if mini_pairs % verl.n_gpus or (mini_pairs // verl.n_gpus) % verl.ppo_micro_batch_size_per_gpu:
        raise SpecError(f"{where}verl splits each mini-batch of ppo_mini_batch_size x rollout_n = {mini_pairs} "
                        f"pairs over n_gpus={verl.n_gpus} GPUs, and each GPU's share into micro-batches of "
                        f"ppo_micro_batch_size_per_gpu={verl.ppo_micro_batch_size_per_gpu}: both must divide "
                        f"evenly (verl asserts it); change one of them")
    if scheduler not in ("constant", "cosine"):
        raise SpecError(f"{where}train.scheduler: {scheduler} does not exist in verl's critic (constant or cosine); "
                        f"choose one of those while the verl section is set")
    if scheduler == "cosine" and verl.total_training_steps is None:
        raise SpecError(f"{where}train.scheduler: cosine with a verl section needs verl.total_training_steps, the "
                        f"whole RL run's iterations: verl's cosine decays over the run, not over the warmup")
    if verl.total_training_steps is not None and verl.total_training_steps < verl.critic_warmup:
        raise SpecError(f"{where}verl.total_training_steps ({verl.total_training_steps}) must be >= "
                        f"verl.critic_warmup ({verl.critic_warmup}): the warmup is part of the run")


def apply_verl(cfg: ExperimentConfig, raw_train: dict[str, Any], source: str) -> ExperimentConfig:
    """cfg with train.* derived from its verl section; a train.* value that says otherwise is an error."""
    where = f"{source}: "
    check_verl(cfg.verl, cfg.train.scheduler, where)
    if cfg.train.length_grouping:
        raise SpecError(f"{where}train.length_grouping: true conflicts with the verl section: verl forms its "
                        f"mini-batches from shuffled prompts, never by length; remove train.length_grouping, or "
                        f"the verl section to describe the trial with train.* alone")
    steps = verl_steps(cfg.verl)
    derived = {"batch_size": steps.batch_size, "micro_batch_size": steps.micro_batch_size,
               "max_steps": steps.max_steps, "warmup_steps": steps.warmup_steps, "epochs": 1}
    for key in DERIVED:
        if key in raw_train and raw_train[key] != derived[key]:
            raise SpecError(f"{where}train.{key}={raw_train[key]!r} conflicts with the verl section, which gives "
                            f"train.{key}={derived[key]} (see critic/verl_units.py); remove train.{key}, or the "
                            f"verl section to describe the trial with train.* alone")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **derived))


def lr_multiplier(iteration: int, verl: VerlConfig, scheduler: str) -> float:
    """verl's lr factor for a 0-based scheduler step: linear warmup from 0, then constant or a half cosine to 0.

    As verl.utils.torch_functional's get_constant_schedule_with_warmup and get_cosine_schedule_with_warmup with
    their defaults (min_lr_ratio 0, num_cycles 0.5, zero-indexed steps), stepped once per update_critic call
    (parameter_sync_step per iteration, over a horizon of total_training_steps x parameter_sync_step).
    """
    warmup = verl.lr_warmup_steps
    if iteration < warmup:
        return iteration / max(1, warmup)
    if scheduler == "constant":
        return 1.0
    horizon = verl.total_training_steps * verl.parameter_sync_step
    progress = (iteration - warmup) / max(1, horizon - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def verl_lr_lambda(cfg: ExperimentConfig) -> Callable[[int], float]:
    """A LambdaLR factor over optimizer steps: every step of an update_critic call gets that call's lr."""
    per_call = verl_steps(cfg.verl).steps_per_scheduler_step
    return lambda step: lr_multiplier(step // per_call, cfg.verl, cfg.train.scheduler)


def plain_verl(train: TrainConfig, n_pairs: int, n_steps: int) -> VerlConfig:
    """The verl run a plain train.* spec stands for, so that `verl_batches` forms its batches too.

    One response per prompt (rollout_n 1) and one mini-batch of train.batch_size pairs per iteration, run once
    (ppo_epochs 1), for n_steps iterations: train.epochs passes over the pairs, each a new shuffle, an
    incomplete last batch dropped, exactly as verl's dataloader draws a warmup's prompts.
    """
    if n_pairs < train.batch_size:
        raise SpecError(f"train.batch_size is {train.batch_size} pairs per step, but the training split has "
                        f"{n_pairs}; use more data or a smaller train.batch_size")
    return VerlConfig(train_batch_size=train.batch_size, ppo_mini_batch_size=train.batch_size,
                      ppo_micro_batch_size_per_gpu=train.micro_batch_size, critic_warmup=n_steps + 1)


def verl_batches(n_pairs: int, verl: VerlConfig, rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
    """The warmup's optimizer-step batches in verl's order, each with `fresh` (none of its pairs trained on yet).

    Like verl's dataloader, each pass over the pairs is a new shuffle and an incomplete last iteration is
    dropped; like update_critic (critic.shuffle: false), each iteration's batch (each of its parameter_sync_step
    local updates' in V1 separate_async) is split in order into mini-batches, and that split is run ppo_epochs times.
    """
    steps = verl_steps(verl)
    if n_pairs < steps.pairs_per_iteration:
        raise SpecError(f"verl.train_batch_size x verl.rollout_n = {steps.pairs_per_iteration} pairs per iteration, "
                        f"but the training split has {n_pairs}; use more data or a smaller verl.train_batch_size")
    batches: list[tuple[np.ndarray, bool]] = []
    iteration, data_epoch = 0, 0
    while iteration < steps.warmup_iterations:
        order = rng.permutation(n_pairs)
        for start in range(0, n_pairs - steps.pairs_per_iteration + 1, steps.pairs_per_iteration):
            if iteration == steps.warmup_iterations:
                break
            iteration_pairs = order[start:start + steps.pairs_per_iteration]
            for local in np.split(iteration_pairs, verl.parameter_sync_step):  # one update_critic call each
                minis = np.split(local, steps.mini_batches_per_iteration // verl.parameter_sync_step)
                for ppo_epoch in range(verl.ppo_epochs):
                    batches.extend((mini, data_epoch == 0 and ppo_epoch == 0) for mini in minis)
            iteration += 1
        data_epoch += 1
    return batches
