"""The MLflow sort key and run names: pure functions, checked on hand-made values."""

import math
import random

from sweeper.runs_view import charts_link, confirm_run_name, ordered_hex, run_name, sort_key


def test_ordered_hex_keeps_numeric_order():
    rng = random.Random(0)
    values = [0.0, -0.0, 1.0, -1.0, 1e-300, -1e-300, 1e300, -1e300, math.inf, -math.inf] + \
        [rng.uniform(-5, 5) for _ in range(300)]
    by_string = sorted(values, key=ordered_hex)
    assert by_string == sorted(values)  # -0.0 == 0.0, so their relative order does not matter


def test_sort_key_puts_baseline_candidates_running_best_pruned_failed_then_parent():
    keys = [sort_key("confirm"), sort_key("parent"), sort_key("failed"), sort_key("pruned"), sort_key("complete", 0.6),
            sort_key("complete", 0.9), sort_key("running"), sort_key("candidate", 12), sort_key("candidate", 2),
            sort_key("baseline")]
    assert sorted(keys) == keys[::-1]
    assert sort_key("complete", 0.1, "minimize") < sort_key("complete", 0.2, "minimize")
    assert sort_key("complete", math.nan) == sort_key("complete")  # no value: ranked by kind only


def test_run_name_says_the_sampled_values():
    name = run_name(3, {"train.lr": 0.000312345, "loss.adaptive_temperature": True, "train.scheduler": "cosine"},
                    baseline=False)
    assert name == "t003 lr=0.000312 adaptive_temperature=on scheduler=cosine"
    assert run_name(0, {"train.lr": 1.0}, baseline=True) == "t000 baseline"
    assert run_name(2, {"train.lr": 1e-4}, baseline=False, candidate="lr/3 + warmup 50") == \
        "t002 candidate 'lr/3 + warmup 50'"
    assert [confirm_run_name(c, 1) for c in ("baseline", "trial-7", "3 epochs")] == \
        ["confirm-baseline-seed1", "confirm-trial-7-seed1", "confirm-'3 epochs'-seed1"]
    assert len(run_name(7, {f"k{i}": 1.0 for i in range(100)}, baseline=False)) == 120


def test_charts_link_opens_chart_view_sorted_by_the_key():
    link = charts_link("http://127.0.0.1:5000", "4")
    assert link.startswith("http://127.0.0.1:5000/#/experiments/4/runs?compareRunsMode=CHART")
    assert "orderByKey=tags.%60sweep.sort_key%60&orderByAsc=true" in link
