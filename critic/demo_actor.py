"""The demo actor (`student.model: demo:actor`): a tiny causal LM that answers demo prompts like the flawed student.

The GAD flow needs a frozen actor to generate the student responses. A randomly initialised LM would
emit token noise, which any critic separates from the teacher at once; this one is the tiny critic's
Qwen2 body with an LM head, trained briefly (seeded, CPU, under a minute) on the demo corpus's *student*
side: prompt -> the student's slipped, truncated, repeated or hedged answer (critic/demo.py). Sampled,
it writes answers of that kind, with its own mistakes. It is built once into
`<data.cache_dir>/demo/actor-v<N>/` as an ordinary Hugging Face checkpoint (weights, tokenizer,
generation_config with EOS), so the usual local-model path (critic/student/local.py) generates with it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from critic.demo import DEMO_ACTORS

ACTOR_VERSION = 1  # bump when the recipe below changes: the directory (and so the response cache key) changes
TRAIN_STEPS = 240
BATCH_SIZE = 32
LR = 3e-3
SEED = 0


def resolve_student_model(model: str, cache_dir: str | Path) -> str:
    """`demo:actor` -> the demo actor's checkpoint directory (built on first use); any other value unchanged."""
    if not model.startswith("demo:"):
        return model
    name = model.split(":", 1)[1]
    if name not in DEMO_ACTORS:  # the spec loader already refuses it; this guards direct engine callers
        raise ValueError(f"unknown demo actor {model!r}; choose one of {', '.join('demo:' + n for n in DEMO_ACTORS)}")
    return str(demo_actor_path(cache_dir))


def demo_actor_path(cache_dir: str | Path) -> Path:
    """The demo actor's directory, trained and saved once; concurrent workers wait for one build."""
    from critic.files import atomic_write, exclusive

    out = Path(cache_dir) / "demo" / f"actor-v{ACTOR_VERSION}"
    if out.is_dir():  # renamed into place whole: if it exists, it is complete
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out.parent / ".actor.lock", f"[demo] another process is training the demo actor; waiting ({out})"):
        if not out.is_dir():
            from critic.model import build_tiny_tokenizer

            print(f"[demo] training the demo actor once ({TRAIN_STEPS} steps on the demo students' answers) -> {out}")
            start = time.perf_counter()
            tokenizer = build_tiny_tokenizer(cache_dir)
            atomic_write(out, lambda tmp: build_actor(tmp, tokenizer))
            print(f"[demo] demo actor ready in {time.perf_counter() - start:.1f} s")
    return out


def build_actor(out: Path, tokenizer, steps: int | None = None) -> None:
    """Train the actor and save it to `out`, a complete checkpoint directory (deterministic for a given tokenizer)."""
    from transformers import AutoTokenizer

    config = actor_config(tokenizer)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Train on the ids generation will see: next to a qwen2 config.json, AutoTokenizer loads the tokenizer as
    # Qwen2Tokenizer, whose pre-tokenizer splits digits apart, unlike the tiny tokenizer it was saved from.
    tokenizer = AutoTokenizer.from_pretrained(out)
    save_actor(train_demo_actor(tokenizer, config, steps), tokenizer, out)


def actor_config(tokenizer):
    """The tiny critic's Qwen2 shape as a causal LM, ending its answers with the tokenizer's EOS (<|im_end|>)."""
    from transformers import Qwen2Config

    from critic.model import TINY_SHAPE

    return Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **TINY_SHAPE)


def actor_examples(tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) for every demo pair's student side, rendered as generation sees them."""
    from critic.demo import DEMO_SETS, make_demo_frame

    prompts, responses = [], []
    for name in DEMO_SETS:
        frame = make_demo_frame(name)
        prompts += frame["content"].tolist()
        responses += frame["student_response"].tolist()
    # The chat template with the generation prompt, as critic/student/local.py renders it.
    texts = tokenizer.apply_chat_template([[{"role": "user", "content": p}] for p in prompts],
                                          add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return [(p, r + [tokenizer.eos_token_id]) for p, r in zip(prompt_ids, response_ids)]


def _batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (B, T) input ids, attention mask and labels (-100 on the prompt and padding)."""
    import torch

    length = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (prompt, response) in enumerate(examples):
        n = len(prompt) + len(response)
        ids[i, :n] = torch.tensor(prompt + response)
        labels[i, len(prompt):n] = torch.tensor(response)  # only the answer is learnt, as in SFT
        mask[i, :n] = 1
    return ids, mask, labels


def train_demo_actor(tokenizer, config, steps: int | None = None, seed: int = SEED):
    """A Qwen2ForCausalLM from `config`, trained on the student answers (deterministic on a CPU)."""
    import torch
    from transformers import Qwen2ForCausalLM

    steps = TRAIN_STEPS if steps is None else steps
    examples = actor_examples(tokenizer)
    with torch.random.fork_rng(devices=[]):  # seeds the init without touching the caller's random state
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # short linear warmup, then linear decay to 0
        optimizer, lambda step: min(1.0, (step + 1) / 20) * (1 - step / max(steps, 1)))
    order = np.random.default_rng(seed).permutation(np.resize(np.arange(len(examples)), steps * BATCH_SIZE))
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (32, ~80)-token steps of a 0.4M-parameter model: more threads only wait on each other
    try:
        _train_loop(model, optimizer, schedule, examples, order, steps, tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def _train_loop(model, optimizer, schedule, examples, order, steps: int, pad_id: int) -> None:
    import torch

    for step in range(steps):
        ids, mask, labels = _batch([examples[i] for i in order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]], pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


def save_actor(model, tokenizer, out: Path) -> None:
    """A complete checkpoint directory: weights and config, the tokenizer, and a generation config with EOS."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
