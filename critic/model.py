"""The critic: a causal LM body with a one-output token-classification head.

`AutoModelForTokenClassification(num_labels=1)` is the class verl uses for its
critic, so a critic trained here can be handed to verl. The `tiny` preset is
built entirely locally: a small Qwen2 config and a byte-level BPE tokenizer
trained on the demo corpus. Base weights are kept in memory once per process;
every trial starts from a copy of the identical initial state.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from critic.config import ModelConfig, SpecError
from critic.files import atomic_write

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048)


def select_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"model.device is {name!r} but no CUDA device is available; use model.device: auto or cpu")
    return torch.device(name)


def build_tiny_tokenizer(cache_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train (once, cached on disk) a byte-level BPE tokenizer on the demo corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from critic.demo import demo_corpus

    out = Path(cache_dir) / "tiny_tokenizer"
    if not (out / "tokenizer.json").exists():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(demo_corpus(), trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
        try:
            atomic_write(out, fast.save_pretrained)
        except OSError:  # another process won the race; its copy is identical
            pass
    return AutoTokenizer.from_pretrained(out)


def load_tokenizer(cfg: ModelConfig, cache_dir: str | Path):
    if cfg.path is None:
        return build_tiny_tokenizer(cache_dir)
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        raise SpecError(f"model.path {str(path.resolve())!r} is not a directory; point it at a local checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_digest(tokenizer) -> str:
    """Identity of a tokenizer for cache keys: its vocabulary, rules and chat template."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()[:16]


def _build_critic(cfg: ModelConfig, vocab_size: int, pad_token_id: int) -> torch.nn.Module:
    torch.manual_seed(cfg.init_seed)  # tiny preset: whole body; checkpoint: only the new value head
    if cfg.path is None:
        config = Qwen2Config(vocab_size=vocab_size, num_labels=1, pad_token_id=pad_token_id,
                             tie_word_embeddings=False, classifier_dropout=0.0, **TINY_SHAPE)
        return AutoModelForTokenClassification.from_config(config, attn_implementation="sdpa")
    config = AutoConfig.from_pretrained(cfg.path, num_labels=1, classifier_dropout=0.0)
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id
    return AutoModelForTokenClassification.from_pretrained(cfg.path, config=config, attn_implementation="sdpa")


@dataclass
class BaseCritic:
    """Initial critic weights held on the CPU, copied for every trial."""
    model: torch.nn.Module
    tokenizer: object


_BASE_CACHE: dict[tuple, BaseCritic] = {}


def load_base_critic(cfg: ModelConfig, cache_dir: str | Path) -> BaseCritic:
    """Load (once per process) the tokenizer and the initial critic."""
    key = (cfg.path, cfg.preset, cfg.init_seed, str(cache_dir))
    if key not in _BASE_CACHE:
        tokenizer = load_tokenizer(cfg, cache_dir)
        model = _build_critic(cfg, len(tokenizer), tokenizer.pad_token_id)
        _BASE_CACHE[key] = BaseCritic(model=model.float().eval(), tokenizer=tokenizer)
    return _BASE_CACHE[key]


def fresh_critic(base: BaseCritic, cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """A trainable copy of the base critic on `device` (base weights untouched)."""
    model = copy.deepcopy(base.model).to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model.train()
