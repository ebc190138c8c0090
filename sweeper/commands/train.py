"""`sweep.py train`: one config, trained and evaluated, with a final table or JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys

from sweeper.commands.common import add_spec_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train and evaluate one config; prints the final held-out metrics")
    add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with every final metric instead")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    return train_once(args.spec, args.overrides, as_json=args.json)


def format_table(metrics: dict[str, float], sets: list[str]) -> str:
    """Rows = metrics, columns = held-out sets."""
    names = ["d_acc", "d_acc_ties_correct", "tie_rate", "auc", "pair_logloss", "score_diff", "teacher_score_mean",
             "student_score_mean", "length_ratio", "length_baseline_acc", "score_length_spearman", "n_pairs"]
    lines = [f"{'metric':<24}" + "".join(f"{s:>12}" for s in sets)]
    for name in names:
        cells = []
        for s in sets:
            value = metrics.get(f"{s}/{name}", math.nan)
            cells.append(f"{value:>12.0f}" if name == "n_pairs" else f"{value:>12.4f}")
        lines.append(f"{name:<24}" + "".join(cells))
    return "\n".join(lines)


def train_once(spec: str, overrides: list[str], as_json: bool = False) -> int:
    """Train and evaluate the config once; print the table (or one JSON object) and the checkpoint's path."""
    from critic.checkpoint import save_trial_checkpoint
    from critic.config import load_config
    from critic.data import generate_students
    from critic.trial import run_trial

    cfg = load_config(spec, overrides)
    generate_students(cfg, progress=not as_json)  # the frozen student's responses, where the data lacks them
    result = run_trial(cfg, progress=not as_json)
    checkpoint = save_trial_checkpoint(result, cfg, result.train_history) if cfg.train.save_checkpoint else None
    if as_json:
        if checkpoint:  # stdout stays one JSON object
            print(f"checkpoint: {checkpoint}", file=sys.stderr)
        print(json.dumps({k: result.metrics[k] for k in sorted(result.metrics)}))
        return 0
    sets = ["val", *cfg.data.eval_sets]
    print(format_table(result.metrics, sets))
    progressive = result.metrics["train/progressive_d_acc"]
    print(f"\nprogressive train d_acc (first epoch, before each update): {progressive:.4f}"
          f"   steps: {result.metrics['train/steps']:.0f}   time: {result.timings['total_s']:.1f}s")
    if checkpoint:
        print(f"checkpoint: {checkpoint}")
    return 0
