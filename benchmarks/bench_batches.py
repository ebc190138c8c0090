"""Batches as verl forms them (the default) vs train.length_grouping: speed and effect on the metrics.

The spec's baseline config (experiments/demo.yaml: the users' setting) trained with both batch orders, in both
score layouts (packed, the default: no padding at all; padded: a row per sequence, right-padded to the longest
row of each forward), seed index 0..R-1 (train.seed and model.init_seed + index, as the confirmation stage
does). Interleaved: every repetition runs all four variants back to back, in an order rotated per repetition,
so a machine that slows down during the run slows every variant. Per run: training pairs/s, the tokens the
forwards compute (padding included) over the real tokens, held-out d_acc, the share of steps whose batch
d_acc is exactly 1.0 or below 0.6, the mean step-to-step change of critic/d_acc and of critic/avg_d_acc.
Summary: per layout, the speed ratio grouped / verl (median and range over repetitions) and the d_acc
differences grouped - verl per seed.

  OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_batches [--spec experiments/demo.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from critic.config import apply_overrides, build_config
from critic.reporting import RecordingReporter, series
from critic.train import step_batches
from critic.trial import prepare, run_trial
from sweeper.confirm import seed_overrides
from sweeper.study import load_sweep_spec

VARIANTS = [(layout, grouping) for layout in ("packed", "padded") for grouping in (False, True)]


def computed_tokens(cfg, pairs) -> float:
    """Tokens the training forwards compute (padding included) over the real tokens, for cfg's batches."""
    prompt, teacher, student = (np.array([len(x) for x in getattr(pairs, f"{part}_ids")])
                                for part in ("prompt", "teacher", "student"))
    computed, real = 0, 0
    for index, _ in step_batches(pairs, cfg, np.random.default_rng(cfg.train.seed)):
        for start in range(0, len(index), cfg.train.micro_batch_size):
            group = index[start:start + cfg.train.micro_batch_size]
            real += int((2 * prompt[group] + teacher[group] + student[group]).sum())
            if cfg.score.layout == "packed":  # one row of every pair's tokens, nothing padded
                computed += int((prompt[group] + teacher[group] + student[group]).sum())
            else:  # 2 rows per pair, each padded to the longest row of the forward
                computed += 2 * len(group) * int((prompt[group] + np.maximum(teacher[group], student[group])).max())
    return computed / real


def one_run(raw: dict, layout: str, grouping: bool, seed_index: int) -> dict:
    seeds = seed_overrides(build_config(raw), seed_index)
    cfg = build_config(apply_overrides(raw, {"score.layout": layout, "train.length_grouping": grouping, **seeds}))
    reporter = RecordingReporter()
    result = run_trial(cfg, reporter)
    _, batch_d_acc = series(reporter.train, "critic/d_acc")
    _, trailing = series(reporter.train, "critic/avg_d_acc")
    steps = int(result.metrics["train/steps"])
    return {"layout": layout, "length_grouping": grouping, "seed_index": seed_index, "steps": steps,
            "train_s": round(result.timings["train_s"], 2),
            "pairs_per_s": round(steps * cfg.train.batch_size / result.timings["train_s"], 1),
            "computed_over_real_tokens": round(computed_tokens(cfg, prepare(cfg)[2].train), 3),
            "val_d_acc": result.metrics["val/d_acc"], "shifted_d_acc": result.metrics.get("shifted/d_acc"),
            "steps_d_acc_1": float(np.mean(batch_d_acc == 1.0)),
            "steps_d_acc_below_0.6": float(np.mean(batch_d_acc < 0.6)),
            "mean_step_change": float(np.mean(np.abs(np.diff(batch_d_acc)))),
            "mean_step_change_avg": float(np.mean(np.abs(np.diff(trailing))))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="experiments/demo.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = load_sweep_spec(args.spec)
    raw = apply_overrides(spec.raw, spec.cfg.sweep.baseline)
    runs = {}
    for repeat in range(args.repeats):
        shift = repeat % len(VARIANTS)
        for layout, grouping in VARIANTS[shift:] + VARIANTS[:shift]:
            runs[(layout, grouping, repeat)] = one_run(raw, layout, grouping, repeat)
            print(json.dumps(runs[(layout, grouping, repeat)]), flush=True)
    keys = ("pairs_per_s", "computed_over_real_tokens", "val_d_acc", "shifted_d_acc", "steps_d_acc_1",
            "steps_d_acc_below_0.6", "mean_step_change", "mean_step_change_avg")
    print(f"\n{'layout, batches':<24}" + "".join(f"{k:>26}" for k in keys))
    for layout, grouping in VARIANTS:
        chosen = [runs[(layout, grouping, r)] for r in range(args.repeats)]
        label = f"{layout}, {'length-grouped' if grouping else 'verl'}"
        print(f"{label:<24}" + "".join(f"{statistics.mean(r[k] for r in chosen):>18.4f} "
                                       f"±{statistics.pstdev(r[k] for r in chosen):<6.4f}" for k in keys))
    for layout in ("packed", "padded"):
        ratios = [runs[(layout, True, r)]["pairs_per_s"] / runs[(layout, False, r)]["pairs_per_s"]
                  for r in range(args.repeats)]
        diffs = [runs[(layout, True, r)]["val_d_acc"] - runs[(layout, False, r)]["val_d_acc"]
                 for r in range(args.repeats)]
        print(json.dumps({"layout": layout, "speed_ratio_grouped_over_verl": [round(x, 3) for x in ratios],
                          "median": round(statistics.median(ratios), 3),
                          "val_d_acc_grouped_minus_verl": [round(x, 4) for x in diffs]}))


if __name__ == "__main__":
    main()
