"""Training and whole trials on tiny data: determinism, non-finite losses, updates, evaluation, schedules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from critic.config import ExperimentConfig
from critic.evaluate import metrics_from_scores
from critic.model import load_base_critic
from critic.reporting import RecordingReporter
from critic.train import NonFiniteError, length_grouped_batches, total_steps
from critic.trial import run_trial
from tests.helpers import PAIR_METRIC_NAMES, demo_pairs, tiny_config, tiny_tolerance, without_perf


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    """48 demo pairs (distinct prompts): about 36 to train on and 12 held out at val_fraction 0.25."""
    return demo_pairs(tmp_path_factory.mktemp("train") / "pairs.parquet", 48)


@pytest.fixture(scope="module")
def extra_file(tmp_path_factory):
    return demo_pairs(tmp_path_factory.mktemp("extra") / "shifted.parquet", 16, name="shifted")


def replace(cfg: ExperimentConfig, section: str, **values) -> ExperimentConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


# --- pure helpers -------------------------------------------------------------------------------------------

def test_length_grouped_batches_cover_every_pair_once_and_repeat_for_a_seed():
    lengths = np.random.default_rng(0).integers(5, 500, size=103)
    batches = length_grouped_batches(lengths, 8, np.random.default_rng(7))
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    assert max(len(b) for b in batches) == 8 and len(batches) == 13  # 13 = ceil(103 / 8)
    again = length_grouped_batches(lengths, 8, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = length_grouped_batches(lengths, 8, np.random.default_rng(8))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_length_grouped_batches_hold_similar_lengths():
    lengths = np.random.default_rng(0).integers(5, 500, size=128)  # one chunk of 16 batches
    batches = length_grouped_batches(lengths, 8, np.random.default_rng(0))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < np.ptp(lengths) / 4  # random batches of 8 would span most of the range


@pytest.mark.parametrize("n_pairs, epochs, batch_size, max_steps, expected", [  # full batches only, as verl's loader
    (100, 1, 32, None, 3), (100, 2, 32, None, 6), (100, 2, 32, 5, 5), (64, 1, 32, 10, 2),
])
def test_total_steps(n_pairs, epochs, batch_size, max_steps, expected):
    cfg = ExperimentConfig()
    cfg = replace(cfg, "train", epochs=epochs, batch_size=batch_size, max_steps=max_steps)
    assert total_steps(n_pairs, cfg) == expected


# --- whole trials ---------------------------------------------------------------------------------------------

def test_same_seed_and_config_give_identical_results(train_file, tiny_cache_dir):
    cfg = tiny_config(train_file, tiny_cache_dir)
    runs = []
    for _ in range(2):
        reporter = RecordingReporter()
        runs.append((run_trial(cfg, reporter), reporter))
    (first, first_log), (second, second_log) = runs
    assert first.metrics == second.metrics
    pd.testing.assert_frame_equal(first.pair_scores, second.pair_scores)
    assert without_perf(first_log.train) == without_perf(second_log.train)
    assert first_log.eval == second_log.eval
    # ...and the comparison can tell runs apart: another batch order gives other scores.
    other = run_trial(replace(cfg, "train", seed=1))
    assert not np.array_equal(other.pair_scores["teacher_score"], first.pair_scores["teacher_score"])


def test_non_finite_loss_raises_naming_the_step(train_file, tiny_cache_dir):
    # An absurd learning rate is finite, so the spec accepts it; step 1's update makes the weights
    # ~1e30 and step 2's forward overflows.
    cfg = tiny_config(train_file, tiny_cache_dir, {"train.lr": 1e30, "train.grad_clip": 1e30, "train.max_steps": 5})
    reporter = RecordingReporter()
    with pytest.raises(NonFiniteError, match=r"^non-finite loss \((nan|inf|-inf)\) at step 2$") as info:
        run_trial(cfg, reporter)
    assert info.value.step == 2 and info.value.what == "loss"
    assert [step for step, _ in reporter.train] == [1]  # nothing logged for the broken step


def test_every_trainable_parameter_changes_after_one_step(train_file, tiny_cache_dir):
    cfg = tiny_config(train_file, tiny_cache_dir, {"train.max_steps": 1})
    base = load_base_critic(cfg.model, cfg.data.cache_dir).model
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    result = run_trial(cfg, keep_model=True)
    assert result.metrics["train/steps"] == 1.0
    trainable = [(name, p) for name, p in result.model.named_parameters() if p.requires_grad]
    assert {name for name, _ in trainable} == set(before)
    unchanged = [name for name, p in trainable if torch.equal(p.detach().cpu(), before[name])]
    assert unchanged == []
    # the trial trained a copy: the shared initial weights are untouched
    assert all(torch.equal(p, before[name]) for name, p in base.named_parameters())


def test_eval_metrics_cover_val_and_extra_sets(train_file, extra_file, tiny_cache_dir):
    cfg = tiny_config(train_file, tiny_cache_dir, {
        "data.eval_sets": {"shifted": str(extra_file)}, "eval.before_train": True, "eval.every_steps": 2,
        "train.max_steps": 5})
    reporter = RecordingReporter()
    result = run_trial(cfg, reporter)

    expected_names = {f"{s}/{m}" for s in ("val", "shifted") for m in PAIR_METRIC_NAMES}
    assert [step for step, _ in result.eval_history] == [0, 2, 4, 5]  # before training, every 2 steps, final
    assert [step for step, _ in reporter.eval] == [0, 2, 4, 5]
    assert all(set(metrics) == expected_names for _, metrics in result.eval_history)
    assert expected_names <= set(result.metrics)
    assert result.metrics["shifted/n_pairs"] == 16.0 and result.metrics["data/shifted_pairs"] == 16.0
    assert result.metrics["val/n_pairs"] == result.metrics["data/val_pairs"] > 0
    assert result.metrics["train/steps"] == 5.0
    # final metrics are the pair metrics of the per-pair scores the trial returns
    for name in ("val", "shifted"):
        recomputed = metrics_from_scores(result.pair_scores[result.pair_scores["set"] == name])
        assert {f"{name}/{k}": v for k, v in recomputed.items()} == pytest.approx(
            {k: v for k, v in result.metrics.items() if k.startswith(f"{name}/")})

    assert [step for step, _ in reporter.train] == [1, 2, 3, 4, 5]
    step_names = {"critic/loss", "critic/d_acc", "critic/grad_norm", "critic/lr", "critic/temperature",
                  "perf/pairs_per_s", "perf/tokens_per_s"}
    assert all(step_names <= set(metrics) for _, metrics in reporter.train)
    assert all(np.isfinite(list(metrics.values())).all() for _, metrics in reporter.train)
    for key in ("critic/d_acc", "critic/loss", "critic/score_diff"):  # beside each: its mean over the last 2 steps
        raw = [metrics[key] for _, metrics in reporter.train]
        trailing = [metrics[key.replace("critic/", "critic/avg_")] for _, metrics in reporter.train]
        assert trailing == pytest.approx([raw[0], *[(a + b) / 2 for a, b in zip(raw, raw[1:])]], abs=1e-12)


def test_micro_batches_accumulate_to_the_full_batch(train_file, tiny_cache_dir, torch_threads):
    logs = []
    for micro in (4, 2, 1):
        reporter = RecordingReporter()
        run_trial(tiny_config(train_file, tiny_cache_dir, {"train.micro_batch_size": micro, "train.max_steps": 2,
                                                           "model.torch_threads": torch_threads}), reporter)
        logs.append(reporter.train)
    full = logs[0]
    row = 32 + 2 * 24  # tiny_config's prompt and response limits; a step of 4 pairs, summed in other groups
    tolerance = tiny_tolerance(1.0, row, 4 * row)  # loss, grad norm, d_acc and score_diff are of order 1
    for split in logs[1:]:
        for (_, want), (_, got) in zip(full, split):
            for name in ("critic/loss", "critic/grad_norm", "critic/d_acc", "critic/score_diff"):
                assert got[name] == pytest.approx(want[name], rel=tolerance, abs=tolerance), name


def test_learning_rate_follows_warmup_then_the_schedule(train_file, tiny_cache_dir):
    reporter = RecordingReporter()
    run_trial(tiny_config(train_file, tiny_cache_dir, {"train.warmup_steps": 2, "train.max_steps": 4}), reporter)
    assert [m["critic/lr"] for _, m in reporter.train] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    reporter = RecordingReporter()
    run_trial(tiny_config(train_file, tiny_cache_dir, {"train.scheduler": "linear", "train.max_steps": 4}), reporter)
    assert [m["critic/lr"] for _, m in reporter.train] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
