"""MLflow: one experiment per study, a run for the study, a run per trial.

Search trials are top-level runs (tagged `sweep.study` and `sweep.parent_run_id`) so that MLflow's chart
view draws them without any click; confirmation runs are nested under the study's run. See runs_view.py.

Everything goes through `MlflowClient` with explicit run ids (no fluent
active-run state), so several trials, threads or processes never mix runs.
Metrics are buffered and written with `log_batch` at evaluations and at the
end, so tracking does not stall training.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from critic.reporting import Reporter
from sweeper.outage import DEFAULT_WINDOW_S
from sweeper.runs_view import SORT_TAG, charts_link, sort_key
from sweeper.stores import artifact_root, mask
from sweeper.tracking_outage import patient_client

DATASET_FIELDS = ("name", "digest", "source_type", "source", "schema", "profile")  # of Dataset.to_dict()

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch
MAX_PARAM_LENGTH = 6000


def now_ms() -> int:
    return int(time.time() * 1000)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """The MLflow side of a study: experiment, parent run, child runs."""

    def __init__(self, tracking_uri: str, experiment_name: str, outage_s: float = DEFAULT_WINDOW_S) -> None:
        """`outage_s`: how long a call waits out a tracking server that is away (sweeper/tracking_outage.py)."""
        self.tracking_uri = tracking_uri
        self.client = patient_client(MlflowClient(tracking_uri=tracking_uri), tracking_uri, outage_s)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment_name, artifact_location=_artifact_location(tracking_uri, experiment_name))
            except mlflow.exceptions.MlflowException:  # another worker created it first
                self.experiment_id = self.client.get_experiment_by_name(experiment_name).experiment_id
        else:
            self.experiment_id = experiment.experiment_id

    def ui_link(self, base: str = "http://127.0.0.1:5000") -> str:
        return charts_link(base, self.experiment_id)

    def find_parent(self, study_name: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`sweep.role` = 'parent' and "
                                                     f"tags.`sweep.study` = '{study_name}'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def parent_run(self, study_name: str, tags: dict[str, str]) -> str:
        """The study's parent run: found by tag (a resumed study reuses it) or created."""
        run_id = self.find_parent(study_name)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=study_name,
                                         tags={"sweep.role": "parent", "sweep.study": study_name,
                                               SORT_TAG: sort_key("parent"), **tags})
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, SORT_TAG, sort_key("parent"))  # a study run from before the sort key
        return run_id

    def child_run(self, parent_id: str, trial_number: int, tags: dict[str, Any], run_name: str | None = None,
                  nested: bool = False) -> str:
        """A trial's run: top-level (linked by tags) unless `nested`, which puts it under the study's run."""
        link = {"mlflow.parentRunId": parent_id} if nested else {}
        run = self.client.create_run(self.experiment_id, run_name=run_name or f"trial-{trial_number:03d}",
                                     tags={**link, "sweep.parent_run_id": parent_id, "sweep.role": "trial",
                                           "sweep.trial": str(trial_number), **{k: str(v) for k, v in tags.items()}})
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, mask(json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:MAX_PARAM_LENGTH])
                 for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        items = [RunTag(k, mask(str(v))) for k, v in tags.items()]
        if items:
            self.client.log_batch(run_id, tags=items)

    def log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for start in range(0, len(metrics), MAX_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + MAX_BATCH])

    def log_datasets(self, run_id: str, frames: dict[str, tuple[pd.DataFrame, str, str]]) -> None:
        """frames: name -> (sample frame, source path, digest), logged as dataset inputs."""
        import warnings
        inputs = []
        for name, (frame, source, digest) in frames.items():
            with warnings.catch_warnings():  # MLflow registers its local-file source twice ("" and "file://")
                # and warns on every path that either could read; both are the same class, so nothing is ambiguous
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                fields = mlflow.data.from_pandas(frame, source=mask(source), name=name, digest=digest).to_dict()
            entity = Dataset(**{key: fields.get(key) for key in DATASET_FIELDS})
            inputs.append(DatasetInput(entity,
                                       tags=[InputTag("mlflow.data.context", "train" if name == "train" else "eval")]))
        if inputs:
            try:
                self.client.log_inputs(run_id, datasets=inputs)
            except mlflow.exceptions.MlflowException:
                # Runs that finish together log the same dataset at once and race on MLflow's get-or-create of its
                # row (a tracking server on PostgreSQL answers the loser with a UniqueViolation, and the loser's
                # whole request is rolled back); the row exists now, so the same request links this run to it.
                self.client.log_inputs(run_id, datasets=inputs)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_file(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_dir)

    def log_dir(self, run_id: str, path: Path, artifact_dir: str) -> None:
        self.client.log_artifacts(run_id, str(path), artifact_dir)

    def log_frame(self, run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            if artifact_file.endswith(".csv"):
                frame.to_csv(path, index=False)
            else:
                frame.to_parquet(path, index=False)
            self.log_file(run_id, path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def end(self, run_id: str, status: str) -> None:
        """Close a run: FINISHED, FAILED or KILLED (never leave it RUNNING)."""
        try:
            self.client.set_terminated(run_id, status=status)
        except mlflow.exceptions.MlflowException:
            pass


def _artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    root = artifact_root(tracking_uri)
    if root is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment_name)
    return str(Path(root) / safe)


class MlflowReporter(Reporter):
    """Buffers the engine's metrics for one child run; flushes at evaluations and at close."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker, self.run_id = tracker, run_id
        self.buffer: list[Metric] = []
        self.train_history: list[tuple[int, dict[str, float]]] = []
        self.eval_history: list[tuple[int, dict[str, float]]] = []

    def _add(self, step: int, metrics: dict[str, float]) -> None:
        stamp = now_ms()
        self.buffer.extend(Metric(k, float(v), stamp, step) for k, v in metrics.items())

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        self.train_history.append((step, dict(metrics)))
        self._add(step, metrics)
        if len(self.buffer) >= 5 * MAX_BATCH:
            self.flush()

    def log_eval(self, step: int, metrics: dict[str, float], pair_scores=None, final: bool = False) -> None:
        self.eval_history.append((step, dict(metrics)))
        self._add(step, metrics)
        self.flush()

    def flush(self) -> None:
        if self.buffer:
            batch, self.buffer = self.buffer, []
            self.tracker.log_metrics(self.run_id, batch)
