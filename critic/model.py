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

from critic.config import LoraConfig, ModelConfig, SpecError
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
    """A trainable copy of the base critic on `device` (base weights untouched); a PeftModel when model.lora is on."""
    model = copy.deepcopy(base.model)
    if cfg.lora.rank > 0:
        model = apply_lora(model, cfg.lora, frozen_dtype=torch.bfloat16 if device.type == "cuda" else None)
    model = model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        if cfg.lora.rank > 0:  # the frozen embeddings' output needs a grad for checkpointed blocks to backprop
            model.enable_input_require_grads()
    return model.train()


VALUE_HEAD = "score"  # AutoModelForTokenClassification's head on Qwen2/Llama-style bodies: one value per token


def lora_targets_missing(model: torch.nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """(targets that name no linear layer of the body, the body's linear-layer names that exist)."""
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and not name.startswith(VALUE_HEAD)}
    return [t for t in targets if t not in linear], sorted(linear)


def apply_lora(model: torch.nn.Module, lora: LoraConfig, frozen_dtype: torch.dtype | None = None):
    """Wrap a critic in LoRA adapters on `lora.target_modules`; the value head is trained whole and saved.

    peft freezes everything but the adapters; `modules_to_save` keeps a trainable copy of the head, which
    LoRA reward models otherwise leave at its random init (trl#1379, verl#4620). `frozen_dtype` (bf16 on
    CUDA) stores the frozen linear weights at 2 bytes per parameter: under bf16 autocast every matmul
    rounds them to bf16 anyway, so the forward is unchanged; norms, embeddings and the trained weights stay fp32.
    """
    import peft

    missing, present = lora_targets_missing(model, lora.target_modules)
    if VALUE_HEAD in lora.target_modules:
        raise SpecError(f"model.lora.target_modules: {VALUE_HEAD!r} is the value head, which is always trained whole; "
                        f"remove it from the list")
    if missing:
        raise SpecError(f"model.lora.target_modules {missing} name no linear layer of this critic "
                        f"({type(model).__name__}); its layers are {present}: set model.lora.target_modules to "
                        f"some of those")
    config = peft.LoraConfig(task_type=peft.TaskType.TOKEN_CLS, r=lora.rank, lora_alpha=lora.alpha,
                             lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                             modules_to_save=[VALUE_HEAD])
    model = peft.get_peft_model(model, config)
    if frozen_dtype is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
                module.to(frozen_dtype)
    return model


def trainable_counts(model: torch.nn.Module) -> dict[str, float]:
    """model/trainable_params and model/trainable_fraction (of all parameters): what the optimizer updates."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"model/trainable_params": float(trainable), "model/trainable_fraction": trainable / max(total, 1)}


def merged_critic(model: torch.nn.Module) -> torch.nn.Module:
    """A plain critic with a PeftModel's adapters folded into its weights, on the CPU in fp32 (`model` untouched)."""
    import peft

    if not isinstance(model, peft.PeftModel):
        return model
    device = next(model.parameters()).device
    merged = copy.deepcopy(model.cpu())  # the copy on the CPU: no second model on the accelerator
    model.to(device)
    return merged.float().merge_and_unload()
