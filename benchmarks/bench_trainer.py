#!/usr/bin/env python
"""Critic-warmup trainer throughput: this project's step against a verl-style step and TRL's RewardTrainer.

Every contender trains its own copy of one randomly initialised Qwen2-architecture critic on the
same pairs in each optimizer step. In one process, each step of each repetition runs on every
contender back to back (A B C, A B C, ...); pairs/s comes from the median repetition, and the
speed ratio is the median over steps of (their seconds / ours) measured back to back, so slow
spells of a shared machine hit both sides of a ratio.

- this project: `critic.train.optimizer_step`, the body of `train_critic`'s loop (score layout from
  `--layout`, packed by default), on a `critic.data.PairSet` built from the token ids.
- verl-style: re-implemented below. Per micro-batch, two padded forwards (teacher, student, in random
  order; prompts left-padded, responses right-padded, each to the micro-batch's longest, which pads
  less than verl's fixed max lengths), values = logits[:, -R-1:-1], masked mean over the response
  tokens without EOS, adaptive-temperature Bradley-Terry loss, AdamW.
- TRL: `trl.RewardTrainer` on the same token ids (chosen = prompt+teacher, rejected = prompt+student),
  a sequence-classification head on the same body, TRL defaults except gradient checkpointing off and
  bf16 only on GPU (as this project), sequential sampling (same pairs per step). Needs
  `pip install -r requirements-bench.txt`; reported as null when `trl` is not importable.

Useful tokens = tokens of the teacher and student sequences (prompt counted in each), padding
excluded: the same count for every contender. Model FLOPs = the FLOPs each contender needs for the
tokens it actually forwards, padding excluded (packing forwards each prompt once, so it is credited
once; attention counts only the keys each query may see), as a fraction of a torch.matmul peak
measured in the same run (the higher of a measurement before and after the contenders).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForTokenClassification, Qwen2Config  # noqa: E402
from trl_contender import Trl, trl_available  # noqa: E402

from critic.config import ExperimentConfig, LossConfig, ScoreConfig, TrainConfig  # noqa: E402
from critic.data import PairSet  # noqa: E402
from critic.score import collate, score_batch  # noqa: E402
from critic.train import build_optimizer, optimizer_step  # noqa: E402

PAD_ID, EOS_ID, FIRST_TEXT_ID = 0, 2, 3
MODEL_SHAPES = {
    "cpu": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,  # Qwen2.5-0.5B
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768),
}
LENGTHS = {"prompt": (32, 384), "teacher": (64, 512), "student": (16, 512)}  # uniform, inclusive; EOS included


# ---------------------------------------------------------------- workload and model

def make_workload(n_pairs: int, vocab_size: int, seed: int) -> PairSet:
    """Random token ids with real warmup lengths; 85% of responses end with EOS (the rest were cut)."""
    rng = np.random.default_rng(seed)

    def ids(kind: str) -> np.ndarray:
        low, high = LENGTHS[kind]
        return rng.integers(FIRST_TEXT_ID, vocab_size, int(rng.integers(low, high + 1))).astype(np.int32)

    def responses(kind: str) -> tuple[list[np.ndarray], np.ndarray]:
        out, ends_eos = [ids(kind) for _ in range(n_pairs)], rng.random(n_pairs) < 0.85
        for response, eos in zip(out, ends_eos):
            if eos:
                response[-1] = EOS_ID
        return out, ends_eos

    prompts = [ids("prompt") for _ in range(n_pairs)]
    teachers, teacher_eos = responses("teacher")
    students, student_eos = responses("student")
    return PairSet("bench", prompts, teachers, students, [""] * n_pairs, teacher_eos, student_eos)


def build_critic(size: str, seed: int) -> torch.nn.Module:
    """The critic class verl and this project use: token classification, one label, SDPA attention."""
    torch.manual_seed(seed)
    config = Qwen2Config(num_labels=1, pad_token_id=PAD_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
                         classifier_dropout=0.0, use_cache=False, **MODEL_SHAPES[size])
    return AutoModelForTokenClassification.from_config(config, attn_implementation="sdpa").float().train()


def matmul_peak(device: torch.device) -> float:
    """Best FLOP/s of a large torch.matmul: fp32 on CPU, bf16 on GPU."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(20 if device.type == "cuda" else 1):  # a GPU clocks up before timing
        a @ b
    best = float("inf")
    for _ in range(8):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- FLOP and token accounting

def _causal_keys(n: np.ndarray) -> np.ndarray:
    return n * (n + 1) // 2  # keys seen by n causal queries


def training_flops(model: torch.nn.Module, pairs: PairSet, index: np.ndarray, packed: bool) -> float:
    """Forward+backward FLOPs (3x forward) for the tokens a layout forwards, padding excluded."""
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = config.hidden_size // config.num_attention_heads
    attention_per_key = 4 * config.num_attention_heads * head_dim * config.num_hidden_layers  # QK^T and AV
    p = np.array([len(pairs.prompt_ids[i]) for i in index], dtype=np.float64)
    t = np.array([len(pairs.teacher_ids[i]) for i in index], dtype=np.float64)
    s = np.array([len(pairs.student_ids[i]) for i in index], dtype=np.float64)
    if packed:  # one row: prompt | teacher causal, then student tokens see the prompt and the student so far
        tokens, keys = p + t + s, _causal_keys(p + t) + s * p + _causal_keys(s)
    else:  # two rows: prompt | teacher and prompt | student
        tokens, keys = 2 * p + t + s, _causal_keys(p + t) + _causal_keys(p + s)
    return float(3 * (2 * linear * tokens.sum() + attention_per_key * keys.sum()))


def useful_tokens(pairs: PairSet, index: np.ndarray) -> int:
    return int(sum(2 * len(pairs.prompt_ids[i]) + len(pairs.teacher_ids[i]) + len(pairs.student_ids[i])
                   for i in index))


# ---------------------------------------------------------------- the verl-style step (re-implementation)

def verl_style_scores(model, prompts, responses, ends_eos, device, autocast: bool) -> torch.Tensor:
    """verl's padded critic forward: [left-padded prompt | right-padded response], mean value over the response.

    values = logits[:, -R-1:-1] reads response token t's value at the position of token t-1; the
    response mask drops the EOS token (as this project's `exclude_eos`).
    """
    n, prompt_width, response_width = len(prompts), max(map(len, prompts)), max(map(len, responses))
    input_ids = np.full((n, prompt_width + response_width), PAD_ID, dtype=np.int64)
    attention = np.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, prompt_width - len(prompt):prompt_width + len(response)] = np.concatenate([prompt, response])
        attention[row, prompt_width - len(prompt):prompt_width + len(response)] = 1
    input_ids, attention = torch.from_numpy(input_ids).to(device), torch.from_numpy(attention).to(device)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                       use_cache=False).logits  # (n, P+R, 1)
    values = logits.squeeze(-1).float()[:, -response_width - 1:-1]  # (n, R)
    counts = torch.tensor([len(r) - int(eos) for r, eos in zip(responses, ends_eos)], device=device).clamp(min=1)
    response_mask = torch.arange(response_width, device=device)[None, :] < counts[:, None]
    return (values * response_mask).sum(-1) / response_mask.sum(-1)


def verl_style_loss(teacher_scores, student_scores, loss_cfg: LossConfig) -> torch.Tensor:
    diff = teacher_scores - student_scores
    temperature = (loss_cfg.t_a + loss_cfg.t_b * diff.detach().mean().abs()).clamp(loss_cfg.t_min, loss_cfg.t_max)
    return -F.logsigmoid(diff / temperature).mean()


class VerlStyle:
    """Two padded forwards per micro-batch, one .item() per micro-batch for logging, AdamW."""
    name = "verl-style (2 padded fwd)"
    packed = False

    def __init__(self, model, pairs: PairSet, cfg: ExperimentConfig, device: torch.device, seed: int) -> None:
        self.model, self.pairs, self.cfg, self.device = model, pairs, cfg, device
        t = cfg.train
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.rng, self.logged_losses = np.random.default_rng(seed), []

    def side(self, index, which: str) -> torch.Tensor:
        pairs = self.pairs
        responses = [getattr(pairs, f"{which}_ids")[i] for i in index]
        ends_eos = getattr(pairs, f"{which}_ends_eos")[index]
        return verl_style_scores(self.model, [pairs.prompt_ids[i] for i in index], responses, ends_eos,
                                 self.device, autocast=self.device.type == "cuda")

    def step(self, batch_index: np.ndarray) -> float:
        """One optimizer step on the pairs `batch_index`; returns its wall-clock seconds."""
        start = time.perf_counter()
        micro = self.cfg.train.micro_batch_size
        for first in range(0, len(batch_index), micro):
            index = batch_index[first:first + micro]
            order = ("teacher", "student") if self.rng.random() < 0.5 else ("student", "teacher")
            scores = {which: self.side(index, which) for which in order}
            loss = verl_style_loss(scores["teacher"], scores["student"], self.cfg.loss)
            (loss * len(index) / len(batch_index)).backward()
            self.logged_losses.append(loss.detach().item())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        if torch.isfinite(grad_norm):  # a sync, as in verl
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - start


# ---------------------------------------------------------------- this project and TRL

class ThisProject:
    """critic.train.optimizer_step: the real per-step code path of a trial."""

    def __init__(self, model, pairs: PairSet, cfg: ExperimentConfig, device: torch.device) -> None:
        self.model, self.pairs, self.cfg, self.device = model, pairs, cfg, device
        self.packed = cfg.score.layout == "packed"
        self.name = f"this project ({cfg.score.layout})"
        self.optimizer, self.scheduler = build_optimizer(model, cfg, n_steps=10**6)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps_done = 0

    def step(self, batch_index: np.ndarray) -> float:
        """One optimizer step on the pairs `batch_index`; returns its wall-clock seconds."""
        start = time.perf_counter()
        self.steps_done += 1
        optimizer_step(self.model, self.params, self.optimizer, self.scheduler, self.pairs, batch_index,
                       self.cfg, self.device, PAD_ID, self.steps_done)
        _sync(self.device)
        return time.perf_counter() - start


# ---------------------------------------------------------------- checks, timing and report

def check_same_scores(model, pairs: PairSet, index: np.ndarray, device: torch.device) -> dict[str, float]:
    """Max |score difference| of each layout against the verl-style forward, same weights, float32."""
    model.eval()
    out = {}
    with torch.no_grad():
        verl_teacher = verl_style_scores(model, [pairs.prompt_ids[i] for i in index],
                                         [pairs.teacher_ids[i] for i in index], pairs.teacher_ends_eos[index],
                                         device, autocast=False)
        verl_student = verl_style_scores(model, [pairs.prompt_ids[i] for i in index],
                                         [pairs.student_ids[i] for i in index], pairs.student_ends_eos[index],
                                         device, autocast=False)
        for layout in ("packed", "padded"):
            score_cfg = ScoreConfig(reduction="mean", exclude_eos=True, layout=layout)
            teacher, student = score_batch(model, collate(pairs, index, PAD_ID, score_cfg).to(device), score_cfg)
            out[layout] = max(float((teacher - verl_teacher).abs().max()), float((student - verl_student).abs().max()))
    model.train()
    return out


def time_interleaved(contenders: list, batches: list[np.ndarray], reps: int) -> dict[str, np.ndarray]:
    """A warm-up step each (one micro-batch), then per repetition and step, every contender back to back.

    Returns seconds[name] of shape (reps, steps).
    """
    for contender in contenders:
        contender.step(batches[0][:contender.cfg.train.micro_batch_size])
    seconds = {c.name: np.zeros((reps, len(batches))) for c in contenders}
    for rep in range(reps):
        for k, batch_index in enumerate(batches):
            cells = []
            for contender in contenders:
                seconds[contender.name][rep, k] = contender.step(batch_index)
                cells.append(f"{contender.name} {seconds[contender.name][rep, k]:.2f}")
            print(f"  rep {rep + 1}/{reps} step {k + 1}/{len(batches)}: " + ", ".join(cells) + " s", flush=True)
    return seconds


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(MODEL_SHAPES), default=None,
                        help="critic shape: cpu (hidden 256, 4 layers) or 0.5b (Qwen2.5-0.5B); default by device")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per repetition (other pairs each)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per optimizer step (cpu 16, gpu 32)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="pairs per forward")
    parser.add_argument("--layout", choices=["packed", "padded"], default="packed", help="this project's layout")
    parser.add_argument("--with-padded", action="store_true", help="also time this project with layout=padded")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL even when it is installed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 by default: on a machine shared with other work, more threads "
                             "mostly wait for each other and the figures swing; 0 = torch's default")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_contenders(args, base_model, pairs, cfg, device) -> list:
    contenders = [ThisProject(copy.deepcopy(base_model).to(device), pairs, cfg, device)]
    if args.with_padded and args.layout != "padded":
        padded_cfg = replace(cfg, score=replace(cfg.score, layout="padded"))
        contenders.append(ThisProject(copy.deepcopy(base_model).to(device), pairs, padded_cfg, device))
    contenders.append(VerlStyle(copy.deepcopy(base_model).to(device), pairs, cfg, device, args.seed))
    if args.no_trl:
        print("trl skipped (--no-trl)")
    elif trl_available():
        transformers.logging.set_verbosity_error()
        contenders.append(Trl(base_model, pairs, cfg, device))
    else:
        print("trl not installed (pip install -r requirements-bench.txt); TRL reported as null")
    return contenders


def report(contenders, seconds, batches, pairs, peak, base_model) -> tuple[dict, dict, dict]:
    """Print the table; return pairs/s, ratio (their time / ours) and fraction of peak, by contender name."""
    index = np.concatenate(batches)
    n_pairs, tokens = len(index), useful_tokens(pairs, index)
    ours = contenders[0].name
    print(f"\n{'contender':<28}{'pairs/s':>9}{'useful tok/s':>14}{'model GFLOP/s':>15}{'% of peak':>11}"
          f"{'ours faster':>13}   median s/rep (reps: s)")
    pairs_per_s, ratios, fractions = {}, {}, {}
    for contender in contenders:
        per_rep = seconds[contender.name].sum(axis=1)  # (reps,) seconds for all the steps
        median = float(np.median(per_rep))
        flops = training_flops(base_model, pairs, index, contender.packed) / median
        pairs_per_s[contender.name], fractions[contender.name] = n_pairs / median, flops / peak
        # paired: each step ran on every contender back to back, so slow spells of a shared machine cancel
        ratios[contender.name] = float(np.median(seconds[contender.name] / seconds[ours]))
        print(f"{contender.name:<28}{n_pairs / median:>9.2f}{tokens / median:>14,.0f}{flops / 1e9:>15.1f}"
              f"{100 * flops / peak:>10.1f}%{ratios[contender.name]:>12.2f}x   {median:.2f} "
              f"({', '.join(f'{x:.1f}' for x in per_rep)})")
    return pairs_per_s, ratios, fractions


def describe_run(args, device: torch.device, size: str, pairs: PairSet, cfg: ExperimentConfig) -> str:
    """Print what runs where; returns the device's name."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({cpu_name()}, {torch.get_num_threads()} of {os.cpu_count()} threads)"
    print(f"device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} (other processes share this machine)")
    print(f"critic: Qwen2 {size} {MODEL_SHAPES[size]}, random weights, float32"
          + (" + bf16 autocast" if device.type == "cuda" else ""))
    mean = {k: np.mean([len(x) for x in getattr(pairs, f"{k}_ids")]) for k in ("prompt", "teacher", "student")}
    t = cfg.train
    print(f"workload: {args.steps} step(s) x {t.batch_size} pairs (micro-batch {t.micro_batch_size}), lengths "
          f"uniform {LENGTHS}, mean prompt {mean['prompt']:.0f} / teacher {mean['teacher']:.0f} / student "
          f"{mean['student']:.0f}; {args.reps} interleaved reps")
    return device_name


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    size = args.size or ("cpu" if device.type == "cpu" else "0.5b")
    batch_size = args.batch_size or (16 if device.type == "cpu" else 32)
    if batch_size % args.micro_batch_size:
        raise SystemExit(f"--batch-size ({batch_size}) must be a multiple of --micro-batch-size "
                         f"({args.micro_batch_size}) so TRL's gradient accumulation sees the same pairs per step")
    cfg = ExperimentConfig(score=ScoreConfig(reduction="mean", exclude_eos=True, layout=args.layout),
                           loss=LossConfig(adaptive_temperature=True),
                           train=TrainConfig(lr=1e-5, batch_size=batch_size, micro_batch_size=args.micro_batch_size))
    pairs = make_workload(batch_size * args.steps, MODEL_SHAPES[size]["vocab_size"], args.seed)
    batches = [np.arange(k * batch_size, (k + 1) * batch_size) for k in range(args.steps)]  # random pairs per step
    base_model = build_critic(size, args.seed)
    device_name = describe_run(args, device, size, pairs, cfg)

    check = check_same_scores(copy.deepcopy(base_model).to(device), pairs, batches[0][:args.micro_batch_size], device)
    ok = all(v <= 1e-5 for v in check.values())
    print("score check (float32, same weights and pairs), max |this project - verl-style|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in check.items()) + f"  -> {'OK' if ok else 'FAIL'} (tol 1e-5)")

    peak_before = matmul_peak(device)
    contenders = build_contenders(args, base_model, pairs, cfg, device)
    seconds = time_interleaved(contenders, batches, args.reps)
    peak = max(peak_before, matmul_peak(device))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"matmul peak ({'fp32' if device.type == 'cpu' else 'bf16'} torch.matmul): {peak / 1e9:.1f} GFLOP/s")
    pairs_per_s, ratios, fractions = report(contenders, seconds, batches, pairs, peak, base_model)

    ours = contenders[0].name
    trl_ratio = ratios.get(Trl.name)
    print(json.dumps({"pairs_per_s": round(pairs_per_s[ours], 3),
                      "ratio_vs_trl": None if trl_ratio is None else round(trl_ratio, 3),
                      "ratio_vs_verl_style": round(ratios[VerlStyle.name], 3),
                      "flops_fraction_of_peak": round(fractions[ours], 3), "device": device_name}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
