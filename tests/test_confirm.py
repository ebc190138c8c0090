"""The confirmation stage end to end: real CLI, Optuna SQLite storage, MLflow store, tiny critics."""

from __future__ import annotations

import json
import os
import signal

import optuna
import pytest
from mlflow import MlflowClient

from critic.config import SpecError
from sweeper.confirm import ConfirmPlan
from sweeper.space import check_effective, parse_space
from tests.sweep_helpers import cli, store_args, tiny_sweep_spec

LEARNS, FROZEN = 3.0e-3, 1.0e-9  # the second rate is so small that nothing moves


def _study_with(tmp_path, baseline_lr: float, finalist_lrs: list[float], n_pairs: int = 200) -> str:
    """A finished search whose trials are the baseline then the given learning rates (enqueued, in order)."""
    spec = tiny_sweep_spec(tmp_path, n_pairs=n_pairs, sweep={
        "n_trials": 1 + len(finalist_lrs),
        "search_space": {"train.lr": {"type": "float", "low": FROZEN, "high": 1.0e-2, "log": True}},
        "baseline": {"train.lr": baseline_lr}, "confirm": {"top_k": 0, "seeds": 3, "n_resamples": 300}},
        extra={"train": {"lr": baseline_lr, "batch_size": 8, "micro_batch_size": 8, "max_steps": 12}})
    init = cli("init", str(spec), *store_args(tmp_path), cwd=tmp_path)
    assert init.returncode == 0, init.stderr[-2000:]
    study = optuna.load_study(study_name="tiny", storage=store_args(tmp_path)[1])
    for lr in finalist_lrs:
        study.enqueue_trial({"train.lr": lr})
    run = cli("run", str(spec), *store_args(tmp_path), "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    return str(spec)


def _confirmation(tmp_path) -> dict:
    study = optuna.load_study(study_name="tiny", storage=store_args(tmp_path)[1])
    return json.loads(study.user_attrs["confirmation"])


def test_frozen_finalist_is_worse_and_a_twin_of_the_baseline_is_no_different(tmp_path):
    _study_with(tmp_path, LEARNS, [FROZEN, LEARNS])  # trial 1 cannot learn, trial 2 is the baseline again
    out = cli("confirm", "--trials", "1,2", "--seeds", "4", *store_args(tmp_path), "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = _confirmation(tmp_path)
    rows = {row["trial"]: row for row in result["table"]}
    assert rows[1]["verdict"] == "worse" and rows[1]["diff_high"] < 0, rows[1]
    assert rows[2]["diff_mean"] == 0.0 and rows[2]["verdict"] == "no difference"
    assert result["winner"] is None and "no finalist beats the baseline" in out.stdout
    assert "finalist trial 1 (train.lr=1e-09) is worse than the baseline by" in out.stdout
    assert "finalist trial 2 (train.lr=0.003) shows no difference from the baseline" in out.stdout
    assert "noise floor" in out.stdout and "scored on the confirmation split" in out.stdout
    # Neither looks better after the first 4 seeds: no second look (max_seeds 8 by default).
    assert "after 4 seeds no config looks better than the baseline: no more seeds" in out.stdout

    # Every confirmation run is a child of the study's parent run, tagged with stage and seed.
    client = MlflowClient(store_args(tmp_path)[3])
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`sweep.stage` = 'confirm'")
    parent = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'parent'")[0]
    assert len(runs) == 12 and {r.data.tags["sweep.seed_index"] for r in runs} == {"1", "2", "3", "4"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert {r.data.params["train.seed"] for r in runs} == {"1", "2", "3", "4"}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "confirmation")}
    assert artifacts >= {"confirmation/confirmation.csv", "confirmation/confirmation.png"}

    # The search's best (a one-seed winner) is exported with a warning; the baseline without.
    worse = cli("export", "--trial", "1", "--format", "yaml", *store_args(tmp_path), cwd=tmp_path)
    assert "NOT SHOWN BETTER" in worse.stderr and "# NOT SHOWN BETTER" in worse.stdout
    quiet = cli("export", "--trial", "1", "--allow-unconfirmed", *store_args(tmp_path), cwd=tmp_path)
    assert "warning" not in quiet.stderr and "# NOT SHOWN BETTER" in quiet.stdout
    base = cli("export", "--trial", "0", *store_args(tmp_path), cwd=tmp_path)
    assert "warning" not in base.stderr and "confirmed over 4 seeds" in base.stdout


def test_a_config_that_looks_better_gets_more_seeds_and_its_export_records_its_numbers(tmp_path):
    _study_with(tmp_path, FROZEN, [LEARNS])  # the "current setting" cannot learn; trial 1 can
    out = cli("confirm", "--top-k", "1", "--seeds", "2", "--max-seeds", "4", *store_args(tmp_path), "--no-progress",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    # Better after 2 seeds: trial 1 and the baseline get seed indices 3 and 4, and the verdict is read on all 4.
    assert "after 2 seeds trial-1 looks better than the baseline: seed indices 3..4" in out.stdout
    confirm = optuna.load_study(study_name="tiny.confirm", storage=store_args(tmp_path)[1])
    keys = sorted(ConfirmPlan.key(t) for t in confirm.trials if t.state.name == "COMPLETE")
    assert keys == [(config, s) for config in ("baseline", "trial-1") for s in (1, 2, 3, 4)]
    result = _confirmation(tmp_path)
    assert result["winner"] == 1 and "beats the baseline" in out.stdout
    assert [row["seeds"] for row in result["table"]] == [4, 4] and result["seeds"] == [1, 2, 3, 4]
    exported = cli("export", "--format", "json", *store_args(tmp_path), cwd=tmp_path)  # picks the winner
    assert exported.returncode == 0 and "warning" not in exported.stderr
    document = json.loads(exported.stdout)
    row = next(r for r in result["table"] if r["trial"] == 1)
    assert document["trial"] == 1
    assert any(f"{row['mean_mean']:.4f}" in line and "4 seeds" in line for line in document["confirmation"])
    best = cli("best", *store_args(tmp_path), cwd=tmp_path)
    assert "beats the baseline" in best.stdout


def test_unconfirmed_export_warns(tmp_path):
    _study_with(tmp_path, LEARNS, [FROZEN])
    out = cli("export", "--format", "yaml", *store_args(tmp_path), cwd=tmp_path)
    assert out.returncode == 0 and "NOT CONFIRMED" in out.stderr and "# NOT CONFIRMED" in out.stdout


def interrupt_the_third_run() -> None:
    """In the `confirm` process: Ctrl-C while its third run trains, after two runs finished. Sent from inside, at
    that point, so it never lands between runs (where it would interrupt nothing)."""
    from sweeper import objective

    real_run_trial, calls = objective.run_trial, []

    def run_trial(*args, **kwargs):  # the run is open: called by the objective once it recorded the run's id
        calls.append(None)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_run_trial(*args, **kwargs)

    objective.run_trial = run_trial


def test_interrupted_confirmation_resumes_without_repeating_finished_seeds(tmp_path):
    _study_with(tmp_path, LEARNS, [FROZEN], n_pairs=120)
    storage = store_args(tmp_path)[1]
    stopped = cli("confirm", "--trials", "1", "--seeds", "3", *store_args(tmp_path), "--no-progress", cwd=tmp_path,
                  before=interrupt_the_third_run)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    trials = optuna.load_study(study_name="tiny.confirm", storage=storage).trials
    done_before = [t for t in trials if t.state.name == "COMPLETE"]
    assert [t.number for t in done_before] == [0, 1]
    assert trials[2].state.name == "FAIL" and trials[2].user_attrs["fail_reason"] == "interrupted"
    rerun = cli("confirm", "--trials", "1", "--seeds", "3", *store_args(tmp_path), "--no-progress", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    confirm = optuna.load_study(study_name="tiny.confirm", storage=storage)
    complete = [t for t in confirm.trials if t.state.name == "COMPLETE"]
    keys = [ConfirmPlan.key(t) for t in complete]
    assert len(keys) == len(set(keys)) == 6  # 2 configs x 3 seeds, none run twice
    assert {t.number for t in done_before} <= {t.number for t in complete}
    client = MlflowClient(store_args(tmp_path)[3])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert all(r.info.status != "RUNNING" for r in runs)
    interrupted = confirm.trials[2]
    assert client.get_run(interrupted.user_attrs["mlflow_run_id"]).info.status == "KILLED"


@pytest.mark.parametrize("space,base,message", [
    ({"loss.t_min": {"type": "float", "low": 0.2, "high": 0.5}}, {"loss.adaptive_temperature": True},
     "never takes effect.*never below t_a=0.5"),
    ({"loss.temperature": {"type": "float", "low": 0.5, "high": 4.0}}, {"loss.adaptive_temperature": True},
     "loss.temperature never takes effect"),
    ({"loss.t_max": {"type": "float", "low": 1.5, "high": 4.0}}, {"loss.adaptive_temperature": False},
     "loss.t_max never takes effect"),
])
def test_search_ranges_that_cannot_take_effect_are_errors(space, base, message):
    flat = {"loss.t_a": 0.5, "loss.t_b": 0.5, **base}
    with pytest.raises(SpecError, match=message):
        check_effective(parse_space(space), flat, "spec.yaml")


def test_partly_ineffective_range_warns_and_effective_range_is_quiet():
    flat = {"loss.t_a": 0.5, "loss.t_b": 0.5, "loss.adaptive_temperature": True}
    partly = check_effective(parse_space({"loss.t_min": {"type": "float", "low": 0.2, "high": 0.6}}), flat, "s")
    assert len(partly) == 1 and "below t_a=0.5 all behave like t_a" in partly[0]
    assert check_effective(parse_space({"loss.t_min": {"type": "float", "low": 0.5, "high": 1.0}}), flat, "s") == []


def test_confirm_needs_a_baseline(tmp_path):
    spec = tiny_sweep_spec(tmp_path, sweep={"n_trials": 1, "baseline": {}})
    assert cli("run", str(spec), *store_args(tmp_path), "--no-progress", cwd=tmp_path).returncode == 0
    out = cli("confirm", "--top-k", "1", "--seeds", "2", *store_args(tmp_path), cwd=tmp_path)
    assert out.returncode != 0 and "no COMPLETE baseline trial" in out.stderr


def test_export_reads_a_confirmation_stored_before_the_bonferroni_rows():
    """Studies confirmed before issue 18 stored p_holm and no diff_level: export still says what was measured."""
    from sweeper.export import confirmation_note

    study = optuna.create_study(direction="maximize")
    for lr in (3e-4, 1e-4):
        study.enqueue_trial({"train.lr": lr})
        study.optimize(lambda t: t.suggest_float("train.lr", 1e-5, 1e-3, log=True), n_trials=1)
    old_row = {"diff_mean": 0.01, "diff_low": -0.02, "diff_high": 0.04, "diff_se": 0.015, "p_value": 0.5,
               "mean_mean": 0.9, "mean_low": 0.88, "mean_high": 0.92, "seeds": 3, "n_pairs": 485}
    study.set_user_attr("confirmation", json.dumps({"metric": "val/d_acc", "table": [
        {**old_row, "config": "baseline", "trial": 0, "p_holm": 1.0, "verdict": "baseline"},
        {**old_row, "config": "trial-1", "trial": 1, "p_holm": 0.6, "verdict": "no difference"}]}))
    shown, lines = confirmation_note(study, study.trials[1])
    assert not shown and "95% interval, p=0.6 (Holm), verdict: no difference" in lines[0]
    assert "on the held-out pairs that also selected the finalists" in lines[1]
