"""A trained critic on disk: a Hugging Face checkpoint plus the spec and the curves it was trained with.

Layout of a checkpoint directory:
  config.json, model.safetensors, tokenizer files   loadable with AutoModelForTokenClassification
  experiment.yaml                                   critic.config.to_dict(cfg): the full spec
  history.json                                      {"train": [[step, {metric: value}], ...], "eval": [...],
                                                     "final_metrics": {...}, "data_digests": {...},
                                                     "tokenizer_digest": "..."}
  adapter/ (model.lora.rank > 0 only)               the peft adapter: LoRA weights and the trained value head
                                                    (modules_to_save), for verl's critic.model.lora_adapter_path;
                                                    the model files above are then the merged critic
Non-finite metric values are stored as null (strict JSON) and read back as NaN.

The tokenizer is read back with the class it was saved as. AutoTokenizer picks the class from the model
type instead: for a qwen2 config it rebuilds Qwen2's pre-tokenizer, which tokenizes the tiny preset's
byte-level BPE differently (digits split one by one). The saved tokenizer digest catches any such change.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from critic.config import ExperimentConfig, SpecError, build_config, to_dict
from critic.files import atomic_write
from critic.model import merged_critic, tokenizer_digest

CONFIG_FILE = "experiment.yaml"
HISTORY_FILE = "history.json"
ADAPTER_DIR = "adapter"

History = list[tuple[int, dict[str, float]]]


class CheckpointError(SpecError):
    """A directory that is not a usable critic checkpoint; the message says what is missing."""


@dataclass
class Histories:
    """What was streamed while the checkpoint trained (RecordingReporter's lists) and its final summary."""
    train: History = field(default_factory=list)
    eval: History = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)  # e.g. train/progressive_d_acc
    data_digests: dict[str, str] = field(default_factory=dict)  # file digests at training time


def _plain(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _history_to_json(history) -> list:
    return [[int(step), {k: _plain(v) for k, v in metrics.items()}] for step, metrics in history]


def _history_from_json(raw: list) -> History:
    return [(int(step), {k: (math.nan if v is None else float(v)) for k, v in metrics.items()})
            for step, metrics in raw]


def save_checkpoint(directory: str | Path, model, tokenizer, cfg: ExperimentConfig, train_history, eval_history,
                    final_metrics: dict[str, float] | None = None,
                    data_digests: dict[str, str] | None = None) -> Path:
    """Write model, tokenizer, experiment.yaml and history.json into `directory` (absent or empty); returns it.

    Written into a sibling temporary directory first and renamed, so a reader never sees half a checkpoint.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"checkpoint directory {directory.resolve()} already exists and is not empty; "
                              f"choose a new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    history = {"train": _history_to_json(train_history), "eval": _history_to_json(eval_history),
               "final_metrics": {k: _plain(v) for k, v in (final_metrics or {}).items()},
               "data_digests": dict(data_digests or {}), "tokenizer_digest": tokenizer_digest(tokenizer)}

    def write(tmp: Path) -> None:
        if is_lora(model):  # the adapter for verl, and the merged critic that loads like any other
            model.save_pretrained(tmp / ADAPTER_DIR)
        merged_critic(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        (tmp / HISTORY_FILE).write_text(json.dumps(history, allow_nan=False))
        if directory.exists():
            directory.rmdir()  # empty, checked above

    atomic_write(directory, write)
    return directory


def is_lora(model) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def load_adapter(base_model, directory: str | Path):
    """`base_model` (a copy of the critic the adapter was trained on) with a checkpoint's LoRA adapter and value head.

    `directory` is a checkpoint directory or its adapter/ folder. The base must be the trial's initial critic
    (critic.model.load_base_critic with the checkpoint's model section): the adapter stores only the changes.
    """
    from peft import PeftModel

    directory = Path(directory).expanduser().resolve()
    adapter = directory / ADAPTER_DIR if (directory / ADAPTER_DIR).is_dir() else directory
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"{directory} holds no LoRA adapter (adapter_config.json); it was trained with "
                              f"model.lora.rank: 0, so load it whole with load_checkpoint")
    return PeftModel.from_pretrained(base_model, adapter).float().eval()


def _load_tokenizer(directory: Path, expected_digest: str | None):
    """The tokenizer with the class named in its tokenizer_config.json; checked against the saved digest."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config_file = directory / "tokenizer_config.json"
    name = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    tokenizer_class = (tokenizer_class_from_name(name) if name else None) or AutoTokenizer
    tokenizer = tokenizer_class.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if expected_digest and tokenizer_digest(tokenizer) != expected_digest:
        raise CheckpointError(f"the tokenizer in {directory} loads as {type(tokenizer).__name__}, which tokenizes "
                              f"differently from the tokenizer the critic was trained with (digest "
                              f"{tokenizer_digest(tokenizer)}, saved {expected_digest}); re-save the checkpoint "
                              f"with this version of transformers")
    return tokenizer


def load_checkpoint(directory: str | Path):
    """(model, tokenizer, cfg, histories) of a checkpoint directory; the model is on the CPU in eval mode."""
    from transformers import AutoModelForTokenClassification

    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    for name in ("config.json", CONFIG_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} has no {name}; point --checkpoint at a directory written by "
                                  f"critic.checkpoint.save_checkpoint (train.save_checkpoint: true)")
    raw = yaml.safe_load((directory / CONFIG_FILE).read_text())
    cfg = build_config(raw, source=str(directory / CONFIG_FILE))
    history_file = directory / HISTORY_FILE
    raw_history = json.loads(history_file.read_text()) if history_file.is_file() else {}
    histories = Histories(_history_from_json(raw_history.get("train", [])),
                          _history_from_json(raw_history.get("eval", [])),
                          {k: (math.nan if v is None else float(v))
                           for k, v in raw_history.get("final_metrics", {}).items()},
                          dict(raw_history.get("data_digests", {})))
    tokenizer = _load_tokenizer(directory, raw_history.get("tokenizer_digest"))
    model = AutoModelForTokenClassification.from_pretrained(directory)
    if model.config.num_labels != 1:
        raise CheckpointError(f"{directory} holds a model with num_labels={model.config.num_labels}; "
                              f"a critic checkpoint has num_labels=1")
    return model.float().eval(), tokenizer, cfg, histories


def default_checkpoint_dir(cfg: ExperimentConfig) -> Path:
    """`<data.cache_dir>/../checkpoints/<timestamp>/`, with a suffix when that name is taken."""
    root = Path(cfg.data.cache_dir).expanduser().resolve().parent / "checkpoints"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        candidate, n = root / f"{stamp}-{n}", n + 1
    return candidate


def save_trial_checkpoint(result, cfg: ExperimentConfig, train_history, directory: str | Path | None = None) -> Path:
    """Save a TrialResult kept with keep_model (run_trial does so when train.save_checkpoint is set)."""
    if result.model is None:
        raise ValueError("the trial result holds no model; run run_trial with keep_model=True "
                         "or train.save_checkpoint: true")
    target = Path(directory) if directory is not None else default_checkpoint_dir(cfg)
    return save_checkpoint(target, result.model, result.tokenizer, cfg, train_history, result.eval_history,
                           final_metrics=result.metrics, data_digests=result.data_digests)
