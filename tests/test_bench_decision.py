"""The decision benchmark's harness on a tiny case: every policy x scenario through the real CLI, one repetition."""

import json
import math

import pytest

from benchmarks.bench_decision import POLICIES, TrueImprovement, run_benchmark
from benchmarks.decision_truth import SCENARIOS, TINY, compute_truth


@pytest.fixture(scope="module")
def tiny_truth():
    """The tiny case's truth, measured once (a few tiny runs) for both tests."""
    return compute_truth(TINY, log=lambda _: None)


def test_one_tiny_repetition_gives_a_row_per_policy_and_scenario(tmp_path, tiny_truth):
    rows = run_benchmark(TINY, repeats=1, out=tmp_path, log=lambda _: None, truth=tiny_truth)

    assert {(r["policy"], r["scenario"]) for r in rows} == {(p.name, s) for p in POLICIES for s in SCENARIOS}
    for row in rows:
        assert math.isfinite(row["trial_seconds"]["mean"]) and row["trial_seconds"]["mean"] > 0
        assert row["claim_rate"] in (0.0, 1.0)
        assert math.isfinite(row["true_improvement"]["mean"])
    runs = [json.loads(line) for line in (tmp_path / "decision.jsonl").read_text().splitlines()]
    assert sum("claim" in run for run in runs) == len(POLICIES) * len(SCENARIOS)
    assert (tmp_path / "decision.md").read_text().count("\n| ") == len(rows) + 1  # header + one line per row
    assert (tmp_path / "decision.png").stat().st_size > 0


def test_the_true_improvement_of_the_baseline_itself_is_zero_within_its_noise(tiny_truth):
    truth = tiny_truth
    baseline = truth["scenarios"]["null"]["baseline"]

    improvement = TrueImprovement(truth, TINY).measure("null", baseline["params"])  # measured, not taken as 0

    # Seed sd, or at least the binomial sd of one run's d_acc on the fresh pairs, times the sd of a difference of a
    # mean over the truth's seeds and one over the answer's; 4 of them: a real offset of the baseline still fails.
    p = baseline["mean"]
    per_run = max(baseline["sd"], math.sqrt(p * (1 - p) / TINY.fresh_pairs))
    noise = per_run * math.sqrt(1 / TINY.truth_seeds + 1 / TINY.answer_seeds)
    assert abs(improvement) <= 4 * noise, (improvement, noise)
