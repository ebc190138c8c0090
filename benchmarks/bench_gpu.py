#!/usr/bin/env python
"""GPU training throughput of the critic warmup: packed (sdpa_per_pair, flex) vs padded vs TRL, full and LoRA.

For each critic shape (Qwen2.5-0.5B, Qwen2.5-1.5B; random weights built from a config, nothing
downloaded) and each tuning (full fine-tuning; LoRA rank 16 on every linear layer of the body,
value head trained whole), one optimizer step = forward + backward + clip + AdamW over
`--batch-size` synthetic pairs (prompt 256 tokens, responses 256..512), through this project's
`critic.train.optimizer_step` (the body of a trial's training loop), for:

- packed + sdpa_per_pair (`score.layout: packed`, `score.attention: sdpa_per_pair`, the default),
- packed + flex (`score.attention: flex`: one flex_attention kernel per layer),
- padded (`score.layout: padded`: a teacher row and a student row per pair, as verl forwards them),
- TRL's RewardTrainer (benchmarks/trl_contender.py; null when trl is not importable).

The three layouts of this project share one model and one AdamW (same weights, same optimizer
work); repetitions interleave them (A B C, B C A, ...: a slow spell hits every contender), after
`--warmup` steps each on other batches (compilation and allocator warm-up excluded). Reported per
configuration: the median step time and its spread (min, max), pairs/s = pairs per step / median,
and model TFLOP/s = 6 x params x tokens / median, with params = the critic's parameters minus the
token embedding (a lookup, no FLOPs) and tokens = the tokens the step forwards, padding excluded
(packing forwards each prompt once, padded twice); attention FLOPs are not counted, and LoRA's
frozen weights skip their weight gradients (about 4 x params x tokens), so for LoRA the figure
overstates the work by up to 1.5x. % of peak divides it by a bf16 torch.matmul peak measured in
the same run (fp32 on CPU). An out-of-memory or a failing configuration is recorded with its
status and the run goes on.

Output: one JSON object per configuration (printed, and appended to OUT/bench_gpu.jsonl), then a
table (OUT/bench_gpu.txt); OUT = $OUT when set, else benchmarks/results/. `--device cpu --tiny`
runs the whole script on tiny shapes in seconds (flex is then 'unsupported': no CPU backward).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from bench_trainer import matmul_peak  # noqa: E402  (one peak measurement for both benchmarks)
from transformers import AutoModelForTokenClassification, Qwen2Config  # noqa: E402
from trl_contender import Trl, trl_available  # noqa: E402

from critic.config import ExperimentConfig, LossConfig, ScoreConfig, SpecError, TrainConfig  # noqa: E402
from critic.data import PairSet  # noqa: E402
from critic.train import build_optimizer, optimizer_step  # noqa: E402

PAD_ID, EOS_ID, FIRST_TEXT_ID = 0, 2, 3
QWEN = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, **QWEN),  # Qwen2.5-0.5B
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, **QWEN),  # Qwen2.5-1.5B
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, max_position_embeddings=1024),
}
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = {"packed+sdpa_per_pair": ("packed", "sdpa_per_pair"), "packed+flex": ("packed", "flex"),
              "padded": ("padded", "sdpa_per_pair"), "trl": None}


def make_pairs(n_pairs: int, vocab_size: int, prompt_len: int, response_range: tuple[int, int], seed: int) -> PairSet:
    """Random token ids: prompts of `prompt_len`, responses uniform in `response_range`; 85% end with EOS."""
    rng = np.random.default_rng(seed)

    def ids(length: int) -> np.ndarray:
        return rng.integers(FIRST_TEXT_ID, vocab_size, length).astype(np.int32)

    def responses() -> tuple[list[np.ndarray], np.ndarray]:
        out = [ids(int(rng.integers(response_range[0], response_range[1] + 1))) for _ in range(n_pairs)]
        ends_eos = rng.random(n_pairs) < 0.85
        for response, eos in zip(out, ends_eos):
            response[-1] = EOS_ID if eos else response[-1]
        return out, ends_eos

    teachers, teacher_eos = responses()
    students, student_eos = responses()
    return PairSet("bench", [ids(prompt_len) for _ in range(n_pairs)], teachers, students, [""] * n_pairs,
                   teacher_eos, student_eos, eos_id=EOS_ID)


def build_critic(size: str, device: torch.device, seed: int) -> torch.nn.Module:
    """The critic class of verl and this project, fp32 weights initialised directly on `device`."""
    torch.manual_seed(seed)
    config = Qwen2Config(num_labels=1, pad_token_id=PAD_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
                         classifier_dropout=0.0, use_cache=False, **SHAPES[size])
    with device:
        return AutoModelForTokenClassification.from_config(config, attn_implementation="sdpa").float().train()


def with_lora(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """LoRA rank 16 on every linear layer of the body, the value head trained whole, as `model.lora` does."""
    try:  # the tool's own path (critic/model.py): frozen weights stored in bf16 on CUDA
        from critic.config import LoraConfig
        from critic.model import apply_lora
    except ImportError:  # a tree without model.lora: peft directly, same adapters
        import peft

        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS,
                                 modules_to_save=["score"], task_type=peft.TaskType.TOKEN_CLS)
        return peft.get_peft_model(model, config)
    lora = LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS))
    return apply_lora(model, lora, frozen_dtype=torch.bfloat16 if device.type == "cuda" else None).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Contender:
    """One configuration's step function and its measurements."""
    name: str
    step_fn: object  # batch_index -> (seconds, forwarded tokens)
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    peak_mem_gib: float = 0.0
    status: str = "ok"


def our_step(model, params, optimizer, scheduler, pairs: PairSet, cfg: ExperimentConfig, device):
    """A step of this project's training loop (critic.train.optimizer_step) with `cfg.score`."""
    count = [0]

    def step(batch_index: np.ndarray) -> tuple[float, int]:
        sync(device)
        start = time.perf_counter()
        count[0] += 1
        try:
            _, tokens = optimizer_step(model, params, optimizer, scheduler, pairs, batch_index, cfg, device, PAD_ID,
                                       count[0])
        except Exception:
            optimizer.zero_grad(set_to_none=True)  # the shared model: no half-accumulated gradients for the next
            raise
        sync(device)
        return time.perf_counter() - start, tokens
    return step


def trl_step(model, pairs: PairSet, cfg: ExperimentConfig, device, lora: bool):
    """A step of trl.RewardTrainer (benchmarks/trl_contender.py), LoRA adapters as ours when `lora`."""
    trl = Trl(model, pairs, cfg, device)
    if lora:
        import peft

        trl.model = peft.get_peft_model(trl.model, peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, task_type=peft.TaskType.SEQ_CLS))

    def step(batch_index: np.ndarray) -> tuple[float, int]:
        tokens = sum(2 * len(pairs.prompt_ids[i]) + len(pairs.teacher_ids[i]) + len(pairs.student_ids[i])
                     for i in batch_index)  # chosen + rejected rows, padding excluded
        return trl.step(batch_index), int(tokens)
    return step


def failure_status(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom"
    if isinstance(exc, SpecError):
        return f"unsupported: {exc}"
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def run_one(contender: Contender, batch_index: np.ndarray, device: torch.device, record: bool) -> None:
    """One step; a failure retires the contender with its status instead of stopping the benchmark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds, tokens = contender.step_fn(batch_index)
    except Exception as exc:  # noqa: BLE001  (OOM, compile or kernel failure: recorded, the others go on)
        contender.status = failure_status(exc)
        print(f"  {contender.name}: {contender.status}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return
    if device.type == "cuda":
        contender.peak_mem_gib = max(contender.peak_mem_gib, torch.cuda.max_memory_allocated(device) / 2**30)
    if record:
        contender.seconds.append(seconds)
        contender.tokens.append(tokens)


def measure(contenders: list[Contender], batches: list[np.ndarray], args, device: torch.device) -> None:
    """Warm-up steps, then interleaved repetitions (rotated order) until max reps or the time cap."""
    for k in range(args.warmup):
        for contender in contenders:
            if contender.status == "ok":
                run_one(contender, batches[k], device, record=False)
    started = time.perf_counter()
    for rep in range(args.max_reps):
        live = [c for c in contenders if c.status == "ok"]
        if not live or (rep >= args.min_reps and time.perf_counter() - started > args.time_cap * len(live)):
            break
        for contender in live[rep % len(live):] + live[:rep % len(live)]:
            run_one(contender, batches[args.warmup + rep], device, record=True)
        print(f"  rep {rep + 1}: " + ", ".join(f"{c.name} {c.seconds[-1]:.3f}s" for c in live if c.status == "ok"
                                               and len(c.seconds) == rep + 1), flush=True)


def group_contenders(size: str, tuning: str, names: list[str], pairs: PairSet, cfg: ExperimentConfig,
                     device: torch.device, args) -> tuple[list[Contender], int, int]:
    """Build one (shape, tuning) group: our layouts share a model and an AdamW; TRL has its own model."""
    model = build_critic(size, device, args.seed)
    embedding = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters()) - embedding  # matmul weights: the 6ND count
    trl = None
    if "trl" in names:  # built first: TRL copies the body's weights before ours gets adapters
        trl = Contender("trl", None, status="null: trl not installed (pip install -r requirements-bench.txt)")
        if trl_available():
            transformers.logging.set_verbosity_error()
            trl = Contender("trl", trl_step(model, pairs, cfg, device, tuning == "lora"))
    if tuning == "lora":
        model = with_lora(model, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer, scheduler = build_optimizer(model, cfg, n_steps=10**6)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    contenders = []
    for name in names:
        if CONTENDERS[name] is None:
            contenders.append(trl)
            continue
        layout, attention = CONTENDERS[name]
        score = replace(cfg.score, layout=layout, attention=attention)
        contenders.append(Contender(name, our_step(model, trainable_params, optimizer, scheduler, pairs,
                                                   replace(cfg, score=score), device)))
    return contenders, params, trainable


def result_row(contender: Contender, size: str, tuning: str, params: int, trainable: int, peak: float,
               batch_size: int, context: dict) -> dict:
    """One configuration's JSON object: step-time median and spread, pairs/s, model TFLOP/s and % of peak."""
    row = {"size": size, "tuning": tuning, "contender": contender.name, "status": contender.status,
           "reps": len(contender.seconds), "params_nonembedding": params, "trainable_params": trainable,
           "pairs_per_step": batch_size}
    if contender.seconds and contender.status.startswith("ok"):
        seconds = np.array(contender.seconds)
        median, tokens = float(np.median(seconds)), float(np.mean(contender.tokens))
        flops = 6 * params * tokens / median
        row.update({"step_s_median": round(median, 4), "step_s_min": round(float(seconds.min()), 4),
                    "step_s_max": round(float(seconds.max()), 4),
                    "spread_pct": round(100 * float(seconds.max() - seconds.min()) / median, 1),
                    "pairs_per_s": round(batch_size / median, 2), "tokens_per_step": round(tokens),
                    "tokens_per_s": round(tokens / median), "model_tflops": round(flops / 1e12, 2),
                    "pct_of_peak": round(100 * flops / peak, 1)})
    else:
        row.update({k: None for k in ("step_s_median", "pairs_per_s", "model_tflops", "pct_of_peak")})
    row["peak_mem_gib"] = round(contender.peak_mem_gib, 2) if contender.peak_mem_gib else None
    return {**row, **context}


def table(rows: list[dict], peak: float, unit: str) -> str:
    head = (f"{'size':<6}{'tuning':<7}{'contender':<22}{'pairs/s':>9}{'step s':>9}{'spread':>8}{'reps':>6}"
            f"{'model TFLOP/s':>15}{'% peak':>8}{'mem GiB':>9}  status")
    lines = [f"matmul peak ({unit}): {peak / 1e12:.2f} TFLOP/s; model TFLOP/s = 6 x non-embedding params x "
             f"forwarded tokens / median step", head]
    for r in rows:
        fmt = lambda key, spec: "-" if r.get(key) is None else format(r[key], spec)  # noqa: E731
        lines.append(f"{r['size']:<6}{r['tuning']:<7}{r['contender']:<22}{fmt('pairs_per_s', '.2f'):>9}"
                     f"{fmt('step_s_median', '.3f'):>9}{fmt('spread_pct', '.0f'):>7}%{r['reps']:>6}"
                     f"{fmt('model_tflops', '.2f'):>15}{fmt('pct_of_peak', '.1f'):>8}{fmt('peak_mem_gib', '.1f'):>9}"
                     f"  {r['status'][:60]}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and lengths, 2 reps: an end-to-end check")
    parser.add_argument("--sizes", default="0.5b,1.5b", help="critic shapes, comma-separated (0.5b, 1.5b, tiny)")
    parser.add_argument("--tunings", default="full,lora", help="full and/or lora")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, from: "
                        + ", ".join(CONTENDERS))
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="pairs per forward")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", default="256,512", help="min,max response tokens (uniform)")
    parser.add_argument("--warmup", type=int, default=2, help="steps per contender before timing (compiles flex)")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--max-reps", type=int, default=6)
    parser.add_argument("--time-cap", type=float, default=8.0,
                        help="seconds of timed steps per configuration after which no new repetition starts")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds for the whole run: groups not started by then are recorded as skipped")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        args.sizes, args.batch_size, args.micro_batch_size, args.prompt_len = "tiny", 4, 2, 16
        args.response_len, args.warmup, args.min_reps, args.max_reps = "8,24", 1, 2, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    for name in ("recompile_limit", "cache_size_limit"):  # flex recompiles per head size and once per dynamic length
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    names = [n.strip() for n in args.contenders.split(",")]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    if args.batch_size % args.micro_batch_size:
        raise SystemExit("--batch-size must be a multiple of --micro-batch-size (TRL accumulates whole micro-batches)")
    low, high = (int(x) for x in args.response_len.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    context = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "transformers": transformers.__version__,
               "dtype": "bf16 autocast, fp32 weights" if device.type == "cuda" else "fp32",
               "prompt_len": args.prompt_len, "response_len": [low, high],
               "micro_batch_size": args.micro_batch_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    started, peak = time.perf_counter(), matmul_peak(device)
    context["matmul_peak_tflops"] = round(peak / 1e12, 3)
    print(json.dumps({"run": context}), flush=True)
    cfg = ExperimentConfig(score=ScoreConfig(reduction="mean", exclude_eos=True),
                           loss=LossConfig(adaptive_temperature=True),
                           train=TrainConfig(lr=1e-6, batch_size=args.batch_size,
                                             micro_batch_size=args.micro_batch_size))
    rows = []
    try:
        run_groups(args, names, cfg, device, (low, high), started, peak, context, rows, out / "bench_gpu.jsonl")
    except KeyboardInterrupt:  # gpu_run.sh's timeout sends SIGINT: the rows so far still get their table
        print("interrupted: the table below has the configurations finished so far", flush=True)
    report = table(rows, peak, "bf16" if device.type == "cuda" else "fp32")
    (out / "bench_gpu.txt").write_text(f"{json.dumps(context)}\n{report}\n")
    print(f"\n{report}\ntotal {time.perf_counter() - started:.0f} s; results in {out}/bench_gpu.jsonl, bench_gpu.txt")
    return 0


def run_groups(args, names: list[str], cfg: ExperimentConfig, device: torch.device, response_len: tuple[int, int],
               started: float, peak: float, context: dict, rows: list[dict], jsonl: Path) -> None:
    """Every (shape, tuning) group in turn; each configuration's row is printed and appended to `jsonl` at once."""
    n_batches, interrupted = args.warmup + args.max_reps, False
    for size in args.sizes.split(","):
        pairs = make_pairs(n_batches * args.batch_size, SHAPES[size]["vocab_size"], args.prompt_len, response_len,
                           args.seed)
        batches = [np.arange(k * args.batch_size, (k + 1) * args.batch_size) for k in range(n_batches)]
        for tuning in args.tunings.split(","):
            print(f"== {size} {tuning} ({time.perf_counter() - started:.0f} s in)", flush=True)
            if time.perf_counter() - started > args.budget:
                contenders = [Contender(n, None, status="skipped: --budget spent") for n in names]
                params = trainable = 0
            else:
                contenders, params, trainable = [], 0, 0
                try:
                    contenders, params, trainable = group_contenders(size, tuning, names, pairs, cfg, device, args)
                    measure(contenders, batches, args, device)
                except KeyboardInterrupt:  # keep this group's repetitions so far, then stop
                    for contender in (c for c in contenders if c.status == "ok"):
                        contender.status = "ok (interrupted)" if contender.seconds else "interrupted"
                    interrupted = True
                except Exception as exc:  # noqa: BLE001  (the group's model did not fit: recorded, next group)
                    contenders = [Contender(n, None, status=failure_status(exc)) for n in names]
                    params = trainable = 0
            for contender in contenders:
                row = result_row(contender, size, tuning, params, trainable, peak, args.batch_size, context)
                rows.append(row)
                print(json.dumps(row), flush=True)
                with jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            if interrupted:
                raise KeyboardInterrupt
            del contenders  # the group's models and optimizer states, before the next group allocates its own
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
