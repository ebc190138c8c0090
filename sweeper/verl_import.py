"""A composed verl launch as this tool's spec (`sweep.py init --from-verl`): the user's values are the baseline.

Every value is read from the config verl composes (sweeper/verl_launch.py), in verl's units; the spec's `verl:`
section holds the run's batch and warmup units and critic/verl_units.py converts them, so the tuned lr means what
it meant in the run. The search space is centred on the user's values. Overrides the spec does not model, keys
this verl version does not read, and every choice made for the user are comments at the top of the spec.
Key by key (the table in docs/verl_import.md):

| verl (composed)                                             | spec                                   |
|-------------------------------------------------------------|----------------------------------------|
| data.train_files / val_files / prompt_key / max_*_length    | data.train_path / eval_sets / ...      |
| critic.model.path, enable_gradient_checkpointing, lora_*    | model.path, gradient_checkpointing, lora |
| data.train_batch_size, critic.rollout_n, ppo_mini_batch_size, ppo_epochs, ppo_micro_batch_size_per_gpu | verl.* |
| trainer.nnodes x n_gpus_per_node, critic_warmup             | verl.n_gpus, verl.critic_warmup        |
| critic.optim.lr_warmup_steps (or _ratio x total steps)      | verl.lr_warmup_steps (scheduler steps) |
| trainer.total_training_steps (or rows // batch x epochs)    | verl.total_training_steps              |
| trainer.v1.separate_async.parameter_sync_step (that mode)   | verl.parameter_sync_step               |
| critic.optim.lr / weight_decay / betas / scheduler / clip   | train.* (grad_clip: the worker's key)  |
| the fork's critic keys (export.verl_keys)                   | loss.*                                 |
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from critic.sections import LORA_TARGETS, RESERVED_SETS, LossConfig, SpecError
from sweeper.verl_export import VERSIONS, VerlVersion, resolve_version
from sweeper.verl_launch import Launch, VerlSource, compose_overrides, override_key, select

# The users' GAD fork's critic keys (as in experiments/demo_verl.yaml): our key -> theirs; --fork-key adds more.
FORK_KEYS = {"loss.adaptive_temperature": "critic.adaptive_temperature", "loss.temperature": "critic.temperature",
             "loss.t_min": "critic.temperature_min", "loss.t_max": "critic.temperature_max"}
# The composed keys the spec reads (verl 0.8/0.9 names; the version-specific ones come from VerlVersion).
MODELED = ("data.train_files", "data.val_files", "data.prompt_key", "data.max_prompt_length",
           "data.max_response_length", "data.truncation", "data.train_batch_size", "data.train_max_samples",
           "actor_rollout_ref.rollout.n", "critic.rollout_n", "critic.ppo_mini_batch_size", "critic.ppo_epochs",
           "critic.ppo_micro_batch_size", "critic.ppo_micro_batch_size_per_gpu", "critic.use_dynamic_bsz",
           "trainer.nnodes", "trainer.n_gpus_per_node", "trainer.critic_warmup", "trainer.total_training_steps",
           "trainer.total_epochs", "trainer.use_v1", "trainer.v1.trainer_mode",
           "trainer.v1.separate_async.parameter_sync_step", "critic.optim.lr", "critic.optim.weight_decay",
           "critic.optim.betas", "critic.optim.lr_warmup_steps", "critic.optim.lr_warmup_steps_ratio",
           "critic.optim.lr_scheduler_type", "critic.optim.warmup_style", "critic.optim.min_lr_ratio",
           "critic.optim.num_cycles", "critic.optim.zero_indexed_step", "critic.grad_clip",
           "critic.optim.clip_grad", "critic.model.path", "critic.model.enable_gradient_checkpointing",
           "critic.model.lora_rank", "critic.model.lora_alpha", "critic.model.target_modules")
# Actor keys a critic key interpolates from (critic.yaml `${oc.select:actor_rollout_ref.actor...}`).
VIA_CRITIC = {"actor_rollout_ref.actor.ppo_mini_batch_size": "critic.ppo_mini_batch_size",
              "actor_rollout_ref.actor.ppo_epochs": "critic.ppo_epochs",
              "actor_rollout_ref.actor.use_dynamic_bsz": "critic.use_dynamic_bsz"}


@dataclass
class ImportedSpec:
    """The spec written for a launch, and what it could not carry over (comments in the file, lines on stderr)."""
    raw: dict[str, Any]
    source: str
    verl_version: str
    notes: list[str] = field(default_factory=list)  # choices made for the user, values the spec does not model
    dead: list[str] = field(default_factory=list)  # keys of the user's command this verl version does not read
    not_modeled: list[str] = field(default_factory=list)  # the user's overrides the spec leaves to the RL run

    def text(self) -> str:
        wrap = textwrap.TextWrapper(width=116, initial_indent="# ", subsequent_indent="#   ")
        lines = [f"# Imported from {self.source} by `sweep.py init --from-verl` against verl {self.verl_version}'s "
                 f"own config.", "# sweep.baseline = your command's values, in verl's units (the verl: section); "
                 "`sweep.py export --format verl` writes them back."]
        lines += [line for dead in self.dead for line in wrap.wrap("NOT READ BY VERL: " + dead)]
        lines += [line for note in self.notes for line in wrap.wrap("NOTE: " + note)]
        if self.not_modeled:
            lines += wrap.wrap("Not modeled (the RL run's settings, left to your command): "
                               + ", ".join(self.not_modeled))
        return "\n".join(lines) + "\n" + yaml.dump(_flow_leaves(self.raw), Dumper=_Dumper, sort_keys=False, width=116)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for a search-space entry or a list: `train.lr: {type: float, ...}`."""


class _Flow(dict):
    pass


_Dumper.add_representer(_Flow, lambda dumper, value: dumper.represent_mapping("tag:yaml.org,2002:map", value,
                                                                              flow_style=True))
_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value,
                                                                              flow_style=True))


def _flow_leaves(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of the spec whose search-space entries are _Flow mappings (one line each)."""
    sweep = dict(raw["sweep"])
    sweep["search_space"] = {key: _Flow(entry) for key, entry in sweep["search_space"].items()}
    return {**raw, "sweep": sweep}


class _Reader:
    """The composed config's values, with the launch for messages about placeholders."""

    def __init__(self, cfg, launch: Launch):
        self.cfg, self.launch = cfg, launch
        self.user = {override_key(o): o.split("=", 1)[1] if "=" in o else None for o in launch.overrides}

    def get(self, key: str, needed_for: str | None = None) -> Any:
        value = select(self.cfg, key)
        if needed_for and self.launch.placeholders_in(value):
            raise SpecError(f"{self.launch.source}: {key}={value} is unresolved and the spec needs it for "
                            f"{needed_for}: {self.launch.how_to_resolve(value)}")
        return value

    def number(self, key: str, needed_for: str) -> Any:
        value = self.get(key, needed_for)
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SpecError(f"{self.launch.source}: {key}={value!r} must be a number (the spec needs it for "
                            f"{needed_for})")
        return value


def _data_file(path: Any, key: str, source: str) -> str:
    files = path if isinstance(path, list) else [path]
    if len(files) != 1:
        raise SpecError(f"{source}: {key} lists {len(files)} files; this tool trains on one parquet file: "
                        f"concatenate them, or pass one with the script's argument {key}=FILE")
    resolved = Path(str(files[0])).expanduser()
    if not resolved.is_file():
        raise SpecError(f"{source}: {key}: data file not found: {resolved.resolve()}; fix the path (or --var)")
    return str(resolved)


def _data(reader: _Reader, out: ImportedSpec) -> tuple[dict[str, Any], int]:
    """The data section, and the training file's row count (for verl's step count)."""
    import pyarrow.parquet as pq

    source = reader.launch.source
    train = _data_file(reader.get("data.train_files", "data.train_path"), "data.train_files", source)
    prompt_key = reader.get("data.prompt_key", "data.prompt_key")
    schema = pq.read_schema(train).names
    if prompt_key not in schema:
        raise SpecError(f"{source}: data.prompt_key={prompt_key!r} is not a column of {train} (columns: "
                        f"{', '.join(schema)}); fix data.prompt_key in the script")
    data: dict[str, Any] = {"train_path": train, "prompt_key": prompt_key}
    missing = [name for name in ("teacher_response", "student_response") if name not in schema]
    if missing:
        out.notes.append(f"{train} has no column {' or '.join(missing)} (data.teacher_key / student_key, not in "
                         f"verl's command): set them to your columns, or generate student responses (README, "
                         f"'Student responses from the frozen actor')")
    val = reader.get("data.val_files")
    eval_sets = {}
    for index, path in enumerate(val if isinstance(val, list) else [val] if val else []):
        resolved = Path(str(path)).expanduser()
        if not resolved.is_file():
            raise SpecError(f"{source}: data.val_files: data file not found: {resolved.resolve()}; fix the path "
                            f"(or --var)")
        name = resolved.stem if resolved.stem not in RESERVED_SETS and resolved.stem not in eval_sets \
            else f"verl_val{index}"
        eval_sets[name] = str(resolved)
    if eval_sets:
        data["eval_sets"] = eval_sets
    data["max_prompt_length"] = reader.number("data.max_prompt_length", "data.max_prompt_length")
    data["max_response_length"] = reader.number("data.max_response_length", "data.max_response_length")
    truncation = reader.get("data.truncation")
    if truncation not in ("left", "error", None):
        out.notes.append(f"data.truncation={truncation}: this tool keeps a long prompt's end (verl's 'left'); "
                         f"not modeled")
    rows = pq.ParquetFile(train).metadata.num_rows
    cap = reader.get("data.train_max_samples")
    return data, min(rows, cap) if isinstance(cap, int) and cap > 0 else rows


def _worker(reader: _Reader, short: str) -> tuple[VerlVersion, str]:
    """The critic worker verl runs: the engine one where the legacy one is disabled or gone."""
    impl = reader.get("trainer.use_legacy_worker_impl")
    keys = VERSIONS[short]
    worker = "engine" if impl == "disable" and "engine" in keys.clip_keys else None
    return resolve_version(short, worker)[1:]


def _parameter_sync_step(reader: _Reader) -> int:
    """Update_critic calls per iteration: P in V1's separate_async mode (critic/verl_units.py), else 1."""
    if reader.launch.entry.endswith("_v0") or not reader.get("trainer.use_v1"):
        return 1
    if reader.get("trainer.v1.trainer_mode") != "separate_async":
        return 1
    return int(reader.number("trainer.v1.separate_async.parameter_sync_step", "verl.parameter_sync_step"))


def _verl_section(reader: _Reader, out: ImportedSpec, rows: int) -> dict[str, Any]:
    """The run's units, as verl composes them."""
    n = reader.number
    verl = {"train_batch_size": n("data.train_batch_size", "verl.train_batch_size"),
            "rollout_n": n("critic.rollout_n", "verl.rollout_n") if reader.get("critic.rollout_n") is not None
            else n("actor_rollout_ref.rollout.n", "verl.rollout_n"),
            "ppo_mini_batch_size": n("critic.ppo_mini_batch_size", "verl.ppo_mini_batch_size"),
            "ppo_epochs": n("critic.ppo_epochs", "verl.ppo_epochs"),
            "n_gpus": n("trainer.nnodes", "verl.n_gpus") * n("trainer.n_gpus_per_node", "verl.n_gpus")}
    micro = reader.get("critic.ppo_micro_batch_size_per_gpu", "verl.ppo_micro_batch_size_per_gpu")
    dynamic = bool(reader.get("critic.use_dynamic_bsz"))
    if micro is None and reader.get("critic.ppo_micro_batch_size") is not None:
        micro = n("critic.ppo_micro_batch_size", "verl.ppo_micro_batch_size_per_gpu") // verl["n_gpus"]
    if micro is None and dynamic:
        micro = verl["ppo_mini_batch_size"] * verl["rollout_n"] // verl["n_gpus"]
    if micro is None:
        raise SpecError(f"{reader.launch.source}: critic.ppo_micro_batch_size_per_gpu is null and "
                        f"critic.use_dynamic_bsz false, which verl refuses; set one of them in the script")
    if dynamic:
        out.notes.append(f"critic.use_dynamic_bsz=true: verl forms micro-batches by tokens (ppo_max_token_len_per_gpu="
                         f"{reader.get('critic.ppo_max_token_len_per_gpu')}); this tool cannot, and uses "
                         f"verl.ppo_micro_batch_size_per_gpu={micro} pairs (the adaptive T is computed per "
                         f"micro-batch; the export writes use_dynamic_bsz=false when T is adaptive)")
    verl["ppo_micro_batch_size_per_gpu"] = int(micro)
    warmup = n("trainer.critic_warmup", "verl.critic_warmup")
    if warmup < 2:
        raise SpecError(f"{reader.launch.source}: trainer.critic_warmup={warmup}: the actor updates from the first "
                        f"iteration, so there is no critic-only warmup to tune; set trainer.critic_warmup >= 2")
    verl["critic_warmup"] = warmup
    total = reader.get("trainer.total_training_steps", "verl.total_training_steps")
    if total is None:
        total = rows // verl["train_batch_size"] * n("trainer.total_epochs", "verl.total_training_steps")
        out.notes.append(f"verl.total_training_steps={total}: {rows} training rows // data.train_batch_size x "
                         f"trainer.total_epochs, as verl counts them"
                         + (" (before data.filter_overlong_prompts drops any)"
                            if reader.get("data.filter_overlong_prompts") else ""))
    verl["total_training_steps"] = int(total)
    verl["parameter_sync_step"] = _parameter_sync_step(reader)
    verl["lr_warmup_steps"] = _lr_warmup(reader, out, verl)
    return verl


def _lr_warmup(reader: _Reader, out: ImportedSpec, verl: dict[str, Any]) -> int:
    """verl's warmup in scheduler steps: lr_warmup_steps if > 0, else int(ratio x the scheduler's horizon)."""
    steps = reader.get("critic.optim.lr_warmup_steps", "verl.lr_warmup_steps")
    if steps is not None and steps > 0:
        return int(steps)
    ratio = reader.get("critic.optim.lr_warmup_steps_ratio", "verl.lr_warmup_steps") or 0.0
    horizon = verl["total_training_steps"] * verl["parameter_sync_step"]
    if ratio:
        out.notes.append(f"verl.lr_warmup_steps={int(ratio * horizon)}: critic.optim.lr_warmup_steps_ratio={ratio} "
                         f"x {horizon} scheduler steps, as verl's worker computes it; the export writes the steps "
                         f"and lr_warmup_steps_ratio=0.0")
    return int(ratio * horizon)


def _train(reader: _Reader, out: ImportedSpec, keys: VerlVersion, worker: str) -> dict[str, Any]:
    n = reader.number
    scheduler = reader.get("critic.optim.warmup_style") or reader.get(keys.scheduler_key, "train.scheduler")
    clip_key = keys.clip_keys[worker]
    train = {"lr": float(n("critic.optim.lr", "train.lr")), "weight_decay": float(n("critic.optim.weight_decay",
                                                                                    "train.weight_decay")),
             "scheduler": scheduler, "grad_clip": float(n(clip_key, "train.grad_clip"))}
    betas = reader.get("critic.optim.betas")
    if betas is not None:
        train["betas"] = [float(b) for b in betas]
    if scheduler == "cosine":
        pins = {"critic.optim.min_lr_ratio": 0.0, "critic.optim.num_cycles": 0.5}
        for key, expected in pins.items():
            value = reader.get(key)
            if value is not None and value != expected:
                out.notes.append(f"{key}={value} not modeled: this tool's cosine is verl's with {key.split('.')[-1]}="
                                 f"{expected}, and the export writes that")
    return train


def _dead_keys(reader: _Reader, out: ImportedSpec, keys: VerlVersion, worker: str, short: str) -> None:
    """Keys in the user's command that this verl version's critic does not read, and what it reads instead."""
    clip_key = keys.clip_keys[worker]
    for key in {k for version in VERSIONS.values() for k in version.clip_keys.values()} - {clip_key}:
        if key in reader.user:
            out.dead.append(f"{key}={reader.user[key]}: verl {short}'s {worker} critic worker does not read it; "
                            f"it clips with {clip_key}={reader.get(clip_key)}, which the spec takes; set "
                            f"{clip_key} in your command instead")
    if "critic.optim.warmup_style" in reader.user and keys.scheduler_key != "critic.optim.warmup_style":
        out.dead.append(f"critic.optim.warmup_style={reader.user['critic.optim.warmup_style']}: deprecated in verl "
                        f"{short}; it still overrides {keys.scheduler_key}, which the export writes: use "
                        f"{keys.scheduler_key} in your command")


def _model(reader: _Reader, out: ImportedSpec) -> dict[str, Any]:
    path = reader.get("critic.model.path", "model.path")
    model: dict[str, Any] = {"path": str(Path(str(path)).expanduser()), "preset": None}
    if "critic.model.path" not in reader.user:
        out.notes.append(f"critic.model.path is not in your command: verl composes {path} (its default, or your "
                         f"config's fallback), which the spec takes")
    if not Path(model["path"]).is_dir():
        out.notes.append(f"model.path {model['path']} is not a directory here: the sweep loads it on the machine "
                         f"that trains")
    checkpointing = reader.get("critic.model.enable_gradient_checkpointing")
    if checkpointing is not None:
        model["gradient_checkpointing"] = bool(checkpointing)
    rank = reader.get("critic.model.lora_rank") or 0
    if rank:
        targets = reader.get("critic.model.target_modules")
        if targets == "all-linear":
            out.notes.append("critic.model.target_modules=all-linear: model.lora.target_modules lists the seven "
                             "linear layers of a Qwen2/Llama block; edit it for another architecture")
            targets = list(LORA_TARGETS)
        model["lora"] = {"rank": int(rank), "alpha": int(reader.get("critic.model.lora_alpha")),
                         "target_modules": list(targets)}
    return model


def _fork_values(reader: _Reader, fork_keys: dict[str, str]) -> dict[str, Any]:
    """Our key -> the value of the fork's key in the composed config, for those the command's config has."""
    values = {ours: reader.get(theirs, ours) for ours, theirs in fork_keys.items()}
    return {ours: value for ours, value in values.items() if value is not None}


def _search_space(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A default search space centred on the user's values, and the baseline: those values."""
    train, verl, loss = raw["train"], raw["verl"], raw.get("loss", {})
    space: dict[str, Any] = {"train.lr": {"type": "float", "low": _round(train["lr"] / 10),
                                          "high": _round(train["lr"] * 10), "log": True}}
    warmup, total = verl["critic_warmup"], verl["total_training_steps"]
    space["verl.critic_warmup"] = {"type": "int", "low": max(2, warmup // 2), "high": min(total, warmup * 2)}
    if verl["lr_warmup_steps"]:
        space["verl.lr_warmup_steps"] = {"type": "int", "low": 0, "high": 2 * verl["lr_warmup_steps"]}
    if loss.get("adaptive_temperature") and {"t_min", "t_max"} <= set(loss):
        middle = round((loss["t_min"] + loss["t_max"]) / 2, 4)
        t_a = loss.get("t_a", LossConfig.t_a)
        if loss["t_min"] >= t_a:  # T = clamp(t_a + t_b |mean diff|, t_min, t_max) never goes below t_a
            space["loss.t_min"] = {"type": "float", "low": max(t_a, round(loss["t_min"] / 2, 4)), "high": middle}
        space["loss.t_max"] = {"type": "float", "low": middle, "high": round(loss["t_max"] * 2, 4)}
    elif "temperature" in loss and not loss.get("adaptive_temperature"):
        space["loss.temperature"] = {"type": "float", "low": loss["temperature"] / 2, "high": loss["temperature"] * 2,
                                     "log": True}
    values = {"train": train, "verl": verl, "loss": loss}
    baseline = {key: values[key.split(".")[0]][key.split(".")[1]] for key in space}
    return space, baseline


def _round(value: float) -> float:
    """3 significant digits: a readable bound (1.0e-7, not 1.0000000000000001e-07)."""
    return float(f"{value:.3g}") if value and math.isfinite(value) else value


def spec_from_launch(launch: Launch, cfg, source: VerlSource, fork_keys: dict[str, str] | None = None,
                     study_name: str = "verl-critic-warmup") -> ImportedSpec:
    """The spec for a composed launch; raises SpecError (one line) for what the spec needs and cannot get."""
    reader = _Reader(cfg, launch)
    if source.short not in VERSIONS:
        raise SpecError(f"verl {source.version}: supported are {', '.join(VERSIONS)}")
    keys, worker = _worker(reader, source.short)
    out = ImportedSpec({}, launch.source, source.version)
    data, rows = _data(reader, out)
    verl = _verl_section(reader, out, rows)
    fork_keys = {**FORK_KEYS, **(fork_keys or {})}
    fork_values = _fork_values(reader, fork_keys)
    verl_keys = {ours: fork_keys[ours] for ours in fork_values}
    raw: dict[str, Any] = {"data": data, "model": _model(reader, out), "train": _train(reader, out, keys, worker),
                           "verl": verl}
    for ours, value in fork_values.items():  # loss.t_max -> raw["loss"]["t_max"]
        section, name = ours.split(".", 1)
        raw.setdefault(section, {})[name] = value
    _dead_keys(reader, out, keys, worker, source.short)
    space, baseline = _search_space(raw)
    if "loss.t_max" in space and "loss.t_min" not in space:
        t_a = raw["loss"].get("t_a", LossConfig.t_a)
        out.notes.append(f"loss.t_min={raw['loss']['t_min']} is not sampled: below t_a={t_a} (this tool's default "
                         f"unless your fork's key is mapped) it behaves like t_a; map it with --fork-key loss.t_a=KEY")
    raw["sweep"] = {"study_name": study_name, "search_space": space, "baseline": baseline}
    if verl_keys:
        raw["export"] = {"verl_keys": verl_keys}
    out.raw = raw
    modeled = set(MODELED) | set(verl_keys.values()) | {keys.scheduler_key, keys.warmup_key.lstrip("+")}
    for key in reader.user:
        if key in VIA_CRITIC and VIA_CRITIC[key] not in reader.user:
            out.notes.append(f"{key}={reader.user[key]} is also the critic's {VIA_CRITIC[key].split('.')[-1]} "
                             f"(verl's critic config interpolates it): the spec takes it, the export writes "
                             f"{VIA_CRITIC[key]}")
        elif key not in modeled:
            out.not_modeled.append(f"{key}={reader.user[key]}" + (
                f" ({', '.join(launch.placeholders_in(reader.user[key]))} unresolved)"
                if launch.placeholders_in(reader.user[key]) else ""))
    return out


def parameter_sync_step(launch: Launch, cfg) -> int:
    """The composed launch's update_critic calls per iteration (V1 separate_async's parameter_sync_step, else 1)."""
    return _parameter_sync_step(_Reader(cfg, launch))


def launch_diff(launch: Launch, cfg, source: VerlSource, exported: list[str]) -> list[str]:
    """Key by key, what appending `exported` to the user's command changes in the config verl composes.

    `- key=old` / `+ key=new` per changed key, then the unchanged keys in one line, then the keys of the
    command this verl version does not read. Both sides are composed by verl's own config.
    """
    reader = _Reader(cfg, launch)
    after = compose_overrides(source, launch.overrides + exported, f"{launch.source} + the export")
    lines, same = [f"--- {launch.source} (composed by verl {source.version})", "+++ with the export appended"], []
    for key in dict.fromkeys(override_key(o) for o in exported):
        old, new = select(cfg, key), select(after, key)
        if old == new:
            same.append(key)
        else:
            lines += [f"- {key}={old}", f"+ {key}={new}"]
    if len(lines) == 2:
        lines.append("  (no change: the export gives back your command's values)")
    lines.append(f"= unchanged: {', '.join(same) or 'none'}")
    keys, worker = _worker(reader, source.short)
    dead = ImportedSpec({}, launch.source, source.version)
    _dead_keys(reader, dead, keys, worker, source.short)
    return lines + [f"! NOT READ BY VERL {source.version}: {line}" for line in dead.dead]
