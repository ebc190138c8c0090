"""A trial as Hydra overrides for the users' verl run: verl's key names for a verl version, verl's units.

Only keys that exist in that version's `ppo_trainer` config are written bare (checked by composing verl's
own config in tests/test_verl_export.py); keys verl's yaml lacks (this tool's temperature and bounds, mapped in
`export.verl_keys` to the users' fork's keys; a key an old worker reads with .get) are written `++key=value`,
which Hydra accepts whether the fork's yaml defines the key or not (`+key` fails where it does). With a `verl:`
section the batch settings the lr was tuned at are always written (train_batch_size, rollout.n, the critic's
mini-batch and epochs): composed with verl's defaults (mini-batch 256) the same lr would mean something else.
A swept value that verl cannot express is not written: a note says why, in the file and on stderr. Units: see
critic/verl_units.py.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

import optuna

from critic.config import ExperimentConfig, SpecError, flatten
from critic.verl_units import verl_steps
from sweeper.board import trial_params
from sweeper.study import SweepSpec, config_for

DEFAULT_VERSION = "0.9"  # the current verl release (0.9.1 on PyPI)


@dataclass(frozen=True)
class VerlVersion:
    """The keys that differ between verl releases (from each release's trainer/config)."""
    scheduler_key: str
    warmup_key: str  # "++..." where the yaml lacks the key but the worker reads it
    clip_keys: dict[str, str]  # worker -> its gradient-clip key; the first worker is verl's default
    cosine_pins: tuple[tuple[str, str], ...] = ()  # keys that make verl's cosine the one swept here
    betas_key: str = "critic.optim.betas"
    lora_adapter_key: str | None = None  # where verl loads a trained adapter from (None: not known to this tool)


_LEGACY_ONLY = VerlVersion("critic.optim.warmup_style", "++critic.optim.lr_warmup_steps",
                           {"legacy": "critic.grad_clip"}, betas_key="++critic.optim.betas")
_BOTH = VerlVersion("critic.optim.lr_scheduler_type", "critic.optim.lr_warmup_steps",
                    {"legacy": "critic.grad_clip", "engine": "critic.optim.clip_grad"},
                    (("critic.optim.min_lr_ratio", "0.0"), ("critic.optim.num_cycles", "0.5")))
_ENGINE_ONLY = VerlVersion("critic.optim.lr_scheduler_type", "critic.optim.lr_warmup_steps",
                           {"engine": "critic.optim.clip_grad"},
                           _BOTH.cosine_pins + (("critic.optim.zero_indexed_step", "true"),),
                           lora_adapter_key="critic.model.lora_adapter_path")
# 0.4/0.5: only the legacy FSDP worker (critic.grad_clip), scheduler key warmup_style, no lr_warmup_steps in the
# yaml (the worker reads it with .get); 0.6/0.7: both workers, trainer.use_legacy_worker_impl: auto = legacy;
# 0.8/0.9: the engine worker only (critic.optim.clip_grad; critic.grad_clip is still in the yaml, read by nobody).
# zero_indexed_step (pinned from 0.8) first appears in 0.7.1, so 0.7 leaves it at its default (true).
# LoRA: critic.model.lora_rank / lora_alpha / target_modules are in every version's yaml (0.5.0 fixture, 0.9.1);
# critic.model.lora_adapter_path is in 0.8.0's and 0.9.1's model yaml, not in 0.5.0's; 0.6/0.7 are unchecked.
VERSIONS = {"0.4": _LEGACY_ONLY, "0.5": _LEGACY_ONLY, "0.6": _BOTH, "0.7": _BOTH, "0.8": _ENGINE_ONLY,
            "0.9": _ENGINE_ONLY}
VERL_DEFAULT_BETAS = (0.9, 0.999)


def resolve_version(version: str | None, worker: str | None) -> tuple[str, VerlVersion, str]:
    """'0.9.1' -> ('0.9', its keys, the worker); raises SpecError naming the supported choices."""
    short = ".".join((version or DEFAULT_VERSION).split(".")[:2])
    if short not in VERSIONS:
        raise SpecError(f"--verl-version {version}: supported are {', '.join(VERSIONS)} (X.Y or X.Y.Z)")
    keys = VERSIONS[short]
    worker = worker or next(iter(keys.clip_keys))
    if worker not in keys.clip_keys:
        raise SpecError(f"--verl-worker {worker}: verl {short} has the {' and '.join(keys.clip_keys)} critic worker "
                        f"only; choose {' or '.join(keys.clip_keys)}")
    return short, keys, worker


@dataclass
class VerlExport:
    version: str
    worker: str
    entries: list[tuple[str, str, str]] = field(default_factory=list)  # (key, key=value shell-quoted, why)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, value: Any, why: str = "") -> None:
        text = f"{key}={hydra_value(value)}"
        self.entries.append((key, shlex.quote(text) if any(c in text for c in "[] ,'\"") else text, why))

    @property
    def overrides(self) -> list[str]:
        return [text for _, text, _ in self.entries]

    def text(self) -> str:
        lines = [f"# Hydra overrides for verl {self.version} ({self.worker} critic worker), in verl's units: append",
                 "# them to your command (python3 -m verl.trainer.main_ppo ...). Conversions: critic/verl_units.py."]
        lines += [f"# {key}: {why}" for key, _, why in self.entries if why]
        lines += [f"# NOTE: {note}" for note in self.notes]
        return "\n".join(lines) + "\n" + " \\\n".join(self.overrides) + "\n"


def hydra_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def parse_overrides(text: str) -> list[str]:
    """The override list a shell would pass for an exported file (comments and line continuations removed)."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return shlex.split(code.replace("\\\n", " "))


def _length(cfg: ExperimentConfig) -> str:
    t = cfg.train
    return f"{t.max_steps} optimizer steps" if t.max_steps else f"{t.epochs} epoch(s)"


def _warmup(out: VerlExport, keys: VerlVersion, cfg: ExperimentConfig, sync_step: int | None) -> None:
    """trainer.critic_warmup and the lr warmup, or notes saying why they have no verl value.

    `sync_step`: the target run's parameter_sync_step when known (`export --against`); a spec tuned at another one
    has its lr warmup converted (the same iterations), or refused where that is not a whole number of steps.
    """
    if cfg.verl.in_use():
        steps = verl_steps(cfg.verl)
        out.add("trainer.critic_warmup", cfg.verl.critic_warmup,
                f"the policy first updates after {steps.warmup_iterations} critic-only iterations, here "
                f"{steps.max_steps} optimizer steps of {steps.batch_size} pairs")
        tuned, target = cfg.verl.parameter_sync_step, sync_step or cfg.verl.parameter_sync_step
        warmup = cfg.verl.lr_warmup_steps * target / tuned
        if warmup != int(warmup):
            raise SpecError(f"lr warmup: {cfg.verl.lr_warmup_steps} scheduler steps at parameter_sync_step={tuned} "
                            f"is {warmup:g} at your run's {target} (V1 separate_async steps the critic's scheduler "
                            f"once per local update): not a whole number; tune with verl.parameter_sync_step={target}")
        why = "scheduler steps = iterations" if target == 1 else \
            f"scheduler steps = V1 separate_async local updates, {target} per iteration"
        if target != tuned:
            why += f" (converted from {cfg.verl.lr_warmup_steps} at parameter_sync_step={tuned}: the same iterations)"
        out.add(keys.warmup_key, int(warmup), why)
        out.add("critic.optim.lr_warmup_steps_ratio", 0.0, "a 0 above must not fall back to a ratio")
        if sync_step is None and cfg.verl.lr_warmup_steps and tuned == 1:
            out.notes.append("lr warmup written for a trainer that steps the critic's scheduler once per iteration; "
                             "verl's V1 trainer in trainer.v1.trainer_mode=separate_async steps it once per local "
                             "update (parameter_sync_step, 4 by default): pass --against YOUR_SCRIPT to convert")
        return
    t = cfg.train
    out.notes.append(f"trainer.critic_warmup not written: this trial is {_length(cfg)} of {t.batch_size} pairs per "
                     f"step, and verl counts the warmup in iterations; describe the trial with a verl: section "
                     f"to convert it")
    if t.warmup_steps == 0:
        out.add(keys.warmup_key, 0)
        out.add("critic.optim.lr_warmup_steps_ratio", 0.0, "a 0 above must not fall back to a ratio")
    else:
        out.notes.append(f"lr warmup not written: train.warmup_steps={t.warmup_steps} optimizer steps, but verl "
                         f"steps its scheduler once per iteration; use verl.lr_warmup_steps (iterations)")


def _schedule(out: VerlExport, keys: VerlVersion, cfg: ExperimentConfig) -> None:
    scheduler = cfg.train.scheduler
    if scheduler == "constant" or (scheduler == "cosine" and cfg.verl.in_use()):
        out.add(keys.scheduler_key, scheduler)
    if scheduler == "cosine" and cfg.verl.in_use():
        for key, value in keys.cosine_pins:
            out.add(key, value)
        out.notes.append(f"the cosine was swept over verl.total_training_steps={cfg.verl.total_training_steps} "
                         f"iterations; verl takes its horizon from trainer.total_training_steps or the data size x "
                         f"trainer.total_epochs: check that your run has that many")
    elif scheduler == "linear":
        out.notes.append("train.scheduler=linear not written: verl's critic has constant and cosine only")
    elif scheduler != "constant":
        out.notes.append(f"train.scheduler={scheduler} not written: this trial decayed over its own {_length(cfg)}, "
                         f"verl decays over the whole RL run; describe the trial with a verl: section "
                         f"(verl.total_training_steps) to sweep verl's cosine")


def _batches(out: VerlExport, cfg: ExperimentConfig, swept: set[str]) -> None:
    """The micro-batch when it is part of the loss; the batch settings the lr was tuned at (a verl: section)."""
    micro_keys = {"train.micro_batch_size", "verl.ppo_micro_batch_size_per_gpu"}
    loss_micro = cfg.loss.adaptive_temperature or micro_keys & swept
    if loss_micro:
        out.add("critic.ppo_micro_batch_size_per_gpu", cfg.train.micro_batch_size,
                "the adaptive T is computed per micro-batch: part of the loss")
        out.add("critic.use_dynamic_bsz", False, "token-based micro-batches would regroup the T")
    verl_keys = {"verl.ppo_epochs": "critic.ppo_epochs", "verl.ppo_mini_batch_size": "critic.ppo_mini_batch_size",
                 "verl.train_batch_size": "data.train_batch_size", "verl.rollout_n": "actor_rollout_ref.rollout.n"}
    for ours, theirs in verl_keys.items():
        if ours in swept or cfg.verl.in_use():
            out.add(theirs, getattr(cfg.verl, ours.split(".")[1]), "swept" if ours in swept else
                    "the lr was tuned at this batch")
    if {"verl.train_batch_size", "verl.rollout_n"} & swept:
        out.notes.append("data.train_batch_size / actor_rollout_ref.rollout.n were swept: they set the whole RL run's "
                         "batch, not only the critic's")
    if not cfg.verl.in_use():
        out.notes.append(f"the lr was tuned at {cfg.train.batch_size} pairs per optimizer step; verl's critic takes "
                         f"critic.ppo_mini_batch_size x rollout.n pairs per step")


def _lora(out: VerlExport, keys: VerlVersion, cfg: ExperimentConfig, weights: str | None) -> None:
    """A LoRA trial: verl's LoRA keys, and the trained adapter (with its value head) when `weights` holds it.

    verl's FSDP critic builds a fresh LoRA without modules_to_save, so its value head stays frozen at its
    random init (verl#4620); an adapter loaded from lora_adapter_path brings its own config, whose
    modules_to_save trains (and starts from) the head trained here.
    """
    lora = cfg.model.lora
    if lora.rank == 0:
        return
    out.add("critic.model.lora_rank", lora.rank)
    out.add("critic.model.lora_alpha", lora.alpha)
    out.add("critic.model.target_modules", list(lora.target_modules))
    if lora.dropout:
        out.notes.append(f"model.lora.dropout={lora.dropout} not written: verl's FSDP critic has no LoRA dropout key "
                         f"(the adapter at lora_adapter_path keeps its own)")
    merged = "critic.model.path=<weights dir> (the merged critic; a new adapter on it starts with this head, frozen)"
    if weights is None:
        out.notes.append("critic.model.lora_adapter_path not written: without the trained adapter verl's LoRA critic "
                         "starts with an untrained, frozen value head (verl#4620); rerun export with --weights DIR "
                         "(the trial needs train.save_checkpoint: true) to write the adapter and the merged critic")
    elif keys.lora_adapter_key is None:
        out.notes.append(f"verl {out.version} has no critic.model.lora_adapter_path known to this tool: set {merged}")
    else:
        out.add(keys.lora_adapter_key, f"{weights}/adapter",
                "the trained LoRA adapter and value head (peft, modules_to_save: score); critic.model.path stays "
                "your base checkpoint")
        out.notes.append(f"instead of the adapter, you may set {merged}")


def verl_export(spec: SweepSpec, trial: optuna.trial.FrozenTrial, version: str | None = None,
                worker: str | None = None, weights: str | None = None, sync_step: int | None = None) -> VerlExport:
    """The trial's overrides and notes for verl `version` (default: the current release).

    `weights`: a directory holding the trial's saved critic (`sweep.py export --weights`), for a LoRA trial's adapter.
    `sync_step`: the target run's V1 separate_async parameter_sync_step (1: any other trainer), from --against.
    """
    short, keys, worker = resolve_version(version, worker)
    cfg = config_for(spec, trial_params(trial), f"trial {trial.number}")
    swept = set(trial_params(trial))
    out = VerlExport(short, worker)
    t = cfg.train
    out.add("critic.optim.lr", t.lr)
    out.add("critic.optim.weight_decay", t.weight_decay)
    if tuple(t.betas) != VERL_DEFAULT_BETAS or not keys.betas_key.startswith("+"):
        out.add(keys.betas_key, list(t.betas))
    _warmup(out, keys, cfg, sync_step)
    _schedule(out, keys, cfg)
    out.add(keys.clip_keys[worker], t.grad_clip)
    _batches(out, cfg, swept)
    _lora(out, keys, cfg, weights)
    flat = flatten(cfg)
    for ours, theirs in cfg.export.verl_keys.items():
        if ours not in flat:
            raise SpecError(f"export.verl_keys: {ours!r} is not a config key (e.g. loss.temperature)")
        out.add("++" + theirs.lstrip("+"), flat[ours])
    return out
