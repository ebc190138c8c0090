"""Experiment spec: one frozen dataclass per YAML section, validated at load.

Precedence is defaults < YAML file < `--set section.key=value` overrides.
Unknown keys, wrong types and impossible values raise `SpecError` naming the
key, the file and what to change. Rules that span fields live in `_check_*`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class SpecError(ValueError):
    """A user-fixable problem with an experiment spec or its overrides."""


@dataclass(frozen=True)
class DataConfig:
    train_path: str = "demo:train"  # parquet file, or demo:<name> for the embedded demo data
    prompt_key: str = "content"
    teacher_key: str = "teacher_response"
    student_key: str = "student_response"
    val_fraction: float = 0.1
    split_seed: int = 0
    eval_sets: dict[str, str] = field(default_factory=dict)  # name -> parquet path
    max_prompt_length: int = 256  # keeps the end of the prompt
    max_response_length: int = 256  # keeps the start of the response
    cache_dir: str = "mlruns/cache"
    fold: int | None = None  # cross-validation: hold this fold of the training split out (as eval set "fold")
    n_folds: int = 5  # folds are assigned by a seeded hash of the prompt, like the val split


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # local Hugging Face checkpoint directory
    preset: str | None = "tiny"  # built locally when path is not set
    init_seed: int = 0  # seeds the value head (and the whole tiny preset)
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int = 0  # 0 = leave torch's default


@dataclass(frozen=True)
class ScoreConfig:
    reduction: str = "mean"  # mean | last | sum over response-token values
    exclude_eos: bool = True
    # packed: one row per pair, prompt | teacher | student, the prompt computed once (fastest);
    # padded: a teacher row and a student row per pair (two copies of the prompt). Same scores to ~1e-6.
    layout: str = "packed"
    # final: exclude_eos drops a final EOS's value only; token: every EOS id's, the users' verl mask
    # `response_mask & (responses != eos_id)` (an EOS-only response then scores 0). See docs/spec.md.
    eos_rule: str = "final"


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
    scheduler: str = "constant"  # constant | linear | cosine
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
    lr_warmup_steps: int = 0  # critic.optim.lr_warmup_steps: verl scheduler steps, one per iteration
    total_training_steps: int | None = None  # the whole RL run's iterations: the horizon of verl's cosine

    def in_use(self) -> bool:
        return self != VerlConfig()


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 20
    before_train: bool = False
    batch_size: int = 64  # pairs per inference forward


@dataclass(frozen=True)
class ConfirmConfig:
    """After the search: re-run the top_k finalists and the baseline with `seeds` new seeds each."""
    top_k: int = 2  # 0 = no confirmation stage
    seeds: int = 3  # seed indices 1..seeds (the search ran seed index 0): train.seed and model.init_seed + index
    n_resamples: int = 1000  # bootstrap resamples of the held-out pairs


@dataclass(frozen=True)
class SweepConfig:
    study_name: str = "critic-warmup"
    n_trials: int = 12
    objective: str | list[str] = "val/d_acc"
    direction: str | list[str] = "maximize"
    sampler: str = "tpe"
    pruner: str = "hyperband"
    seed: int = 0
    search_space: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    save_best_checkpoint: bool = False
    max_failures: int = 0  # 0 = no bound
    heartbeat_interval: int = 60
    grace_period: int = 600
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)


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


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(ExperimentConfig)}
_SECTION_TYPES = typing.get_type_hints(ExperimentConfig)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint; convert where YAML is loose (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except SpecError as exc:
                errors.append(str(exc))
        raise SpecError(errors[0])
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):  # a nested block such as sweep.confirm
        if not isinstance(value, dict):
            raise SpecError(f"{where} must be a mapping, got {value!r}")
        hints = typing.get_type_hints(hint)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}. Valid keys: {', '.join(sorted(hints))}")
        return hint(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in value.items()})
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise SpecError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SpecError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `lr: 1e-5` as a string (it wants 1.0e-5)
        raise SpecError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise SpecError(f"{where} must be a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise SpecError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where} must be a mapping, got {value!r}")
        return {_coerce(k, args[0], where): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    raise AssertionError(f"unsupported type hint {hint!r} at {where}")


def _build_section(name: str, raw: Any, source: str) -> Any:
    cls = _SECTION_TYPES[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: section '{name}' must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = sorted(hints)
    for key in raw:
        if key not in hints:
            raise SpecError(f"{source}: unknown key '{name}.{key}'. Valid keys in '{name}': {', '.join(valid)}")
    values = {key: _coerce(value, hints[key], f"{source}: {name}.{key}") for key, value in raw.items()}
    return cls(**values)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


def _check_values(cfg: ExperimentConfig, source: str) -> None:
    d, m, s, lo, t, e, sw = cfg.data, cfg.model, cfg.score, cfg.loss, cfg.train, cfg.eval, cfg.sweep
    p = f"{source}: "
    _require(0.0 < d.val_fraction < 1.0, f"{p}data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _require(d.max_prompt_length > 0, f"{p}data.max_prompt_length must be > 0, got {d.max_prompt_length}")
    _require(d.max_response_length > 1, f"{p}data.max_response_length must be > 1, got {d.max_response_length}")
    _require(m.path is not None or m.preset == "tiny",
             f"{p}set model.path to a local checkpoint directory, or model.preset: tiny")
    _require(s.reduction in ("mean", "last", "sum"),
             f"{p}score.reduction must be one of mean, last, sum; got {s.reduction!r}")
    _require(s.layout in ("packed", "padded"), f"{p}score.layout must be packed or padded; got {s.layout!r}")
    _require(s.eos_rule in ("final", "token"), f"{p}score.eos_rule must be final or token; got {s.eos_rule!r}")
    _require(s.eos_rule == "final" or s.exclude_eos,
             f"{p}score.eos_rule: token drops EOS values, which needs score.exclude_eos: true; set it, or "
             f"score.eos_rule: final")
    _require(lo.temperature > 0, f"{p}loss.temperature must be > 0, got {lo.temperature}")
    _require(0 < lo.t_min <= lo.t_max,
             f"{p}loss.t_min must be > 0 and <= loss.t_max, got t_min={lo.t_min}, t_max={lo.t_max}")
    _require(lo.center_coef >= 0, f"{p}loss.center_coef must be >= 0, got {lo.center_coef}")
    _require(t.lr > 0 and math.isfinite(t.lr), f"{p}train.lr must be a positive number, got {t.lr}")
    _require(t.weight_decay >= 0, f"{p}train.weight_decay must be >= 0, got {t.weight_decay}")
    _require(all(0 <= b < 1 for b in t.betas), f"{p}train.betas must be in [0, 1), got {list(t.betas)}")
    _require(t.grad_clip > 0, f"{p}train.grad_clip must be > 0, got {t.grad_clip}")
    _require(t.scheduler in ("constant", "linear", "cosine"),
             f"{p}train.scheduler must be one of constant, linear, cosine; got {t.scheduler!r}")
    _require(t.warmup_steps >= 0, f"{p}train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(t.epochs >= 1, f"{p}train.epochs must be >= 1, got {t.epochs}")
    _require(t.batch_size >= 1 and t.micro_batch_size >= 1,
             f"{p}train.batch_size and train.micro_batch_size must be >= 1")
    _require(t.forward_micro_batch_size is None or 1 <= t.forward_micro_batch_size <= t.micro_batch_size,
             f"{p}train.forward_micro_batch_size must be null or in 1..train.micro_batch_size "
             f"({t.micro_batch_size}), got {t.forward_micro_batch_size}")
    _require(t.max_steps is None or t.max_steps >= 1, f"{p}train.max_steps must be >= 1 or null, got {t.max_steps}")
    _require(e.every_steps >= 1, f"{p}eval.every_steps must be >= 1, got {e.every_steps}")
    _require(e.batch_size >= 1, f"{p}eval.batch_size must be >= 1, got {e.batch_size}")
    _require(sw.n_trials >= 1, f"{p}sweep.n_trials must be >= 1, got {sw.n_trials}")
    _require(sw.confirm.top_k >= 0, f"{p}sweep.confirm.top_k must be >= 0 (0 = no confirmation), got {sw.confirm.top_k}")
    _require(sw.confirm.seeds >= 2, f"{p}sweep.confirm.seeds must be >= 2: one seed cannot show seed-to-seed "
             f"variation; got {sw.confirm.seeds}")
    _require(sw.confirm.n_resamples >= 100, f"{p}sweep.confirm.n_resamples must be >= 100, got {sw.confirm.n_resamples}")
    for name in d.eval_sets:
        _require(name not in ("val", "train", "critic", "perf", "sweep"),
                 f"{p}data.eval_sets name '{name}' is reserved; rename it")
    _require(d.n_folds >= 2, f"{p}data.n_folds must be >= 2, got {d.n_folds}")
    _require(d.fold is None or 0 <= d.fold < d.n_folds,
             f"{p}data.fold must be null or in 0..{d.n_folds - 1} (data.n_folds={d.n_folds}), got {d.fold}")
    _require(d.fold is None or "fold" not in d.eval_sets,
             f"{p}data.eval_sets name 'fold' is reserved while data.fold is set; rename it")
    _check_student(cfg.student, p)


def _check_student(st: StudentConfig, p: str) -> None:
    _require(not (st.model and st.endpoint), f"{p}set student.model (a local causal LM directory) or "
             f"student.endpoint (an OpenAI-compatible server), not both")
    _require(st.model != "" and st.endpoint != "", f"{p}student.model and student.endpoint must be null or non-empty")
    _require(not st.endpoint or bool(st.model_name),
             f"{p}student.endpoint needs student.model_name: the model name the server serves")
    _require(not st.endpoint or st.endpoint.startswith(("http://", "https://")),
             f"{p}student.endpoint must be an http:// or https:// URL, got {st.endpoint!r}")
    _require(not st.regenerate or bool(st.model or st.endpoint),
             f"{p}student.regenerate: true needs student.model or student.endpoint to generate with")
    _require(0 <= st.temperature < math.inf, f"{p}student.temperature must be >= 0 (0 = greedy), got {st.temperature}")
    _require(0 < st.top_p <= 1, f"{p}student.top_p must be in (0, 1], got {st.top_p}")
    for name in ("max_new_tokens", "batch_size", "concurrency"):
        _require(getattr(st, name) >= 1, f"{p}student.{name} must be >= 1, got {getattr(st, name)}")
    _require(st.timeout_s > 0, f"{p}student.timeout_s must be > 0, got {st.timeout_s}")
    _require(st.max_retries >= 0, f"{p}student.max_retries must be >= 0, got {st.max_retries}")
    _require(bool(st.api_key_env.strip()), f"{p}student.api_key_env must name an environment variable")


def build_config(raw: dict[str, Any], source: str = "<spec>") -> ExperimentConfig:
    """Turn a parsed YAML mapping into a validated ExperimentConfig."""
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the spec must be a mapping of sections, got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS:
            raise SpecError(f"{source}: unknown section '{name}'. Valid sections: {', '.join(SECTIONS)}")
    cfg = ExperimentConfig(**{name: _build_section(name, raw.get(name), source) for name in SECTIONS})
    if cfg.verl.in_use():
        from critic.verl_units import apply_verl  # imported here: critic.verl_units imports this module
        cfg = apply_verl(cfg, raw.get("train") or {}, source)
    _check_values(cfg, source)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr=1e-5' -> ('train', 'lr', 1e-5); the value is parsed as YAML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise SpecError(f"--set expects section.key=value (e.g. train.lr=1e-5), got {text!r}")
    key, value = text.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise SpecError(f"--set {key.strip()}: the value {value!r} is not valid YAML ({problem}); "
                        f"quote strings and close brackets, e.g. train.betas=[0.9,0.99]") from None
    # YAML reads '1e-5' as a string (it wants '1.0e-5'); accept the usual float spelling.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return section, name, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the raw spec with `section.key` overrides applied."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    items = overrides.items() if isinstance(overrides, dict) else [
        (f"{s}.{k}", v) for s, k, v in map(parse_override, overrides)]
    for dotted, value in items:
        section, name = dotted.split(".", 1)
        if section not in SECTIONS:
            raise SpecError(f"override {dotted!r}: unknown section '{section}'. Valid sections: {', '.join(SECTIONS)}")
        merged.setdefault(section, {})
        if merged[section] is None:
            merged[section] = {}
        merged[section][name] = value
    return merged


def read_spec(path: str | Path) -> dict[str, Any]:
    """Read a spec YAML file into a raw mapping, with clear errors for missing or invalid files."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise SpecError(f"spec file not found: {resolved}")
    try:
        raw = yaml.safe_load(resolved.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{resolved}: invalid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{resolved}: the spec must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a spec file, apply `--set` overrides, validate; raises SpecError."""
    raw = apply_overrides(read_spec(path), overrides or [])
    return build_config(raw, source=str(path))


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML."""
    def plain(obj: Any) -> Any:
        if isinstance(obj, tuple):
            return [plain(x) for x in obj]
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [plain(x) for x in obj]
        return obj
    return {name: plain(dataclasses.asdict(getattr(cfg, name))) for name in SECTIONS}


def flatten(cfg: ExperimentConfig,
            sections: tuple[str, ...] = ("data", "model", "score", "loss", "train", "verl", "eval")) -> dict[str, Any]:
    """{'train.lr': 3e-6, ...} for the trial-relevant sections."""
    out: dict[str, Any] = {}
    for name, values in to_dict(cfg).items():
        if name in sections:
            for key, value in values.items():
                out[f"{name}.{key}"] = value
    return out
