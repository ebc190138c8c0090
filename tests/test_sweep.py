"""The sweep end to end and its edge cases: real Optuna SQLite storage, real MLflow SQLite store, tiny models."""

from __future__ import annotations

import json
import re
import signal
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from critic.config import SpecError
from sweeper import study as study_mod
from sweeper.board import leaderboard
from sweeper.space import parse_space, suggest, to_distribution
from sweeper.sweep import Sweep
from sweeper.verl_export import parse_overrides
from tests.browser import chromium, mlflow_ui, rendered_dom
from tests.sweep_helpers import (
    CliProcess,
    cli,
    load_study,
    mlflow_uri,
    sqlite_dump,
    store_args,
    tiny_sweep_spec,
    trials_in_their_run,
    wait_for,
)


@pytest.mark.parametrize("entry,expected", [
    ({"type": "float", "low": 1e-7, "high": 1e-4, "log": True}, FloatDistribution(1e-7, 1e-4, log=True)),
    ({"type": "float", "low": 0.5, "high": 4.0}, FloatDistribution(0.5, 4.0)),
    ({"type": "float", "low": 0.0, "high": 1.0, "step": 0.25}, FloatDistribution(0.0, 1.0, step=0.25)),
    ({"type": "int", "low": 0, "high": 100}, IntDistribution(0, 100)),
    ({"type": "int", "low": 1, "high": 64, "log": True}, IntDistribution(1, 64, log=True)),
    ({"type": "categorical", "choices": [True, False]}, CategoricalDistribution([True, False])),
    ({"type": "categorical", "choices": ["constant", "cosine"]}, CategoricalDistribution(["constant", "cosine"])),
])
def test_search_space_entry_to_distribution(entry, expected):
    assert to_distribution("train.lr", entry) == expected


@pytest.mark.parametrize("key,entry,message", [
    ("train.lr", {"type": "float", "low": 1e-3, "high": 1e-5}, "low .* must be <= high"),
    ("train.lr", {"type": "float", "low": 0.0, "high": 1e-3, "log": True}, "log scale needs low > 0"),
    ("train.lrr", {"type": "float", "low": 1e-5, "high": 1e-3}, "unknown key 'train.lrr'.*Valid keys"),
    ("trainer.lr", {"type": "float", "low": 1e-5, "high": 1e-3}, "section must be one of"),
    ("train.lr", {"type": "normal", "low": 1e-5, "high": 1e-3}, "type must be float, int or categorical"),
    ("train.lr", {"type": "float", "low": 1e-5, "high": 1e-3, "q": 2}, "unknown field"),
    ("train.lr", {"type": "categorical", "choices": []}, "non-empty list"),
    ("train.lr", {"type": "categorical", "choices": ["fast"]}, "must be a number"),
    ("train.epochs", {"type": "int", "low": 1.5, "high": 3}, "must be integers"),
])
def test_search_space_invalid_entries(key, entry, message):
    with pytest.raises(SpecError, match=message):
        parse_space({key: entry})


def test_conditional_parameters_follow_adaptive_temperature():
    entries = parse_space({
        "loss.adaptive_temperature": {"type": "categorical", "choices": [True, False]},
        "loss.temperature": {"type": "float", "low": 0.5, "high": 4.0, "when": {"loss.adaptive_temperature": False}},
        "loss.t_min": {"type": "float", "low": 0.2, "high": 0.6, "when": {"loss.adaptive_temperature": True}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        sampled = suggest(trial, entries, {"loss.adaptive_temperature": False})
        if sampled["loss.adaptive_temperature"]:
            assert "loss.t_min" in sampled and "loss.temperature" not in sampled
        else:
            assert "loss.temperature" in sampled and "loss.t_min" not in sampled
        seen.add(sampled["loss.adaptive_temperature"])
        study.tell(trial, 0.0)
    assert seen == {True, False}


def test_end_to_end_sweep_export_and_reproduce(tmp_path):
    spec = tiny_sweep_spec(tmp_path)
    run = cli("run", str(spec), *store_args(tmp_path), "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "#/experiments/" in run.stdout and "baseline" in run.stdout

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = [t for t in study.trials if t.state in states]
    assert len(finished) == 3
    assert study.trials[0].user_attrs.get("baseline") is True and study.trials[0].params["train.lr"] == 3e-4

    client = MlflowClient(mlflow_uri(tmp_path))
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    assert all(r.info.status == "FINISHED" for r in runs)
    # Search trials are top-level runs (MLflow's chart view draws them unclicked), linked to the study by tags,
    # named by their sampled values; sorted by `sweep.sort_key` the baseline comes first, then the best trials.
    ordered = client.search_runs([experiment.experiment_id], order_by=["tags.`sweep.sort_key` ASC"])
    assert ordered[0].data.tags["sweep.baseline"] == "true" and ordered[0].data.tags["mlflow.runColor"] == "#000000"
    assert ordered[-1].data.tags["sweep.role"] == "parent"  # (no confirmation in this sweep)
    done = [int(r.data.tags["sweep.trial"]) for r in ordered
            if r.data.tags.get("sweep.state") == "COMPLETE" and r.data.tags["sweep.baseline"] == "false"]
    values = [json.loads(study.trials[n].user_attrs["metrics"])["val/d_acc"] for n in done]
    assert values == sorted(values, reverse=True)
    for child in children:
        assert "mlflow.parentRunId" not in child.data.tags
        assert child.data.tags["sweep.parent_run_id"] == parents[0].info.run_id
        assert child.info.run_name.startswith(f"t{int(child.data.tags['sweep.trial']):03d} ")
        assert len(client.get_metric_history(child.info.run_id, "critic/d_acc")) > 1
        assert len(client.get_metric_history(child.info.run_id, "critic/score_diff")) > 1
        assert len(client.get_metric_history(child.info.run_id, "val/d_acc")) >= 1
        inputs = {d.dataset.name: d.dataset.digest for d in child.inputs.dataset_inputs}
        assert set(inputs) == {"train", "val", "shifted"} and all(inputs.values())
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "figures")}
        assert "figures/training_progress.png" in artifacts
        assert child.data.params["train.lr"] == str(json.loads(study.trials[int(child.data.tags["sweep.trial"])]
                                                               .user_attrs["config"])["train.lr"])
    parent_history = client.get_metric_history(parents[0].info.run_id, "sweep/best_value")
    assert len(parent_history) == 3
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"leaderboard.csv", "optuna"}
    check_charts_in_browser(run.stdout, tmp_path, [r.info.run_name for r in ordered
                                                   if r.data.tags.get("sweep.role") == "trial"])

    exported = tmp_path / "best.yaml"
    out = cli("export", "--format", "yaml", "-o", str(exported), *store_args(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    train = cli("train", str(exported), "--json", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-2000:]
    reproduced = json.loads(train.stdout.strip().splitlines()[-1])["val/d_acc"]
    assert abs(reproduced - study.best_value) <= 1e-6

    verl = cli("export", "--format", "verl", *store_args(tmp_path), cwd=tmp_path)
    assert verl.returncode == 0, verl.stderr[-2000:]
    best = study.best_trial
    overrides = dict(line.split("=", 1) for line in parse_overrides(verl.stdout))
    assert overrides["critic.optim.lr"] == str(best.params["train.lr"])
    assert "trainer.total_epochs" not in overrides  # the whole RL run's epochs, never the warmup's
    if best.params["train.warmup_steps"] == 0:
        assert overrides["critic.optim.lr_warmup_steps"] == "0"
    else:  # optimizer steps have no verl unit without a verl: section: said, not written
        assert "critic.optim.lr_warmup_steps" not in overrides and "lr warmup not written" in verl.stderr
    assert "trainer.critic_warmup not written" in verl.stderr and "++critic.temperature_max" in overrides


def check_charts_in_browser(run_output: str, tmp_path, trial_names: list[str]) -> None:
    """The link `run` prints, opened in headless Chromium on `sweep.py ui`: chart view, every trial drawn, no click."""
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does it): UI check not run")
    link = re.search(r"MLflow runs page: (\S+)", run_output).group(1)
    legends = tuple(f"{trial_names[0]} ({metric})" for metric in ("critic/avg_d_acc", "critic/d_acc", "val/d_acc",
                                                                  "val/score_diff"))
    with mlflow_ui(store_args(tmp_path), tmp_path) as base:
        dom = rendered_dom(link.replace("http://127.0.0.1:5000", base), expect=legends)
    table = [name for name in re.findall(r"t\d{3} [^<(]*?(?=<)", dom) if name in trial_names]
    assert table[:len(trial_names)] == trial_names  # the runs table, in sort-key order: baseline first
    for legend in legends:
        assert legend in dom, legend  # the baseline is drawn in that metric's chart (its legend names it)
    assert dom.count('class="trace scatter') >= 3 * len(trial_names)  # one line per trial in every chart


def test_spec_error_stops_before_any_trial(tmp_path):
    spec = tiny_sweep_spec(tmp_path, sweep={"search_space": {"train.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}})
    run = cli("run", str(spec), *store_args(tmp_path), "--no-progress", cwd=tmp_path)
    assert run.returncode == 2
    assert "low (0.01) must be <= high (0.0001)" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "optuna.db").exists() or not optuna.get_all_study_summaries(
        f"sqlite:///{tmp_path / 'optuna.db'}")


def test_data_error_stops_the_sweep_at_once(tmp_path):
    spec = tiny_sweep_spec(tmp_path, extra={"data": {"student_key": "no_such_column"}})
    run = cli("run", str(spec), *store_args(tmp_path), "--no-progress", cwd=tmp_path)
    assert run.returncode == 2
    assert "missing column" in run.stderr and "no_such_column" in run.stderr
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]  # one trial, not n identical failures
    client = MlflowClient(mlflow_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert runs and all(r.info.status != "RUNNING" for r in runs)


def _in_process(tmp_path, **sweep):
    spec = study_mod.load_sweep_spec(str(tiny_sweep_spec(tmp_path, sweep=sweep)))
    storage, tracking = f"sqlite:///{tmp_path / 'optuna.db'}", mlflow_uri(tmp_path)
    return spec, storage, tracking


def test_pruner_that_must_prune_prunes_and_records_reason(tmp_path):
    spec, storage, tracking = _in_process(tmp_path, n_trials=2, baseline={})
    sweep = Sweep.init(spec, storage, tracking)
    tracker = sweep.tracker
    # A pruner that must prune: any val/d_acc below 2 is below its lower threshold.
    study = optuna.load_study(study_name="tiny", storage=storage, pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    sweep.on(study).run_trials(2, progress=False)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert all("pruned by the pruner at step 2" in t.user_attrs["prune_reason"] for t in study.trials)
    for t in study.trials:
        run = tracker.client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["sweep.state"] == "PRUNED" and run.info.status == "FINISHED"


def test_non_finite_loss_prunes_with_reason_and_sweep_continues(tmp_path):
    space = {"train.lr": {"type": "categorical", "choices": [1.0e30, 1.0e-3]}}
    spec, storage, tracking = _in_process(tmp_path, n_trials=2, search_space=space, baseline={"train.lr": 1.0e30},
                                          sampler="random")
    sweep = Sweep.init(spec, storage, tracking)
    study, tracker = sweep.study, sweep.tracker
    sweep.run_trials(2, progress=False)
    states = [t.state.name for t in study.trials]
    assert states[0] == "PRUNED" and "non-finite" in study.trials[0].user_attrs["prune_reason"]
    assert states.count("COMPLETE") + states.count("PRUNED") >= 2 and "COMPLETE" in states
    run = tracker.client.get_run(study.trials[0].user_attrs["mlflow_run_id"])
    assert "non-finite" in run.data.tags["sweep.prune_reason"]


def test_resuming_with_a_different_direction_is_refused(tmp_path):
    spec, storage, tracking = _in_process(tmp_path)
    Sweep.init(spec, storage, tracking)
    other = study_mod.load_sweep_spec(str(tiny_sweep_spec(tmp_path, sweep={"direction": "minimize"})))
    with pytest.raises(SpecError, match="different objective, direction, search space or data split"):
        Sweep.init(other, storage, tracking)
    study = Sweep.init(other, storage, tracking, new_study=True).study
    assert study.study_name.startswith("tiny-") and study.direction == optuna.study.StudyDirection.MINIMIZE


def test_resuming_with_another_held_out_split_is_refused_and_old_fingerprints_still_resume(tmp_path):
    spec, storage, tracking = _in_process(tmp_path)
    study = Sweep.init(spec, storage, tracking).study
    moved = study_mod.load_sweep_spec(str(tiny_sweep_spec(tmp_path, extra={"data": {"split_seed": 7}})))
    with pytest.raises(SpecError, match=r"data split \(stored: .*split=\{'train_path'"):
        Sweep.init(moved, storage, tracking)
    # A study stored before the split was fingerprinted: compared on what it recorded, so it resumes.
    old = {k: v for k, v in study.user_attrs["fingerprint"].items() if k != "split"}
    study.set_user_attr("fingerprint", old)
    assert Sweep.init(moved, storage, tracking).study.study_name == "tiny"


def test_preempted_run_resumes_with_the_interrupted_trial_first_and_one_parent(tmp_path):
    """SIGTERM (a scheduler preempting the job): the running trial ends as interrupted within seconds and is queued
    again with its params; the rerun runs it first, finishes the study and re-runs no finished trial."""
    spec = tiny_sweep_spec(tmp_path, sweep={"n_trials": 3})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = CliProcess("run", str(spec), *store_args(tmp_path), "--no-progress", cwd=tmp_path)
    def one_done_one_running():
        trials = load_study("tiny", storage).trials
        return trials and trials[0].state.is_finished() and trials_in_their_run("tiny", storage)

    wait_for(one_done_one_running, 240, "a finished trial and a running one with its run", proc=proc)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert time.monotonic() - sent < 60 and "Rerun the same command to resume" in err
    study = optuna.load_study(study_name="tiny", storage=storage)
    [stopped] = [t for t in study.trials if t.user_attrs.get("fail_reason") == "interrupted"]
    [queued] = [t for t in study.trials if t.state.name == "WAITING"]
    assert stopped.state.name == "FAIL" and queued.user_attrs["retry_of"] == stopped.number
    done_before = {t.number for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")}
    client = MlflowClient(mlflow_uri(tmp_path))
    experiment_id = client.get_experiment_by_name("tiny").experiment_id
    assert all(r.info.status != "RUNNING" for r in client.search_runs([experiment_id]))

    rerun = cli("run", str(spec), *store_args(tmp_path), "--no-progress", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3 and done_before <= {t.number for t in finished}
    retried = study.trials[queued.number]
    assert retried.state.name in ("COMPLETE", "PRUNED") and retried.params == stopped.params
    assert retried.user_attrs.get("baseline", False) == stopped.user_attrs.get("baseline", False)
    board = leaderboard(study).set_index("number")
    assert board.loc[stopped.number, "reason"] == f"interrupted; re-run as trial {queued.number}"
    runs = client.search_runs([experiment_id])
    assert len([r for r in runs if r.data.tags.get("sweep.role") == "parent"]) == 1
    assert all(r.info.status != "RUNNING" for r in runs)


def test_no_password_in_logs_params_tags_or_attrs(tmp_path):
    secret = "s3cr3t-pw"
    spec = tiny_sweep_spec(tmp_path, sweep={"n_trials": 1, "baseline": {}},
                           extra={"student": {"endpoint": f"http://alice:{secret}@127.0.0.1:9/v1", "model_name": "m"}})
    run = cli("run", str(spec), *store_args(tmp_path), "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert secret not in run.stdout + run.stderr
    assert secret not in sqlite_dump(tmp_path / "mlflow.db")
    assert secret not in sqlite_dump(tmp_path / "optuna.db")
    status = cli("status", *store_args(tmp_path), cwd=tmp_path)
    assert status.returncode == 0 and secret not in status.stdout


def test_mask_hides_passwords():
    from sweeper.stores import mask
    assert mask("postgresql://bob:pa55@db:5432/optuna") == "postgresql://bob:***@db:5432/optuna"
    assert mask("see postgresql+psycopg://u:x@h/d and http://a:b@c") == "see postgresql+psycopg://u:***@h/d and http://a:***@c"
    assert mask("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"


def test_diagnose_a_trial_of_a_sweep(tmp_path):
    """train.save_checkpoint keeps each trial's critic; `diagnose --trial N` finds it and logs the report to its run."""
    spec = tiny_sweep_spec(tmp_path, sweep={"n_trials": 1}, extra={"train": {"save_checkpoint": True}})
    run = cli("run", str(spec), *store_args(tmp_path), "--no-progress", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    diag = cli("diagnose", "--trial", "0", "--max-pairs", "0", *store_args(tmp_path), cwd=tmp_path)
    assert diag.returncode == 0, diag.stderr[-3000:]
    assert "shifted" in diag.stdout and "tie rule" in diag.stdout
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    client = MlflowClient(mlflow_uri(tmp_path))
    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    assert "diagnosis/report.md" in {a.path for a in client.list_artifacts(run_id, "diagnosis")}
    missing = cli("diagnose", "--trial", "7", *store_args(tmp_path), cwd=tmp_path)
    assert missing.returncode == 2 and "has no MLflow run" in missing.stderr


@pytest.mark.parametrize("other_is_better", [False, True])
def test_best_checkpoint_is_the_critic_of_the_trial_it_is_named_after(tmp_path, other_is_better):
    """sweep.save_best_checkpoint with several workers: after this process's trial, another worker's trial can be
    the study's newest. The saved critic must be this trial's, saved only when this trial is the best."""
    from sweeper.objective import Objective

    spec, storage, tracking = _in_process(tmp_path, n_trials=1, save_best_checkpoint=True)
    sweep = Sweep.init(spec, storage, tracking)
    study, tracker, parent_id = sweep.study, sweep.tracker, sweep.parent_id
    completed = []
    objective = Objective(sweep, on_complete=lambda number, result: completed.append((number, result)))
    study.optimize(objective, n_trials=1)  # trial 0, the baseline, in this process
    mine = study.trials[0]
    other = optuna.trial.create_trial(params=mine.params, distributions=mine.distributions,
                                      value=mine.value + (0.01 if other_is_better else -0.01))
    study.add_trial(other)  # trial 1: another worker's, finished after mine; its critic is not in this process
    [(number, result)] = completed
    sweep.save_best_critic(number, result)

    parent = tracker.client.get_run(parent_id)
    saved = [a.path for a in tracker.client.list_artifacts(parent_id, "best_checkpoint")]
    if other_is_better:  # the best critic lives in the other worker: nothing here is saved under its number
        assert "best.checkpoint_trial" not in parent.data.tags and not saved
    else:  # this trial is the best although it is not the newest: its critic is saved, named after it
        assert parent.data.tags["best.checkpoint_trial"] == "0" and "best_checkpoint/config.json" in saved


def test_a_worker_attaches_to_the_sweep_init_made_and_confirmation_shares_its_run(tmp_path):
    """One handle per study: what `init` made (study, spec, experiment, study run) is what a worker gets back from
    the storage alone, and a confirmation study is the same sweep on another study."""
    spec, storage, tracking = _in_process(tmp_path)
    made = Sweep.init(spec, storage, tracking)
    joined = Sweep.attach(storage, made.study.study_name, tracking, worker_index=1)
    assert (joined.study.study_name, joined.parent_id, joined.storage_url) == ("tiny", made.parent_id, storage)
    assert joined.spec.cfg == made.spec.cfg and joined.spec.entries == made.spec.entries
    assert joined.tracker.experiment_id == made.tracker.experiment_id
    assert Sweep.load(made.study, tracking, storage).parent_id == made.parent_id
    confirm = optuna.create_study(study_name="tiny.confirm", storage=storage)
    on = made.on(confirm)
    assert on.study is confirm and on.tracker is made.tracker and on.parent_id == made.parent_id
    assert made.study.study_name == "tiny"  # the search's handle is unchanged
    assert made.tracker.client.get_run(made.parent_id).info.status == "RUNNING"
    made.end("FINISHED")
    assert made.tracker.client.get_run(made.parent_id).info.status == "FINISHED"


def test_a_trials_history_artifact_is_its_results_history_of_every_step(tmp_path):
    """TrialResult carries the training history it streamed; the trial's run stores exactly that (history.json)."""
    from sweeper.objective import Objective

    spec, storage, tracking = _in_process(tmp_path, n_trials=1)
    sweep = Sweep.init(spec, storage, tracking)
    completed = []
    sweep.study.optimize(Objective(sweep, on_complete=lambda n, result: completed.append(result)), n_trials=1)
    [result] = completed
    steps = int(result.metrics["train/steps"])
    assert [step for step, _ in result.train_history] == list(range(1, steps + 1))
    assert all("critic/loss" in metrics for _, metrics in result.train_history)
    run_id = sweep.study.trials[0].user_attrs["mlflow_run_id"]
    stored = json.loads(sweep.tracker.download(run_id, "history.json", tmp_path / "dl").read_text())
    assert stored["train"] == json.loads(json.dumps(result.train_history))
    assert stored["eval"] == json.loads(json.dumps(result.eval_history))
