"""The spec's sections: one frozen dataclass per YAML section, and the errors every loader raises.

Pure data, no validation (critic/config.py loads and checks them), so that modules which derive
one section from another (critic/verl_units.py) can use the types without importing the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# The allowed values of the fields below: the validator (critic/config.py) reads them from here.
Reduction = Literal["mean", "last", "sum"]
ScoreLayout = Literal["packed", "padded"]
PackedAttention = Literal["sdpa_per_pair", "flex"]
EosRule = Literal["final", "token"]
Scheduler = Literal["constant", "linear", "cosine"]
Sampler = Literal["tpe", "random", "gp", "cmaes", "nsga2"]
Pruner = Literal["paired", "median", "hyperband", "none"]  # sweeper/pruning.py
ExportFormat = Literal["yaml", "json", "verl"]  # `sweep.py export --format`
CONFIRM_SET = "confirm"  # the held-out part (data.confirm_fraction) that only the confirmation stage scores
# Metric-name prefixes logged beside the eval sets' `<set>/<metric>`: critic/train.py (train/, critic/, perf/),
# critic/data.py (data/), critic/model.py (model/), the sweep's objective (timing/, sweep/). An eval set named like
# one would mix its curves with them, so data.eval_sets and diagnose --data refuse these names and the held-out ones.
LOGGED_PREFIXES = ("train", "critic", "perf", "data", "model", "timing", "sweep")
RESERVED_SETS = ("val", CONFIRM_SET, "fold", *LOGGED_PREFIXES)  # fold: data.fold's held-out fold


class SpecError(ValueError):
    """A user-fixable problem with an experiment spec or its overrides."""


class DataError(SpecError):
    """A data file that cannot be used as given; the message says what to change."""


@dataclass(frozen=True)
class DataConfig:
    train_path: str = "demo:train"  # parquet file, or demo:<name> for the embedded demo data
    prompt_key: str = "content"
    teacher_key: str = "teacher_response"
    student_key: str = "student_response"
    val_fraction: float = 0.1
    # Prompts held out for the confirmation stage only (the search never trains on, scores or selects with them);
    # 0 = none: the confirmation then re-scores the val pairs that selected its finalists.
    confirm_fraction: float = 0.1
    split_seed: int = 0
    eval_sets: dict[str, str] = field(default_factory=dict)  # name -> parquet path
    max_prompt_length: int = 256  # keeps the end of the prompt
    max_response_length: int = 256  # keeps the start of the response
    cache_dir: str = "mlruns/cache"
    fold: int | None = None  # cross-validation: hold this fold of the training split out (as eval set "fold")
    n_folds: int = 5  # folds are assigned by a seeded hash of the prompt, like the val split


# Qwen2/Llama names of every linear layer in a decoder block; the value head (score) is trained whole, not LoRA'd.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class LoraConfig:
    """model.lora: train low-rank adapters on the body plus the whole value head, instead of every weight."""
    rank: int = 0  # 0 = off (full fine-tuning); verl: critic.model.lora_rank
    alpha: int = 16  # the update is scaled by alpha / rank; verl: critic.model.lora_alpha
    dropout: float = 0.0  # on the adapter's input
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module names (name suffixes)


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # local Hugging Face checkpoint directory
    preset: str | None = "tiny"  # built locally when path is not set
    init_seed: int = 0  # seeds the value head (and the whole tiny preset)
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int = 0  # 0 = leave torch's default
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class ScoreConfig:
    reduction: Reduction = "mean"  # over response-token values
    exclude_eos: bool = True
    # packed: one row per pair, prompt | teacher | student, the prompt computed once (fastest);
    # padded: a teacher row and a student row per pair (two copies of the prompt). Same scores to ~1e-6.
    layout: ScoreLayout = "packed"
    # final: exclude_eos drops a final EOS's value only; token: every EOS id's, the users' verl mask
    # `response_mask & (responses != eos_id)` (an EOS-only response then scores 0). See docs/spec.md.
    eos_rule: EosRule = "final"
    # packed layout's attention: sdpa_per_pair (two SDPA calls per pair per layer; any device) or flex (one
    # flex_attention kernel per layer over a block mask of the pairs; CUDA only, compiled on first use). Same scores.
    attention: PackedAttention = "sdpa_per_pair"


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 1.0
    adaptive_temperature: bool = False
    t_a: float = 0.5  # T = clamp(t_a + t_b * |mean(s_t - s_s)|, t_min, t_max)
    t_b: float = 0.5
    t_min: float = 0.3
    t_max: float = 2.0
    center_coef: float = 0.0
    margin: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    scheduler: Scheduler = "constant"
    warmup_steps: int = 0
    epochs: int = 1
    batch_size: int = 32  # pairs per optimizer step
    micro_batch_size: int = 8  # pairs per forward and per adaptive T (verl: ppo_micro_batch_size_per_gpu)
    # Pairs per forward when smaller than micro_batch_size (null = the same): saves memory and keeps the loss,
    # the adaptive T still comes from micro_batch_size pairs. The out-of-memory retry halves it.
    forward_micro_batch_size: int | None = None
    max_steps: int | None = None
    seed: int = 0
    save_checkpoint: bool = False
    # Opt-in speed option: batch pairs of similar length (less padding with score.layout: padded; packed pads
    # nothing). Off by default: batches are formed as verl forms them (shuffled pairs); in the demo data length
    # tracks how the student failed, so grouped batches are sorted by difficulty (docs/spec.md: measured effect).
    length_grouping: bool = False


@dataclass(frozen=True)
class VerlConfig:
    """The users' verl run in verl's units; when set, it gives train's batch sizes, steps and lr schedule
    (critic/verl_units.py). Left at its defaults, train.* alone describes the trial."""
    train_batch_size: int | None = None  # data.train_batch_size: prompts per PPO iteration
    rollout_n: int = 1  # actor_rollout_ref.rollout.n: responses (pairs) per prompt
    ppo_mini_batch_size: int | None = None  # critic.ppo_mini_batch_size: prompts per optimizer step
    ppo_epochs: int = 1  # critic.ppo_epochs: passes over each iteration's batch
    ppo_micro_batch_size_per_gpu: int | None = None  # critic.ppo_micro_batch_size_per_gpu: pairs per forward
    n_gpus: int = 1  # trainer.nnodes x trainer.n_gpus_per_node: only checks that verl's per-GPU split is whole
    critic_warmup: int | None = None  # trainer.critic_warmup: iterations before the actor's first update
    lr_warmup_steps: int = 0  # critic.optim.lr_warmup_steps: verl scheduler steps (parameter_sync_step per iteration)
    total_training_steps: int | None = None  # the whole RL run's iterations: the horizon of verl's cosine
    # trainer.v1.separate_async.parameter_sync_step: local updates per iteration in verl's V1 separate_async trainer,
    # each one update_critic call and one scheduler step; 1 for every other trainer (one update_critic per iteration)
    parameter_sync_step: int = 1

    def in_use(self) -> bool:
        return self != VerlConfig()


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 20
    before_train: bool = False
    batch_size: int = 64  # pairs per inference forward
    # Also score the confirmation split (`confirm/<metric>`). The confirmation stage sets it on its own runs; a sweep
    # spec may not, so search trials never see those pairs.
    confirm_split: bool = False


@dataclass(frozen=True)
class ConfirmConfig:
    """After the search: re-run the top_k finalists, the candidates and the baseline with `seeds` new seeds each;
    a config that looks better than the baseline after them gets more seeds, up to `max_seeds`, before its verdict."""
    top_k: int = 1  # 0 = no search finalists (sweep.candidates are still confirmed)
    seeds: int = 3  # seed indices 1..seeds (the search ran seed index 0): train.seed and model.init_seed + index
    max_seeds: int = 8  # seed indices seeds+1..max_seeds for promising configs and the baseline; <= seeds: none
    n_resamples: int = 1000  # bootstrap resamples of the held-out pairs


def short_params(params: dict[str, Any]) -> str:
    """{'train.lr': 0.000312345, 'loss.adaptive_temperature': False} -> 'lr=0.000312 adaptive_temperature=off'."""
    def short(value: Any) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    return " ".join(f"{key.rsplit('.', 1)[-1]}={short(value)}" for key, value in params.items())


@dataclass(frozen=True)
class CandidateConfig:
    """A sweep.candidates entry: a change you plan to make to your current setting (sweep.baseline). It runs right
    after the baseline in a new study, is never pruned and is always confirmed against the baseline."""
    params: dict[str, Any] = field(default_factory=dict)  # section.key -> value, applied on top of sweep.baseline
    name: str | None = None  # default: the params, e.g. "epochs=3"

    @property
    def label(self) -> str:
        return self.name if self.name is not None else short_params(self.params)


@dataclass(frozen=True)
class SweepConfig:
    study_name: str = "critic-warmup"
    n_trials: int = 12
    objective: str | list[str] = "val/d_acc"
    direction: str | list[str] = "maximize"
    sampler: Sampler = "tpe"  # nsga2 for multi-objective studies only
    pruner: Pruner = "paired"
    seed: int = 0
    search_space: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    candidates: list[CandidateConfig] = field(default_factory=list)  # your planned changes to the baseline
    save_best_checkpoint: bool = False
    max_failures: int = 0  # the sweep stops after this many failed trials; 0 = n_trials
    heartbeat_interval: int = 60
    # A dead remote worker's trial is re-queued after this long without a heartbeat (Optuna's heartbeat thread
    # beats every heartbeat_interval while the trial computes): five missed beats, minutes rather than ten.
    grace_period: int = 300
    # seconds a worker waits out an unreachable storage server (restart, lost connection) before it stops, and
    # about as long (MLflow's own retries, sweeper/tracking_outage.py) a tracking server; null: see outage_window_s
    storage_outage_s: int | None = None
    # GPUs (ranks) per trial: > 1 runs each trial as a torchrun job with FSDP2 (critic/distributed.py)
    gpus_per_trial: int = 1
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)

    # objective and direction are a string for one objective, a list for several (as Optuna takes them)
    @property
    def objectives(self) -> list[str]:
        return self.objective if isinstance(self.objective, list) else [self.objective]

    @property
    def directions(self) -> list[str]:
        return self.direction if isinstance(self.direction, list) else [self.direction]

    @property
    def outage_window_s(self) -> int:
        """storage_outage_s; by default 300 s, cut to what the grace period leaves after two heartbeats (a worker
        waiting out an outage sends none, and the other workers must not take its trial for dead)."""
        if self.storage_outage_s is not None:
            return self.storage_outage_s
        return max(0, min(300, self.grace_period - 2 * self.heartbeat_interval))


@dataclass(frozen=True)
class ExportConfig:
    verl_keys: dict[str, str] = field(default_factory=dict)  # our key -> verl Hydra key


@dataclass(frozen=True)
class StudentConfig:
    model: str | None = None  # local causal LM directory
    endpoint: str | None = None  # OpenAI-compatible server
    model_name: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    regenerate: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 3


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    verl: VerlConfig = field(default_factory=VerlConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
