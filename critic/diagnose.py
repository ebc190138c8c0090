"""`diagnose`: why does a critic's d_acc differ between training and another dataset? Measure each cause.

The story: load the checkpoint -> load the training split, the val split and every named file exactly as
training did -> score each with the engine (critic.evaluate.score_set / metrics_from_scores) -> measure
lengths, ties, token distributions and score levels -> optionally train K fold critics -> judge each
proposed cause (critic.diagnose_verdicts) -> write a Markdown report with figures (critic.diagnose_report).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from critic.checkpoint import Histories, load_checkpoint
from critic.config import ExperimentConfig, SpecError, apply_overrides, build_config, to_dict
from critic.data import PairSet, load_pair_set, load_trial_data, resolve_path
from critic.diagnose_stats import (fold_summary, identical_responses, length_buckets, progressive_d_acc,
                                   score_levels, text_stats, token_divergence)
from critic.diagnose_verdicts import LINEAGE_COLUMN, HealthCheck, Verdict, gap_bridge, judge, training_health
from critic.evaluate import metrics_from_scores, score_set
from critic.model import select_device, tokenizer_digest
from critic.trial import run_trial

RESERVED_NAMES = ("train", "val", "fold", "critic", "perf", "sweep")
SUBSAMPLE_SEED = 0


@dataclass
class SetResult:
    """One dataset as the critic sees it: per-pair scores and every measured number."""
    name: str
    role: str  # train (post-hoc, on the training split) | val | fold | other
    source: str  # the path it was read from
    pairs: PairSet
    scores: pd.DataFrame  # critic.evaluate.score_set's table
    metrics: dict[str, float]  # pair_metrics + length buckets + text stats + score levels + divergence


@dataclass
class Diagnosis:
    checkpoint: Path
    cfg: ExperimentConfig
    histories: Histories
    sets: dict[str, SetResult]  # "train", "val", then the other sets in order
    others: list[str]  # names of the sets that are not the training file
    progressive: float
    progressive_source: str
    verdicts: list[Verdict]
    health: list[HealthCheck]
    bridge: list[tuple[str, dict[str, float]]]
    folds: pd.DataFrame | None = None  # one row per fold critic
    notes: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """Rows = metrics, columns = datasets."""
        return pd.DataFrame({name: result.metrics for name, result in self.sets.items()})


def parse_data_args(items: list[str]) -> dict[str, str]:
    """['shifted=data/test.parquet', ...] -> {'shifted': 'data/test.parquet'}."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise SpecError(f"--data expects NAME=PATH (e.g. test=data/test.parquet), got {item!r}")
        if name in RESERVED_NAMES:
            raise SpecError(f"--data name {name!r} is reserved ({', '.join(RESERVED_NAMES)}); choose another name")
        if name in out:
            raise SpecError(f"--data name {name!r} is given twice; give each file its own name")
        out[name] = path.strip()
    return out


def _named_sets(cfg: ExperimentConfig, extra: dict[str, str]) -> dict[str, str]:
    clash = sorted(set(extra) & set(cfg.data.eval_sets))
    if clash:
        raise SpecError(f"--data name(s) {clash} are already data.eval_sets of the checkpoint's spec "
                        f"({cfg.data.eval_sets}); they are diagnosed anyway, so pick other names")
    return {**cfg.data.eval_sets, **extra}


def _cap(pairs: PairSet, max_pairs: int | None) -> PairSet:
    """At most max_pairs pairs, drawn without replacement with a fixed seed (order kept)."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    index = np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(len(pairs), max_pairs, replace=False))
    return pairs.subset(index, pairs.name)


def student_lineage(path_spec: str, cfg: ExperimentConfig) -> set[str] | None:
    """The distinct values of the optional LINEAGE_COLUMN of a data file, or None without it."""
    import pyarrow.parquet as pq

    path = resolve_path(path_spec, cfg.data.cache_dir)
    if LINEAGE_COLUMN not in pq.read_schema(path).names:
        return None
    column = pd.read_parquet(path, columns=[LINEAGE_COLUMN])[LINEAGE_COLUMN]
    return {str(v) for v in column.dropna().unique()}


def measure_set(result: SetResult, reference: PairSet, vocab_size: int) -> None:
    """Fill result.metrics from its scores and token ids."""
    metrics = metrics_from_scores(result.scores)
    metrics.update(length_buckets(result.scores, identical_responses(result.pairs)))
    metrics.update(text_stats(result.pairs))
    metrics.update(score_levels(metrics))
    metrics.update(token_divergence(result.pairs, reference, vocab_size))
    result.metrics = metrics


def fold_config(cfg: ExperimentConfig, fold: int, n_folds: int, named: dict[str, str]) -> ExperimentConfig:
    """The checkpoint's spec, trained on all folds but `fold` and evaluated once at the end on every set."""
    overrides = {"data.fold": fold, "data.n_folds": n_folds, "data.eval_sets": named,
                 "train.save_checkpoint": False, "eval.every_steps": 10**9, "eval.before_train": False}
    return build_config(apply_overrides(to_dict(cfg), overrides), source=f"fold {fold} of {n_folds}")


def run_fold_critics(cfg: ExperimentConfig, named: dict[str, str], n_folds: int,
                     progress: bool = False) -> pd.DataFrame:
    """Train one critic per fold with the checkpoint's spec (critic.trial.run_trial); one row per fold."""
    rows = []
    for fold in range(n_folds):
        print(f"[diagnose] fold critic {fold + 1}/{n_folds}", file=sys.stderr, flush=True)  # stdout: the report
        metrics = run_trial(fold_config(cfg, fold, n_folds, named), progress=progress).metrics
        row = {"fold": fold, "train_pairs": metrics["data/train_pairs"],
               "progressive_d_acc": metrics["train/progressive_d_acc"]}
        row.update({f"{name}/d_acc": metrics[f"{name}/d_acc"] for name in ["fold", "val", *named]})
        rows.append(row)
    return pd.DataFrame(rows)


def _load_sets(cfg: ExperimentConfig, tokenizer, named: dict[str, str], extra: dict[str, str]
               ) -> tuple[dict[str, tuple[str, str, PairSet]], dict[str, str]]:
    """name -> (role, source, pairs) for train, val, [fold] and every named set; plus file digests."""
    tokenizer_id = tokenizer_digest(tokenizer)
    data = load_trial_data(cfg.data, tokenizer, tokenizer_id)
    sets = {"train": ("train", cfg.data.train_path, data.train)}
    for name, pairs in data.eval_sets.items():
        role = name if name in ("val", "fold") else "other"
        sets[name] = (role, named.get(name, cfg.data.train_path), pairs)
    for name, path in extra.items():
        sets[name] = ("other", path, load_pair_set(path, cfg.data, tokenizer, tokenizer_id, name))
    return sets, data.digests


def diagnose(checkpoint: str | Path, extra_data: dict[str, str] | None = None, folds: int = 0,
             max_pairs: int | None = 2000, progress: bool = False) -> Diagnosis:
    """Measure every proposed cause of a d_acc gap for one checkpoint; see the module docstring."""
    if folds == 1 or folds < 0:
        raise SpecError(f"--folds must be 0 (no fold critics) or >= 2, got {folds}")
    if max_pairs is not None and max_pairs < 10:
        raise SpecError(f"--max-pairs must be >= 10 (or omitted), got {max_pairs}")
    model, tokenizer, cfg, histories = load_checkpoint(checkpoint)
    if cfg.model.torch_threads > 0:
        torch.set_num_threads(cfg.model.torch_threads)
    device = select_device(cfg.model.device)
    model = model.to(device)
    extra = dict(extra_data or {})
    named = _named_sets(cfg, extra)
    loaded, digests = _load_sets(cfg, tokenizer, named, extra)
    notes = []
    saved_digest = histories.data_digests.get("train")
    if saved_digest and saved_digest != digests["train"]:
        notes.append(f"the training file {cfg.data.train_path} changed since the checkpoint was trained "
                     f"(digest {saved_digest} then, {digests['train']} now): post-hoc train/val numbers may differ")
    steps_per_epoch = math.ceil(len(loaded["train"][2]) / cfg.train.batch_size)
    progressive, source = progressive_d_acc(histories.final_metrics, histories.train, steps_per_epoch)

    results: dict[str, SetResult] = {}
    for name, (role, path, pairs) in loaded.items():
        capped = _cap(pairs, max_pairs)
        if len(capped) < len(pairs):
            notes.append(f"{name}: scored {len(capped)} of {len(pairs)} pairs (a seeded sample; --max-pairs)")
        scores = score_set(model, capped, cfg.score, cfg.eval.batch_size, device, tokenizer.pad_token_id)
        results[name] = SetResult(name, role, path, capped, scores, {})
    vocab_size = 1 + max(int(max((ids.max(initial=0) for ids in seqs), default=0)) for r in results.values()
                         for seqs in (r.pairs.prompt_ids, r.pairs.teacher_ids, r.pairs.student_ids))
    for result in results.values():
        measure_set(result, results["train"].pairs, vocab_size)
    del model

    fold_table = run_fold_critics(cfg, named, folds, progress) if folds else None
    fold_std = float(fold_table["val/d_acc"].std(ddof=1)) if fold_table is not None else 0.0
    others = [name for name, r in results.items() if r.role == "other"]
    metrics = {name: r.metrics for name, r in results.items()}
    lineage = {"train": student_lineage(cfg.data.train_path, cfg)}
    lineage.update({name: student_lineage(results[name].source, cfg) for name in others})
    verdicts = judge(metrics, others, progressive, fold_std, lineage)
    return Diagnosis(Path(checkpoint), cfg, histories, results, others, progressive, source, verdicts,
                     training_health(histories.train), gap_bridge(metrics, others, progressive), fold_table, notes)


def fold_spread(diagnosis: Diagnosis) -> pd.DataFrame | None:
    """mean / std / min / max of each fold-critic column, or None without folds."""
    return None if diagnosis.folds is None else fold_summary(diagnosis.folds)
