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
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from critic.sections import (  # noqa: F401  (re-exported: the spec's types live in critic.sections)
    CONFIRM_SET,
    RESERVED_SETS,
    CandidateConfig,
    ConfirmConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ExportConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    ScoreConfig,
    SpecError,
    StudentConfig,
    SweepConfig,
    TrainConfig,
    VerlConfig,
)
from critic.verl_units import apply_verl

SECTIONS: dict[str, type] = {f.name: f.type for f in fields(ExperimentConfig)}
TRIAL_SECTIONS = ("data", "model", "score", "loss", "train", "verl", "eval")  # the sections that shape a trial
_SECTION_TYPES = typing.get_type_hints(ExperimentConfig)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint; convert where YAML is loose (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except SpecError as exc:
                errors.append(str(exc))
        raise SpecError(errors[0])
    if hint is Any:
        return value
    if origin is typing.Literal:  # one of the listed values, e.g. sweep.sampler
        if value not in args:
            raise SpecError(f"{where} must be {one_of(args)}; got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):  # a nested block such as sweep.confirm
        if not isinstance(value, dict):
            raise SpecError(f"{where} must be a mapping, got {value!r}")
        hints = typing.get_type_hints(hint)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {unknown}. Valid keys: {', '.join(sorted(hints))}")
        return hint(**{k: coerce(v, hints[k], f"{where}.{k}") for k, v in value.items()})
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
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where} must be a mapping, got {value!r}")
        return {coerce(k, args[0], where): coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    raise AssertionError(f"unsupported type hint {hint!r} at {where}")


def field_hint(key: str, where: str, verb: str = "set") -> Any:
    """The type hint of a trial key: section.field, or section.block.field inside a nested block (model.lora.rank).

    Raises SpecError naming `where`, the key and the valid choices for a key outside the trial sections, an unknown
    field, or a whole block.
    """
    section, *names = key.split(".")
    if not names:
        raise SpecError(f"{where}: key {key!r} must be section.field, e.g. train.lr")
    if section not in TRIAL_SECTIONS:
        raise SpecError(f"{where}: key {key!r}: section must be one of {', '.join(TRIAL_SECTIONS)}")
    hint, path = _SECTION_TYPES[section], section
    for name in names:  # model.lora.rank: ModelConfig -> LoraConfig -> int
        hints = typing.get_type_hints(hint) if dataclasses.is_dataclass(hint) else {}
        if name not in hints:
            raise SpecError(f"{where}: unknown key {key!r}. Valid keys in '{path}': "
                            f"{', '.join(sorted(hints)) or 'none (it is not a block of keys)'}")
        hint, path = hints[name], f"{path}.{name}"
    if dataclasses.is_dataclass(hint):
        raise SpecError(f"{where}: key {key!r} is a block; {verb} one of its keys, e.g. "
                        f"{key}.{next(iter(typing.get_type_hints(hint)))}")
    return hint


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
    values = {key: coerce(value, hints[key], f"{source}: {name}.{key}") for key, value in raw.items()}
    return cls(**values)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


def allowed_values(section_type: type, name: str) -> tuple[str, ...]:
    """The values a Literal-typed field of a spec section may take, in their documented order."""
    return typing.get_args(typing.get_type_hints(section_type)[name])


def one_of(values: tuple[str, ...]) -> str:
    """('a', 'b') -> 'a or b'; ('a', 'b', 'c') -> 'one of a, b, c'."""
    return " or ".join(values) if len(values) == 2 else f"one of {', '.join(values)}"


def _check_values(cfg: ExperimentConfig, source: str) -> None:
    d, m, s, lo, t, e, sw = cfg.data, cfg.model, cfg.score, cfg.loss, cfg.train, cfg.eval, cfg.sweep
    p = f"{source}: "
    _require(0.0 < d.val_fraction < 1.0, f"{p}data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _require(0.0 <= d.confirm_fraction < 1.0 and d.val_fraction + d.confirm_fraction < 1.0,
             f"{p}data.confirm_fraction must be in [0, 1) and leave training prompts: val_fraction + confirm_fraction "
             f"< 1, got {d.val_fraction} + {d.confirm_fraction}")
    _require(not e.confirm_split or d.confirm_fraction > 0,
             f"{p}eval.confirm_split needs a confirmation split: set data.confirm_fraction > 0 (e.g. 0.1)")
    _require(d.max_prompt_length > 0, f"{p}data.max_prompt_length must be > 0, got {d.max_prompt_length}")
    _require(d.max_response_length > 1, f"{p}data.max_response_length must be > 1, got {d.max_response_length}")
    _require(m.path is not None or m.preset == "tiny",
             f"{p}set model.path to a local checkpoint directory, or model.preset: tiny")
    _require(s.attention == "sdpa_per_pair" or s.layout == "packed",
             f"{p}score.attention: {s.attention} applies to score.layout: packed only; set score.layout: packed "
             f"or leave score.attention at sdpa_per_pair")
    _require(s.attention != "flex" or m.device != "cpu",
             f"{p}score.attention: flex trains on CUDA only (torch's flex_attention has no CPU backward); with "
             f"model.device: cpu set score.attention: sdpa_per_pair")
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
    _require(sw.max_failures >= 0, f"{p}sweep.max_failures must be >= 0 (0 = up to sweep.n_trials failures), got "
             f"{sw.max_failures}")
    _require(sw.heartbeat_interval >= 1, f"{p}sweep.heartbeat_interval must be >= 1 second, got "
             f"{sw.heartbeat_interval}")
    # A live worker's heartbeat can be a little late; a grace shorter than two beats reaps live trials.
    _require(sw.grace_period >= 2 * sw.heartbeat_interval,
             f"{p}sweep.grace_period ({sw.grace_period}) must be at least twice sweep.heartbeat_interval "
             f"({sw.heartbeat_interval}); the defaults are 300 and 60 seconds")
    _require(sw.storage_outage_s is None or sw.storage_outage_s >= 0,
             f"{p}sweep.storage_outage_s must be null or an integer >= 0 seconds (0 = stop at the first lost "
             f"connection), "
             f"got {sw.storage_outage_s}")
    # A worker waiting out an outage sends no heartbeat: the other workers must not take its trial for dead.
    _require(sw.storage_outage_s is None or sw.storage_outage_s + 2 * sw.heartbeat_interval <= sw.grace_period,
             f"{p}sweep.storage_outage_s ({sw.storage_outage_s}) plus two heartbeats (2 x {sw.heartbeat_interval}) "
             f"must fit in sweep.grace_period ({sw.grace_period}), or other workers take a trial that waits out an "
             f"outage for dead; lower sweep.storage_outage_s or raise sweep.grace_period")
    _require(isinstance(sw.gpus_per_trial, int) and sw.gpus_per_trial >= 1,
             f"{p}sweep.gpus_per_trial must be an integer >= 1 (1 = one process per trial), got {sw.gpus_per_trial}")
    _require(sw.gpus_per_trial == 1 or not (t.save_checkpoint or sw.save_best_checkpoint),
             f"{p}train.save_checkpoint and sweep.save_best_checkpoint need sweep.gpus_per_trial: 1 (a sharded "
             f"critic is not gathered into a checkpoint yet); set sweep.gpus_per_trial: 1 or turn them off")
    _require(sw.confirm.top_k >= 0,
             f"{p}sweep.confirm.top_k must be >= 0 (0 = no confirmation), got {sw.confirm.top_k}")
    _require(sw.confirm.seeds >= 2, f"{p}sweep.confirm.seeds must be >= 2: one seed cannot show seed-to-seed "
             f"variation; got {sw.confirm.seeds}")
    _require(sw.confirm.max_seeds >= 0, f"{p}sweep.confirm.max_seeds must be >= 0 (at most sweep.confirm.seeds: "
             f"no added seeds), got {sw.confirm.max_seeds}")
    _require(sw.confirm.n_resamples >= 100,
             f"{p}sweep.confirm.n_resamples must be >= 100, got {sw.confirm.n_resamples}")
    for name in d.eval_sets:
        _require(name not in RESERVED_SETS, f"{p}data.eval_sets name '{name}' is reserved (metric names start with "
                 f"{', '.join(RESERVED_SETS)}); rename it")
    _require(d.n_folds >= 2, f"{p}data.n_folds must be >= 2, got {d.n_folds}")
    _require(d.fold is None or 0 <= d.fold < d.n_folds,
             f"{p}data.fold must be null or in 0..{d.n_folds - 1} (data.n_folds={d.n_folds}), got {d.fold}")
    _check_student(cfg.student, p)
    _check_candidates(sw, p)
    _check_demo_names(cfg, p)
    _check_lora(m.lora, p)


def _check_lora(lora: LoraConfig, p: str) -> None:
    """model.lora's values; that the target modules exist is checked when the model is built (critic/model.py)."""
    _require(lora.rank >= 0, f"{p}model.lora.rank must be >= 0 (0 = no LoRA, full fine-tuning), got {lora.rank}")
    _require(lora.alpha > 0, f"{p}model.lora.alpha must be > 0 (the update is scaled by alpha / rank), "
             f"got {lora.alpha}")
    _require(0 <= lora.dropout < 1, f"{p}model.lora.dropout must be in [0, 1), got {lora.dropout}")
    _require(bool(lora.target_modules) and all(name.strip() for name in lora.target_modules),
             f"{p}model.lora.target_modules must be a non-empty list of module names, e.g. [q_proj, k_proj, "
             f"v_proj, o_proj, gate_proj, up_proj, down_proj]; got {lora.target_modules}")


def _check_candidates(sw: SweepConfig, p: str) -> None:
    """sweep.candidates: named, distinct, each changing known trial keys (values are checked with the trial config)."""
    where = f"{p}sweep.candidates"
    _require(not sw.candidates or bool(sw.baseline),
             f"{where} are changes to your current setting, compared with it: set sweep.baseline too")
    names: dict[str, int] = {}
    for index, candidate in enumerate(sw.candidates):
        here = f"{where}[{index}]"
        _require(bool(candidate.params), f"{here} has no params; give the keys it changes, e.g. "
                 f"{{name: 3 epochs, params: {{train.epochs: 3}}}}")
        for key, value in candidate.params.items():
            coerce(value, field_hint(key, f"{here}.params"), f"{here}.params.{key}")
        label = candidate.label
        _require(bool(label.strip()), f"{here}.name is empty; name the change, e.g. name: 3 epochs")
        _require(label != "baseline" and not re.fullmatch(r"trial-\d+", label),
                 f"{here}.name {label!r} is reserved (the confirmation's own labels); rename it")
        _require(label not in names, f"{here}: the name {label!r} is also candidate {names.get(label)}'s; give each "
                 f"candidate its own name")
        names[label] = index
        _require({**sw.baseline, **candidate.params} != sw.baseline,
                 f"{here} ({label!r}) changes nothing: each of its params equals sweep.baseline's; change a value "
                 f"or drop it")


def _check_demo_names(cfg: ExperimentConfig, p: str) -> None:
    """`demo:<name>` data files and student actor must be ones the demo provides."""
    # imported here: critic.demo pulls in pandas, which loading a spec does not need
    from critic.demo import DEMO_ACTORS, DEMO_NAMES

    paths = {"data.train_path": cfg.data.train_path,
             **{f"data.eval_sets.{name}": path for name, path in cfg.data.eval_sets.items()}}
    for key, value in paths.items():
        _require(not value.startswith("demo:") or value.split(":", 1)[1] in DEMO_NAMES,
                 f"{p}{key} {value!r} is not a demo set; the demo sets are "
                 f"{', '.join('demo:' + n for n in DEMO_NAMES)}, or give a parquet file's path")
    model = cfg.student.model or ""
    _require(not model.startswith("demo:") or model.split(":", 1)[1] in DEMO_ACTORS,
             f"{p}student.model {model!r} is not a demo actor; the demo actors are "
             f"{', '.join('demo:' + n for n in DEMO_ACTORS)}, or give a local causal LM directory")


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
        section, *path = dotted.split(".")
        if section not in SECTIONS:
            raise SpecError(f"override {dotted!r}: unknown section '{section}'. Valid sections: {', '.join(SECTIONS)}")
        node = merged
        for depth, name in enumerate([section, *path[:-1]]):  # model.lora.rank: into model, then lora (copied)
            child = node.get(name)
            if child is not None and not isinstance(child, dict):
                raise SpecError(f"override {dotted!r}: {'.'.join([section, *path][:depth + 1])} is {child!r}, "
                                f"not a mapping; remove it from the spec or override it whole")
            node[name] = dict(child or {})
            node = node[name]
        node[path[-1]] = value
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


def flatten(cfg: ExperimentConfig, sections: tuple[str, ...] = TRIAL_SECTIONS) -> dict[str, Any]:
    """{'train.lr': 3e-6, 'model.lora.rank': 0, ...} for the trial-relevant sections (nested blocks flattened)."""
    out: dict[str, Any] = {}
    for name, values in to_dict(cfg).items():
        if name in sections:
            hints = typing.get_type_hints(_SECTION_TYPES[name])
            nested = {key for key, hint in hints.items() if dataclasses.is_dataclass(hint)}
            for key, value in values.items():
                if key in nested:
                    out.update({f"{name}.{key}.{sub}": v for sub, v in value.items()})
                else:
                    out[f"{name}.{key}"] = value
    return out
