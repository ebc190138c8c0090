"""Student responses from a local causal LM: batched `generate` on the spec's model.device.

Calls `on_batch(rows, texts, finish_reasons)` after every batch; a finish reason is "stop" (the actor
ended with EOS) or "length" (cut at max_new_tokens).
"""

from __future__ import annotations

import gc
from pathlib import Path

from critic.config import StudentConfig
from critic.prompts import prompt_text
from critic.student.base import OnBatch


def generate_with_model(student: StudentConfig, messages: dict[int, list[dict]], on_batch: OnBatch,
                        device: str = "auto") -> None:
    """Batched `generate` of a local causal LM (left padding, chat template when it has one) on `device`, the spec's
    model.device (the critic's: generation runs before its trials, on the same machine)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from critic.model import select_device

    path = Path(student.model).expanduser()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # new tokens are appended on the right: every prompt must end there
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = select_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    # Only the spec's parameters decide the responses: the checkpoint's own sampling defaults
    # (top_k, repetition_penalty, ...) would otherwise apply silently. Its EOS ids are kept.
    model.generation_config = GenerationConfig(eos_token_id=sorted(eos_ids), pad_token_id=tokenizer.pad_token_id)
    sampling = student.temperature > 0
    generation = GenerationConfig(
        max_new_tokens=student.max_new_tokens, do_sample=sampling, eos_token_id=sorted(eos_ids),
        pad_token_id=tokenizer.pad_token_id,
        **(dict(temperature=student.temperature, top_p=student.top_p, top_k=0) if sampling else {}))

    def render(chat: list[dict]) -> list[int]:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(prompt_text(chat) + "\n")["input_ids"]  # same plain layout the critic reads

    encoded = {row: render(chat) for row, chat in messages.items()}
    # Longest first (an out-of-memory shows at once), ties by row: the same batches on a resumed run.
    order = sorted(encoded, key=lambda row: (-len(encoded[row]), row))
    devices = [device] if device.type == "cuda" else []
    try:
        for start in range(0, len(order), student.batch_size):
            rows = order[start:start + student.batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[r] for r in rows]}, return_tensors="pt").to(device)
            with torch.random.fork_rng(devices=devices), torch.inference_mode():
                torch.manual_seed(student.seed + rows[0])  # per batch: resuming reproduces the same samples
                output = model.generate(**batch, generation_config=generation)  # (B, prompt + new)
            texts, reasons = [], []
            for new_ids in output[:, batch["input_ids"].shape[1]:].tolist():
                stop = next((k for k, token in enumerate(new_ids) if token in eos_ids), None)
                texts.append(tokenizer.decode(new_ids[:stop], skip_special_tokens=True))
                reasons.append("length" if stop is None else "stop")
            on_batch(rows, texts, reasons)
    finally:
        del model  # the critic trains next: give the device memory back
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
