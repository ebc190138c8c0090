"""The study report and the dashboard: a real tiny sweep (CLI, SQLite stores, tiny critics), then its report."""

from __future__ import annotations

import html
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from sweeper.commands import main as sweep_main
from sweeper.confirm_stage import format_table
from sweeper.report import STYLE, curves_figure, objective_figure, render
from sweeper.report_data import MAX_POINTS, gather
from tests.sweep_helpers import ROOT, cli, mlflow_uri, store_args, tiny_sweep_spec


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """2 search trials and a 1-finalist x 2-seed confirmation; the dashboard starts first (its start-up overlaps)."""
    folder = tmp_path_factory.mktemp("report")
    spec = tiny_sweep_spec(folder, n_pairs=80, extra={"train": {"max_steps": 4}},
                           sweep={"n_trials": 2,
                                  "confirm": {"top_k": 1, "seeds": 2, "max_seeds": 2, "n_resamples": 100}})
    port = _free_port()
    dashboard = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "dashboard", "--storage",
                                  store_args(folder)[1], "--port", str(port)], cwd=folder,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run = cli("run", str(spec), *store_args(folder), "--no-progress", cwd=folder)
        assert run.returncode == 0, run.stderr[-3000:]
        study = optuna.load_study(study_name="tiny", storage=store_args(folder)[1])
        yield {"folder": folder, "run": run, "study": study, "port": port, "dashboard": dashboard,
               "client": MlflowClient(store_args(folder)[3])}
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


def _parent(client: MlflowClient, study: optuna.Study):
    return client.get_run(study.user_attrs["mlflow_parent_run_id"])


def test_run_writes_the_report_beside_the_stores_and_on_the_parent_run(swept):
    path = swept["folder"] / "tiny-report.html"
    assert path.is_file() and f"[sweep] report: {path}" in swept["run"].stdout
    artifacts = {a.path for a in swept["client"].list_artifacts(_parent(swept["client"], swept["study"]).info.run_id,
                                                                "report")}
    assert "report/tiny-report.html" in artifacts
    assert "Confirmation on confirm/d_acc" in swept["run"].stdout and "id='verdict'" in path.read_text()
    assert "scored on the confirmation split" in path.read_text()  # the report says which pairs


def test_report_is_self_contained_with_curves_objective_and_stored_numbers(swept, capsys):
    out = swept["folder"] / "again" / "report.html"
    assert sweep_main(["report", *store_args(swept["folder"]), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    assert page.count("Plotly.newPlot") >= 4  # objective, two curve figures, at least the parallel coordinates
    assert '<script src="http' not in page and "<script src=" not in page  # opens offline: nothing fetched
    from plotly.offline import get_plotlyjs
    assert page.count(get_plotlyjs()[:200]) == 1  # plotly.js inlined once

    study = swept["study"]
    best, baseline = study.best_trial, next(t for t in study.trials if t.user_attrs.get("baseline"))
    best_metrics, base_metrics = json.loads(best.user_attrs["metrics"]), json.loads(baseline.user_attrs["metrics"])
    for key in best_metrics:  # the same numbers `run` prints, in the same format
        row = f"<tr><th>{key}</th><td>{best_metrics[key]:.4f}</td><td>{base_metrics[key]:.4f}</td></tr>"
        assert row in page, key
    confirmation = json.loads(study.user_attrs["confirmation"])
    assert html.escape(format_table(confirmation)) in page and html.escape(confirmation["verdict"]) in page

    data = gather(study, swept["client"])
    assert data.train_keys == ["critic/avg_d_acc", "critic/avg_loss", "critic/avg_score_diff",  # the trend first
                               "critic/d_acc", "critic/loss", "critic/score_diff"]
    assert data.heldout_keys == ["val/d_acc", "val/score_diff", "shifted/d_acc"]
    heldout = curves_figure(data, data.heldout_keys, "held-out")
    val = [t for t in heldout.data if t.meta["metric"] == "val/d_acc"]
    search = [t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.meta["trial"] for t in val) == search  # one line per trial, confirmation runs not mixed in
    (base_line,) = [t for t in val if t.meta["trial"] == baseline.number]
    assert base_line.line.color == "black" and base_line.line.width == STYLE["baseline"][2]
    assert base_line.name == f"baseline (trial {baseline.number})" and base_line.showlegend
    history = swept["client"].get_metric_history(study.trials[0].user_attrs["mlflow_run_id"], "val/d_acc")
    assert list(base_line.y) == pytest.approx([m.value for m in sorted(history, key=lambda m: m.step)], abs=1e-6)

    objective = objective_figure(data)
    (running,) = [t for t in objective.data if t.meta["kind"] == "running_best"]
    assert running.y[-1] == pytest.approx(study.best_value)


def test_dashboard_serves_the_study(swept):
    url, deadline = f"http://127.0.0.1:{swept['port']}/api/studies", time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
            break
        except OSError:
            assert swept["dashboard"].poll() is None, swept["dashboard"].stdout.read()[-2000:]
            assert time.time() < deadline, "the dashboard did not answer within 120 s"
            time.sleep(0.5)
    assert "tiny" in {s["study_name"] for s in body["study_summaries"]}


def _synthetic_study(storage: str, client: MlflowClient, n_trials: int, steps: int) -> optuna.Study:
    """Trials with MLflow histories but no training: complete, pruned and failed, the first the baseline."""
    experiment = client.create_experiment("synthetic")
    study = optuna.create_study(study_name="synthetic", storage=storage, direction="maximize")
    study.set_user_attr("mlflow_experiment_id", experiment)
    study.set_user_attr("spec", json.dumps({"sweep": {"objective": "val/d_acc", "search_space": {"train.lr": {}}}}))
    space = {"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}
    for number in range(n_trials):
        trial = study.ask(space)
        run = client.create_run(experiment, tags={"sweep.role": "trial", "sweep.study": "synthetic",
                                                  "sweep.trial": str(number)}).info.run_id
        level = 0.5 + 0.4 * number / n_trials
        client.log_batch(run, metrics=[Metric(key, level + math.sin(step) / 10, 0, step) for step in range(steps)
                                       for key in ("critic/d_acc", "val/d_acc")])
        if number == 0:
            trial.set_user_attr("baseline", True)
        state = [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                 optuna.trial.TrialState.FAIL][0 if number == 0 else number % 3]
        if state == optuna.trial.TrialState.COMPLETE:
            trial.set_user_attr("metrics", json.dumps({"val/d_acc": level}))
        study.tell(trial, level if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    return study


def test_many_long_trials_stay_readable_and_small(swept):
    storage = f"sqlite:///{swept['folder'] / 'synthetic.db'}"
    study = _synthetic_study(storage, swept["client"], n_trials=12, steps=MAX_POINTS + 30)
    data = gather(study, swept["client"])
    figure = curves_figure(data, data.heldout_keys, "held-out")
    assert len(figure.data) == 12 and all(len(t.x) == MAX_POINTS for t in figure.data)  # binned, one line each
    assert {t.type for t in figure.data} == {"scattergl"}
    legend = sorted(t.name for t in figure.data if t.showlegend)
    assert legend == ["baseline (trial 0)", "best (trial 9)", "complete", "failed", "pruned"]  # one entry per kind
    opacity = {t.meta["kind"]: t.opacity for t in figure.data}
    assert opacity["pruned"] < opacity["complete"] < opacity["baseline"] and opacity["failed"] < opacity["complete"]
    page = render(study, data)
    from plotly.offline import get_plotlyjs
    # Curves as float32 binary (plotly's base64 arrays): 12 trials x 2 metrics x 150 points in under 0.15 MB.
    assert len(page) - len(get_plotlyjs()) < 150_000, len(page) - len(get_plotlyjs())


def test_a_report_that_cannot_be_built_warns_and_tags_the_parent_run(swept, tmp_path, capsys):
    from sweeper.report import report_quietly
    from sweeper.sweep import Sweep
    from sweeper.tracking import Tracker
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the report's folder would have to be created here
    study = swept["study"]
    tracker = Tracker(store_args(swept["folder"])[3], study.study_name)
    parent_id = study.user_attrs["mlflow_parent_run_id"]
    report_quietly(Sweep(study, None, tracker, parent_id, f"sqlite:///{blocker / 'optuna.db'}"))  # no spec needed
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: the report could not be built" in err
    assert "report.error" in swept["client"].get_run(parent_id).data.tags


def test_curves_come_from_the_sql_stores_bulk_query_and_equal_the_per_run_path(tmp_path):
    """The report reads curves with one query per 500 runs (bulk_history_reader, a private MLflow path): it is taken
    on a SQL store, and gives what the public per-run calls give."""
    from sweeper.report_data import bulk_history_reader, metric_histories

    client = MlflowClient(mlflow_uri(tmp_path))
    experiment = client.create_experiment("curves")
    run_ids = []
    for run in range(3):
        run_id = client.create_run(experiment).info.run_id
        client.log_batch(run_id, metrics=[Metric("val/d_acc", 0.5 + run / 10 + step / 100, 0, step)
                                          for step in (20, 0, 10)])  # out of order: sorted on read
        run_ids.append(run_id)
    assert bulk_history_reader(client) is not None  # fails when MLflow moves or renames it
    fast = metric_histories(client, run_ids, "val/d_acc")
    public = {r: sorted((m.step, m.value) for m in client.get_metric_history(r, "val/d_acc")) for r in run_ids}
    assert fast == public and [step for step, _ in fast[run_ids[0]]] == [0, 10, 20]
