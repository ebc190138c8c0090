"""`diagnose`: each proposed cause of a d_acc gap is measured and judged; checkpoints round-trip; the CLI runs.

Three purpose-built critics (tiny preset, CPU, one thread) carry the end-to-end checks:
the demo (shift + ties, no overfitting), a memorised tiny split (overfitting) and random text whose
teacher is always longer (length shortcut).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from critic.checkpoint import load_checkpoint, save_checkpoint, save_trial_checkpoint
from critic.config import SpecError, apply_overrides, build_config
from critic.data import load_trial_data, split_by_prompt, split_fold
from critic.demo import make_demo_frame
from critic.evaluate import score_set
from critic.model import tokenizer_digest
from critic.reporting import RecordingReporter
from critic.trial import run_trial
from diagnose.diagnosis import diagnose, parse_data_args
from diagnose.stats import d_acc_se, length_buckets, progressive_d_acc
from diagnose.verdicts import DOES_NOT_HOLD, HOLDS, NOT_MEASURABLE, WARN, judge, training_health
from sweeper.commands.diagnose import add_parser as add_diagnose_command
from sweeper.commands.diagnose import resolve_checkpoint
from tests.helpers import tiny_tolerance
from tests.sweep_helpers import mlflow_uri

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["content", "teacher_response", "student_response"]
WORDS = ["apples", "books", "coins", "tickets", "boxes", "pencils", "stamps", "marbles", "Ana", "Ben", "Chen", "Dara",
         "has", "buys", "packs", "of", "the", "answer", "is", "Step", "add", "more", "less", "sure", "maybe", "could",
         "think", "now", "how", "many", "and", "it"]


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def random_pairs(path: Path, n: int, seed: str, teacher_words, student_words=None,
                 student_model: str | None = None) -> Path:
    """Random-word pairs: `*_words(rng)` draws each side's word count (the student's = the teacher's when None).

    `student_model` adds the optional lineage column that names the model behind student_response.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        teacher_n = teacher_words(rng)
        student_n = teacher_n if student_words is None else student_words(rng)
        rows.append((f"Question {i}: {random_text(rng, 6)}?", random_text(rng, teacher_n), random_text(rng, student_n)))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if student_model:
        frame["student_model"] = student_model
    frame.to_parquet(path, index=False)
    return path


def spec(train_path: str, cache_dir: Path, overrides: dict | None = None) -> dict:
    raw = {"data": {"train_path": train_path, "cache_dir": str(cache_dir), "max_prompt_length": 64,
                    "max_response_length": 64},
           "model": {"preset": "tiny", "device": "cpu", "torch_threads": 1},
           "train": {"lr": 1e-3, "batch_size": 16, "micro_batch_size": 16},
           "eval": {"every_steps": 10**6, "batch_size": 64}}
    return apply_overrides(raw, overrides or {})


def train_checkpoint(raw: dict, directory: Path) -> Path:
    cfg = build_config(raw, source="test spec")
    recorder = RecordingReporter()
    result = run_trial(cfg, recorder, keep_model=True)
    return save_trial_checkpoint(result, cfg, recorder.train, directory)


def by_cause(verdicts) -> dict[str, object]:
    """{'different data': Verdict, 'tie rule': ..., 'overfitting': ..., ...}"""
    return {v.cause.split(" (")[0]: v for v in verdicts}


def demo_spec(cache_dir: Path, seed: int = 0) -> dict:
    """The users' situation in small: 20 steps on demo:train, evaluated on demo:shifted."""
    return spec("demo:train", cache_dir, {
        "data.eval_sets": {"shifted": "demo:shifted"}, "data.val_fraction": 0.15, "loss.adaptive_temperature": True,
        "model.init_seed": seed, "train.seed": seed, "train.warmup_steps": 5, "train.batch_size": 32,
        "train.micro_batch_size": 32, "train.max_steps": 20})


def overfit_spec(folder: Path, cache_dir: Path, seed: int = 0) -> dict:
    """~60 random-text pairs learned for 25 epochs: memorised (train ~1.0); val and a fresh file stay ~0.5."""
    words = lambda rng: rng.randint(6, 10)  # noqa: E731  teacher and student equally long: no length signal
    train_file = random_pairs(folder / "train.parquet", 120, f"overfit-{seed}", words)
    test_file = random_pairs(folder / "test.parquet", 100, f"overfit-test-{seed}", words)
    return spec(str(train_file), cache_dir, {
        "data.val_fraction": 0.5, "data.eval_sets": {"test": str(test_file)}, "model.init_seed": seed,
        "train.seed": seed, "train.epochs": 25, "train.batch_size": 8, "train.micro_batch_size": 8})


def shortcut_spec(folder: Path, cache_dir: Path, seed: int = 0) -> tuple[dict, Path]:
    """Teacher always longer, otherwise random words; plus a file where the teacher is always shorter."""
    longer, shorter = (lambda rng: rng.randint(12, 18)), (lambda rng: rng.randint(3, 7))
    train_file = random_pairs(folder / "train.parquet", 300, f"shortcut-{seed}", longer, shorter, "student-a")
    reversed_file = random_pairs(folder / "reversed.parquet", 100, f"reversed-{seed}", shorter, longer, "student-b")
    raw = spec(str(train_file), cache_dir, {"data.val_fraction": 0.25, "model.init_seed": seed, "train.seed": seed,
                                            "train.max_steps": 14})
    return raw, reversed_file


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("diagnose") / "cache"


@pytest.fixture(scope="module")
def demo_checkpoint(cache_dir) -> Path:
    return train_checkpoint(demo_spec(cache_dir), cache_dir.parent / "demo_checkpoint")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_diagnose_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diagnose", *argv])
    return args.func(args)


# --- the three purpose-built cases -------------------------------------------------------------------

def test_demo_gap_is_shift_and_ties_not_overfitting(demo_checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_cli(["--checkpoint", str(demo_checkpoint), "--out", str(out), "--max-pairs", "400"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("# Critic diagnosis")
    assert "| different data (distribution shift) | **holds** |" in markdown
    assert "| overfitting | **does not hold** |" in markdown
    assert (out / "report.md").read_text() == markdown.rstrip("\n") + "\n"
    for figure in ("d_acc", "scores", "lengths", "score_vs_length", "training"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
    saved = json.loads((out / "diagnosis.json").read_text())
    verdicts = {v["cause"].split(" (")[0]: v for v in saved["verdicts"]}
    assert verdicts["different data"]["status"] == HOLDS and verdicts["different data"]["value"] > 0.2
    assert verdicts["tie rule"]["status"] == HOLDS  # ~8% identical responses in demo:shifted
    assert verdicts["overfitting"]["status"] == DOES_NOT_HOLD
    assert verdicts["different student"]["status"] == NOT_MEASURABLE
    sets = saved["sets"]
    assert sets["shifted"]["d_acc_ties_correct"] - sets["shifted"]["d_acc"] == pytest.approx(
        sets["shifted"]["tie_rate"])
    assert sets["shifted"]["js_teacher"] > 5 * sets["val"]["js_teacher"]  # val is the same-distribution reference


def test_overfitting_case_is_attributed_to_overfitting(cache_dir, tmp_path, capsys):
    from sweeper.commands.train import train_once

    spec_file = tmp_path / "overfit.yaml"
    spec_file.write_text(yaml.safe_dump(overfit_spec(tmp_path, cache_dir)))
    assert train_once(str(spec_file), ["train.save_checkpoint=true"]) == 0  # `sweep.py train` with a checkpoint
    checkpoint = Path(re.search(r"^checkpoint: (.+)$", capsys.readouterr().out, re.MULTILINE).group(1))
    assert checkpoint.parent == cache_dir.parent / "checkpoints"  # <data.cache_dir>/../checkpoints/<timestamp>/

    diagnosis = diagnose(checkpoint, folds=2, max_pairs=200)
    verdicts = by_cause(diagnosis.verdicts)
    assert verdicts["overfitting"].status == HOLDS and verdicts["overfitting"].value > 0.25
    assert verdicts["overfitting"].value > verdicts["different data"].value
    assert verdicts["tie rule"].status == DOES_NOT_HOLD
    assert verdicts["length shortcut"].status == DOES_NOT_HOLD
    assert list(diagnosis.folds["fold"]) == [0, 1]
    assert {"fold/d_acc", "val/d_acc", "test/d_acc"} <= set(diagnosis.folds.columns)
    assert (diagnosis.folds["train_pairs"] < diagnosis.sets["train"].metrics["n_pairs"]).all()


def test_length_shortcut_is_flagged(cache_dir, tmp_path):
    """The critic learns length, and fails on the file where length points the other way."""
    raw, reversed_file = shortcut_spec(tmp_path, cache_dir)
    checkpoint = train_checkpoint(raw, tmp_path / "checkpoint")

    diagnosis = diagnose(checkpoint, {"reversed": str(reversed_file)}, max_pairs=200)
    verdicts = by_cause(diagnosis.verdicts)
    assert verdicts["length shortcut"].status == HOLDS
    val = diagnosis.sets["val"].metrics
    assert val["length_baseline_acc"] == 1.0 and abs(val["score_length_spearman"]) > 0.5
    assert diagnosis.sets["reversed"].metrics["d_acc"] < 0.2  # where longer means student, it is wrong
    assert verdicts["different student"].status == HOLDS  # the files' student_model columns differ


# --- checkpoint ---------------------------------------------------------------------------------------

def test_checkpoint_round_trip(demo_checkpoint, cache_dir):
    model, tokenizer, cfg, histories = load_checkpoint(demo_checkpoint)
    assert cfg.data.eval_sets == {"shifted": "demo:shifted"} and cfg.train.max_steps == 20
    assert [step for step, _ in histories.train] == list(range(1, 21))
    assert "critic/d_acc" in histories.train[0][1] and "val/d_acc" in histories.eval[-1][1]
    assert math.isfinite(histories.final_metrics["train/progressive_d_acc"])
    # The loaded critic gives the scores its own evaluation logged at the end of training.
    data = load_trial_data(cfg.data, tokenizer, tokenizer_digest(tokenizer))
    scores = score_set(model, data.eval_sets["val"], cfg.score, cfg.eval.batch_size, model.device,
                       tokenizer.pad_token_id)
    final = histories.eval[-1][1]
    assert (scores["teacher_score"] > scores["student_score"]).mean() == pytest.approx(final["val/d_acc"])
    row = cfg.data.max_prompt_length + 2 * cfg.data.max_response_length  # the same sums, maybe in other batches
    assert scores["teacher_score"].mean() == pytest.approx(final["val/teacher_score_mean"],
                                                           abs=tiny_tolerance(scores["teacher_score"], row))


def test_save_checkpoint_refuses_a_non_empty_directory(demo_checkpoint, tmp_path):
    model, tokenizer, cfg, _ = load_checkpoint(demo_checkpoint)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        save_checkpoint(tmp_path / "taken", model, tokenizer, cfg, [], [])
    saved = save_checkpoint(tmp_path / "new", model, tokenizer, cfg, [(1, {"critic/d_acc": float("nan")})], [])
    assert math.isnan(load_checkpoint(saved)[3].train[0][1]["critic/d_acc"])  # NaN survives as JSON null
    history = json.loads((saved / "history.json").read_text())
    (saved / "history.json").write_text(json.dumps({**history, "tokenizer_digest": "0123456789abcdef"}))
    with pytest.raises(SpecError, match="tokenizes differently"):
        load_checkpoint(saved)


def test_load_checkpoint_names_what_is_missing(tmp_path):
    with pytest.raises(SpecError, match="has no config.json"):
        load_checkpoint(tmp_path)


# --- folds --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, match", [
    ({"n_folds": 1}, "n_folds must be >= 2"),
    ({"fold": 3, "n_folds": 3}, r"data.fold must be null or in 0..2"),
    ({"fold": -1}, r"data.fold must be null or in 0..4"),
    ({"fold": 0, "eval_sets": {"fold": "x.parquet"}}, "data.eval_sets name 'fold' is reserved"),
])
def test_fold_fields_are_validated(data, match):
    with pytest.raises(SpecError, match=match):
        build_config({"data": data}, source="spec.yaml")


def test_folds_partition_the_training_split_by_prompt(cache_dir, tmp_path):
    prompts = [f"prompt {i}" for i in range(300)]
    train_idx, _, _ = split_by_prompt(prompts, 0.2, seed=0)
    parts = [split_fold(prompts, train_idx, fold, 3, seed=0) for fold in range(3)]
    held_out = np.concatenate([held for _, held in parts])
    assert sorted(held_out) == sorted(train_idx)  # every training pair is held out exactly once
    assert all(len(held) > 60 for _, held in parts)
    assert all(set(kept).isdisjoint(held) for kept, held in parts)

    from critic.model import build_tiny_tokenizer
    frame = make_demo_frame("train").head(80)
    frame.to_parquet(tmp_path / "pairs.parquet", index=False)
    tokenizer = build_tiny_tokenizer(cache_dir)
    cfg = build_config({"data": {"train_path": str(tmp_path / "pairs.parquet"), "cache_dir": str(cache_dir),
                                 "fold": 1, "n_folds": 2}})
    data = load_trial_data(cfg.data, tokenizer, tokenizer_digest(tokenizer))
    assert list(data.eval_sets) == ["val", "fold"]
    assert set(data.train.prompt_text).isdisjoint(data.eval_sets["fold"].prompt_text)
    assert data.stats["data/fold_pairs"] == len(data.eval_sets["fold"])


# --- measurements and verdicts on hand-made numbers --------------------------------------------------

def test_length_buckets_split_by_relative_length():
    scores = pd.DataFrame({"teacher_score": [1.0, 1.0, 0.0, 1.0, 0.0], "student_score": [0.0, 0.0, 1.0, 0.0, 0.0],
                           "teacher_length": [20, 20, 10, 10, 10], "student_length": [10, 10, 20, 10, 10]})
    identical = np.array([False, False, False, False, True])
    buckets = length_buckets(scores, identical)
    assert buckets["teacher_longer_pairs"] == 2 and buckets["teacher_longer_d_acc"] == 1.0
    assert buckets["teacher_shorter_pairs"] == 1 and buckets["teacher_shorter_d_acc"] == 0.0
    assert buckets["length_matched_pairs"] == 1 and buckets["length_matched_d_acc"] == 1.0  # identical pair left out


def metrics(**values) -> dict[str, float]:
    """A set's metrics: a competent critic on 1000 pairs, with `values` changed."""
    base = dict(d_acc=0.85, d_acc_ties_correct=0.85, tie_rate=0.0, identical_rate=0.0, n_pairs=1000.0, auc=0.85,
                score_length_spearman=0.1, length_baseline_acc=0.5, teacher_longer_d_acc=0.85,
                teacher_shorter_d_acc=0.85, teacher_longer_pairs=300.0, teacher_shorter_pairs=300.0,
                length_matched_d_acc=0.85, length_matched_pairs=400.0, score_level=0.0, score_pooled_std=1.0,
                js_teacher=0.02)
    base.update(values)
    base.setdefault("d_acc_se", math.sqrt(base["d_acc"] * (1 - base["d_acc"]) / base["n_pairs"]))  # 1 pair/prompt
    return base


def test_d_acc_se_counts_the_pairs_of_a_prompt_together():
    """Four student responses per prompt that repeat one outcome carry one prompt's information, not four."""
    rng = np.random.default_rng(0)
    one = pd.DataFrame({"pair_id": np.arange(50), "prompt_id": np.arange(50), "teacher_score": rng.normal(size=50),
                        "student_score": rng.normal(size=50), "teacher_length": 10, "student_length": 10})
    four = one.loc[one.index.repeat(4)].reset_index(drop=True).assign(pair_id=np.arange(200))
    assert d_acc_se(four) == pytest.approx(d_acc_se(one), rel=1e-12)
    assert d_acc_se(four.drop(columns="prompt_id")) == pytest.approx(d_acc_se(one) / 2, rel=0.01)


def test_without_other_sets_shift_and_calibration_are_not_measurable():
    verdicts = by_cause(judge({"train": metrics(), "val": metrics()}, [], 0.8, 0.0, {"train": None}))
    assert verdicts["different data"].status == NOT_MEASURABLE
    assert verdicts["calibration drift"].status == NOT_MEASURABLE
    assert verdicts["overfitting"].status == DOES_NOT_HOLD


@pytest.mark.parametrize("other, fold_std, cause, status", [
    (metrics(d_acc=0.82), 0.0, "different data", DOES_NOT_HOLD),  # 3 points: under MIN_GAP
    (metrics(d_acc=0.70), 0.0, "different data", HOLDS),
    (metrics(d_acc=0.70), 0.2, "different data", DOES_NOT_HOLD),  # the fold critics disagree more than that
    (metrics(tie_rate=0.01, d_acc_ties_correct=0.86), 0.0, "tie rule", DOES_NOT_HOLD),
    (metrics(tie_rate=0.08, d_acc_ties_correct=0.93), 0.0, "tie rule", HOLDS),
    (metrics(score_level=-0.3), 0.0, "calibration drift", DOES_NOT_HOLD),
    (metrics(score_level=-2.0), 0.0, "calibration drift", HOLDS),
])
def test_verdict_thresholds(other, fold_std, cause, status):
    sets = {"train": metrics(), "val": metrics(), "test": other}
    assert by_cause(judge(sets, ["test"], 0.8, fold_std, {"train": None}))[cause].status == status


@pytest.mark.parametrize("val, status", [
    (metrics(), DOES_NOT_HOLD),
    (metrics(d_acc=0.9, length_baseline_acc=0.9, score_length_spearman=0.7), HOLDS),  # adds nothing to length
    (metrics(length_baseline_acc=0.9, score_length_spearman=0.1), DOES_NOT_HOLD),  # scores ignore length
    (metrics(score_length_spearman=0.6, teacher_longer_d_acc=0.95, teacher_shorter_d_acc=0.4), HOLDS),
    (metrics(score_length_spearman=0.6, teacher_longer_d_acc=0.95, teacher_shorter_d_acc=0.4,
             teacher_shorter_pairs=5.0), DOES_NOT_HOLD),  # too few pairs to judge the bucket
])
def test_length_shortcut_verdict(val, status):
    assert by_cause(judge({"train": metrics(), "val": val}, [], 0.8, 0.0, {"train": None}))[
        "length shortcut"].status == status


def test_different_student_needs_lineage():
    sets = {"train": metrics(), "val": metrics(), "test": metrics()}
    lineage = {"train": "student_model qwen-1.5b-sft", "test": None}
    assert by_cause(judge(sets, ["test"], 0.8, 0.0, lineage))["different student"].status == NOT_MEASURABLE
    lineage["test"] = "student_model qwen-1.5b-sft"
    assert by_cause(judge(sets, ["test"], 0.8, 0.0, lineage))["different student"].status == DOES_NOT_HOLD
    lineage["test"] = "student_model qwen-1.5b-rl-step200"
    assert by_cause(judge(sets, ["test"], 0.8, 0.0, lineage))["different student"].status == HOLDS


def test_training_health_flags_a_fast_unstable_run():
    history = [(step, {"critic/d_acc": 0.95, "critic/grad_norm": 12.0, "critic/score_diff": 0.1 * step,
                       "critic/length_ratio": 0.6}) for step in range(1, 41)]
    checks = {h.check.split(" (")[0].split(" at")[0]: h for h in training_health(history)}
    assert all(h.status == WARN for h in checks.values()), checks
    history = [(step, {"critic/d_acc": 0.7, "critic/grad_norm": 1.0, "critic/score_diff": 1.0,
                       "critic/length_ratio": 1.0}) for step in range(1, 41)]
    assert all(h.status != WARN for h in training_health(history))


def test_progressive_d_acc_from_the_history_when_the_summary_is_missing():
    history = [(step, {"critic/d_acc": 0.6 if step <= 10 else 1.0}) for step in range(1, 21)]
    value, source = progressive_d_acc({}, history, steps_per_epoch=10)
    assert value == pytest.approx(0.6) and "10 first-epoch steps" in source
    assert progressive_d_acc({"train/progressive_d_acc": 0.7}, history, 10) == (0.7, "train/progressive_d_acc")


# --- command line -------------------------------------------------------------------------------------

@pytest.mark.parametrize("items, match", [
    (["shifted"], "NAME=PATH"),
    (["val=x.parquet"], "reserved"),
    (["a=x.parquet", "a=y.parquet"], "given twice"),
])
def test_data_arguments_are_checked(items, match):
    with pytest.raises(SpecError, match=match):
        parse_data_args(items)


@pytest.mark.parametrize("argv, match", [
    (["--trial", "3", "--study", "s"], "study 's' not found"),
    (["--checkpoint", "/no/such/dir"], "is not a directory"),
])
def test_resolve_checkpoint(argv, match, tmp_path):
    parser = argparse.ArgumentParser()
    add_diagnose_command(parser.add_subparsers(dest="command"))
    store = ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
             "--tracking-uri", mlflow_uri(tmp_path)]
    with pytest.raises(SpecError, match=match):
        resolve_checkpoint(parser.parse_args(["diagnose", *argv, *store]))


def test_cli_end_to_end_in_a_subprocess(demo_checkpoint, tmp_path):
    """The way a user runs it: report on stdout, files in --out."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "sweep.py", "diagnose", "--checkpoint", str(demo_checkpoint),
                           "--data", "again=demo:shifted", "--out", str(out), "--max-pairs", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "## Verdicts" in done.stdout and "`again` (other" in done.stdout
    assert (out / "report.md").exists() and (out / "figures" / "d_acc.png").exists()
    with pytest.raises(SpecError, match="already data.eval_sets"):
        diagnose(demo_checkpoint, {"shifted": "demo:shifted"})


def test_student_identity_from_generation_lineage_or_the_lineage_column(tmp_path):
    from critic.data import PairSet
    from diagnose.diagnosis import student_identity

    cfg = build_config({"data": {"cache_dir": str(tmp_path)}})
    plain = random_pairs(tmp_path / "plain.parquet", 3, "plain", lambda rng: 4)
    tagged = random_pairs(tmp_path / "tagged.parquet", 3, "tagged", lambda rng: 4, student_model="qwen-sft")
    pairs = PairSet("x", [], [], [], [], np.zeros(0, bool), np.zeros(0, bool))
    assert student_identity(pairs, str(plain), cfg) is None
    assert student_identity(pairs, str(tagged), cfg) == "student_model qwen-sft"
    pairs.lineage = {"source": "model", "actor": "/models/actor-step200", "generation": '{"temperature": 0.0}'}
    assert "/models/actor-step200" in student_identity(pairs, str(plain), cfg)
