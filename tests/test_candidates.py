"""Your planned changes (sweep.candidates) and the confirmation split: spec checks, then the real CLI end to end."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from critic.config import DataConfig, SpecError, build_config
from sweeper.confirm import EVALUATE_AT_THE_END, confirmation_metric
from sweeper.objective import OptunaReporter
from sweeper.study import load_sweep_spec
from tests.helpers import demo_pairs, tiny_config
from tests.sweep_helpers import ROOT, cli, store_args, tiny_sweep_spec

FROZEN = 1.0e-9  # outside the tiny space's 1e-4..3e-3, and so small that nothing moves


@pytest.mark.parametrize("objective, confirm_fraction, expected", [
    ("val/d_acc", 0.2, "confirm/d_acc"),
    ("val/auc", 0.2, "confirm/auc"),
    ("val/d_acc", 0.0, "val/d_acc"),  # no confirmation split: the selection pairs again (the verdict says so)
    ("shifted/d_acc", 0.2, "shifted/d_acc"),  # only val has a confirmation split
    ("train/progressive_d_acc", 0.2, "train/progressive_d_acc"),
])
def test_the_objective_maps_to_the_confirmation_split(objective, confirm_fraction, expected):
    assert confirmation_metric(objective, DataConfig(confirm_fraction=confirm_fraction)) == expected


def test_demo_candidates_fix_every_search_key_and_carry_the_rest():
    spec = load_sweep_spec(str(ROOT / "experiments" / "demo.yaml"))
    by_name = {c.name: c for c in spec.candidates}
    assert list(by_name) == ["3 epochs", "lr/3 + warmup 50 + cosine", "fixed T=2"]
    # 3 epochs is outside the space's 1..2: not an Optuna param (it would be out of range), applied on top
    assert by_name["3 epochs"].extra == {"train.epochs": 3} and "train.epochs" not in by_name["3 epochs"].params
    assert by_name["3 epochs"].params["train.lr"] == 3.0e-4  # the rest is the baseline
    assert by_name["lr/3 + warmup 50 + cosine"].params.items() >= {
        "train.lr": 1.0e-4, "train.warmup_steps": 50, "train.scheduler": "cosine", "train.epochs": 1}.items()
    assert by_name["fixed T=2"].params["loss.adaptive_temperature"] is False
    assert spec.cfg.data.confirm_fraction > 0 and not spec.cfg.eval.confirm_split


@pytest.mark.parametrize("sweep, extra, message", [
    ({}, {"eval": {"confirm_split": True}}, r"eval\.confirm_split is for the confirmation stage's own runs"),
    ({"search_space": {"data.confirm_fraction": {"type": "float", "low": 0.1, "high": 0.2}}}, {},
     r"sweep\.search_space: data\.confirm_fraction is the same for every trial of a study"),
    ({"candidates": [{"name": "resplit", "params": {"data.split_seed": 3}}]}, {},
     r"sweep\.candidates\[0\] \('resplit'\): data\.split_seed is the same for every trial"),
    ({"candidates": [{"name": "a", "params": {"train.lr": 1.0e-4}}, {"name": "b", "params": {"train.lr": "1e-4"}}]},
     {}, r"sweep\.candidates\[1\] \('b'\) gives the same trial config as candidate 'a'"),
    ({"candidates": [{"name": "slow", "params": {"train.lr": -1.0}}]}, {},
     r"sweep\.candidates\[0\] \('slow'\): train\.lr must be a positive number"),
    ({"objective": "confirm/d_acc"}, {}, r"the search never scores the confirmation split .* use val/d_acc"),
])
def test_sweep_spec_keeps_the_split_out_of_the_search(tmp_path, sweep, extra, message):
    with pytest.raises(SpecError, match=message):
        load_sweep_spec(str(tiny_sweep_spec(tmp_path, sweep=sweep, extra=extra)))


def test_a_confirmation_run_evaluated_only_at_the_end_trains_like_the_search_run(tmp_path, tiny_cache_dir):
    from critic.trial import run_trial

    path = demo_pairs(tmp_path / "pairs.parquet", 60)
    common = {"data.confirm_fraction": 0.25, "train.max_steps": 5}
    search = run_trial(tiny_config(path, tiny_cache_dir, {**common, "eval.every_steps": 2}))
    confirm = run_trial(tiny_config(path, tiny_cache_dir, {**common, "eval.every_steps": EVALUATE_AT_THE_END,
                                                           "eval.confirm_split": True}))
    assert [step for step, _ in search.eval_history] == [2, 4, 5] and [s for s, _ in confirm.eval_history] == [5]
    assert "confirm/d_acc" not in search.metrics and confirm.metrics["confirm/n_pairs"] > 0
    shared = {k: v for k, v in search.metrics.items() if k.startswith(("val/", "train/"))}
    assert shared == {k: confirm.metrics[k] for k in shared}  # same training, same final scores
    assert set(confirm.pair_scores["set"]) == {"val", "confirm"} and set(search.pair_scores["set"]) == {"val"}


def test_a_protected_trial_reports_but_is_never_pruned():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.99))
    cfg = build_config({"train": {"warmup_steps": 0}, "eval": {"every_steps": 2}})  # comparable from step 2 on
    OptunaReporter(study.ask(), "val/d_acc", report=True, prune=False, cfg=cfg).log_eval(2, {"val/d_acc": 0.5})
    assert study.trials[0].intermediate_values == {2: 0.5}  # reported: plots and the pruner's peers see it
    with pytest.raises(optuna.TrialPruned):  # the same value prunes a trial that is not protected
        OptunaReporter(study.ask(), "val/d_acc", report=True, prune=True, cfg=cfg).log_eval(2, {"val/d_acc": 0.5})


def _add_strong_trials(study: optuna.Study, count: int) -> None:
    """Finished trials that scored 1.0 at every evaluation: against them a median pruner cuts any weaker trial."""
    distributions = {"train.lr": FloatDistribution(1.0e-4, 3.0e-3, log=True),
                     "train.warmup_steps": IntDistribution(0, 3),
                     "loss.adaptive_temperature": CategoricalDistribution([True, False]),
                     "loss.t_max": FloatDistribution(1.5, 3.0), "train.epochs": IntDistribution(1, 2)}
    for index in range(count):
        params = {"train.lr": 1.0e-3 + index * 1.0e-4, "train.warmup_steps": 1, "loss.adaptive_temperature": True,
                  "loss.t_max": 2.5, "train.epochs": 1}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=1.0,
                                                  intermediate_values={2: 1.0, 4: 1.0, 6: 1.0}))


def test_candidates_run_after_the_baseline_are_never_pruned_and_are_confirmed_by_name(tmp_path):
    fixed_t = {"loss.adaptive_temperature": False, "loss.temperature": 2.0}
    spec = tiny_sweep_spec(tmp_path, n_pairs=160, sweep={
        "n_trials": 9, "pruner": "median", "confirm": {"top_k": 1, "seeds": 2, "max_seeds": 2, "n_resamples": 200},
        "candidates": [{"name": "frozen", "params": {"train.lr": FROZEN}}, {"params": fixed_t}]})
    assert cli("init", str(spec), *store_args(tmp_path), cwd=tmp_path).returncode == 0
    storage = store_args(tmp_path)[1]
    _add_strong_trials(optuna.load_study(study_name="tiny", storage=storage), 5)  # trials 3..7
    run = cli("run", str(spec), *store_args(tmp_path), cwd=tmp_path)  # redirected: one line per trial, no bars
    assert run.returncode == 0, run.stderr[-3000:]

    # Enqueued right after the baseline, in the spec's order; never pruned, though below every strong trial.
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    names = ["frozen", "adaptive_temperature=off temperature=2"]
    assert [t.user_attrs.get("candidate") for t in trials[:3]] == [None, *names] and trials[0].user_attrs["baseline"]
    for trial in trials[:3]:
        assert trial.state.name == "COMPLETE" and min(trial.intermediate_values.values()) < 1.0
    frozen = trials[1]
    assert frozen.user_attrs["extra_params"] == {"train.lr": FROZEN} and "train.lr" not in frozen.params
    assert {k: frozen.params[k] for k in ("train.warmup_steps", "train.epochs")} == {"train.warmup_steps": 2,
                                                                                    "train.epochs": 1}  # baseline's
    assert trials[2].params["loss.temperature"] == 2.0 and "loss.t_max" not in trials[2].params
    assert "[trial 1] COMPLETE" in run.stdout and "(candidate 'frozen')" in run.stdout

    # The confirmation: candidates whatever their rank, plus the top search finalist, on the confirmation split.
    result = json.loads(optuna.load_study(study_name="tiny", storage=storage).user_attrs["confirmation"])
    table = {row["config"]: row for row in result["table"]}
    assert list(table) == ["baseline", *names, "trial-3"]
    assert [table[n]["kind"] for n in table] == ["baseline", "candidate", "candidate", "finalist"]
    assert result["metric"] == "confirm/d_acc" and result["split"]["fresh"]
    n_confirm = result["split"]["n_pairs"]
    assert n_confirm > 0 and all(row["n_pairs"] == n_confirm for row in result["table"])
    assert f"scored on the confirmation split: {n_confirm} pairs never seen by the search" in run.stdout
    for name in names:
        assert f"your planned change {name!r} (trial {names.index(name) + 1}) " in run.stdout
    assert "finalist trial 3 (" in run.stdout

    # MLflow: runs named by candidate; search trials never scored the confirmation split, confirmation runs did.
    client = MlflowClient(store_args(tmp_path)[3])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.`sweep.role` = 'trial'")
    search = [r for r in runs if r.data.tags["sweep.stage"] == "search"]
    confirm = [r for r in runs if r.data.tags["sweep.stage"] == "confirm"]
    assert {"t001 candidate 'frozen'", f"t002 candidate {names[1]!r}"} <= {r.info.run_name for r in search}
    assert all(not any(k.startswith("confirm/") for k in r.data.metrics) for r in search)
    assert all(r.data.params["eval.confirm_split"] == "False" for r in search)
    assert len(confirm) == 8 and all(r.data.metrics["confirm/n_pairs"] == n_confirm for r in confirm)
    frozen_runs = [r for r in confirm if r.data.tags.get("sweep.candidate") == "frozen"]
    assert sorted(r.info.run_name for r in frozen_runs) == ["confirm-'frozen'-seed1", "confirm-'frozen'-seed2"]
    assert all(float(r.data.params["train.lr"]) == FROZEN for r in frozen_runs)  # the value outside the space

    report = (tmp_path / "tiny-report.html").read_text()
    assert f"<th>frozen</th><th>{names[1]}</th>" in report  # the best-vs-baseline table: a column per candidate
    assert "candidate &#x27;frozen&#x27; (trial 1)" in report or "candidate 'frozen' (trial 1)" in report  # curves

    best = cli("best", *store_args(tmp_path), cwd=tmp_path)
    assert "your planned changes (sweep.candidates" in best.stdout and "frozen" in best.stdout
    assert "your planned change 'frozen'" in best.stdout
    exported = cli("export", "--trial", "1", "--allow-unconfirmed", *store_args(tmp_path), cwd=tmp_path)
    assert "your planned change 'frozen'" in exported.stdout
    assert yaml.safe_load(exported.stdout)["train"]["lr"] == FROZEN
