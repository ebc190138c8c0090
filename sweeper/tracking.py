"""MLflow: one experiment per study, a run for the study, a run per trial.

Search trials are top-level runs (tagged `sweep.study` and `sweep.parent_run_id`) so that MLflow's chart
view draws them without any click; confirmation runs are nested under the study's run. See runs_view.py.

Everything goes through `MlflowClient` with explicit run ids (no fluent
active-run state), so several trials, threads or processes never mix runs.
Metrics are buffered and written with `log_batch` at evaluations and at the
end, so tracking does not stall training. Orchestration reaches MLflow only
through `Tracker`; what a trial's run holds is written by `log_trial_result`
(its artifact layout is below), and the study's best critic by `log_checkpoint`.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from critic.reporting import Reporter
from sweeper.outage import DEFAULT_WINDOW_S
from sweeper.runs_view import SORT_TAG, charts_link, sort_key
from sweeper.stores import artifact_root, mask
from sweeper.tracking_outage import patient_client

if TYPE_CHECKING:
    from critic.config import ExperimentConfig
    from critic.trial import TrialResult

DATASET_FIELDS = ("name", "digest", "source_type", "source", "schema", "profile")  # of Dataset.to_dict()

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch
MAX_PARAM_LENGTH = 6000
TrackingError = mlflow.exceptions.MlflowException  # what a failed call to the tracking store raises

# A trial run's artifacts (the confirmation stage reads the scores back; `diagnose --trial` and `export --weights`
# download the checkpoint, or the study run's best checkpoint: diagnose/checkpoints.py)
SCORES_ARTIFACT = "scores/heldout_pair_scores.parquet"  # one row per held-out pair at the final evaluation
CHECKPOINT_ARTIFACT = "checkpoint"  # the trial's critic, with train.save_checkpoint
BEST_CHECKPOINT_ARTIFACT = "best_checkpoint"  # on the study's run, with sweep.save_best_checkpoint
CHECKPOINT_TAG = "best.checkpoint_trial"  # on the study's run: the trial whose critic BEST_CHECKPOINT_ARTIFACT holds
# train/* summaries and model sizes, logged once at the trial's last step (and kept on the Optuna trial)
SUMMARY_KEYS = ("train/progressive_d_acc", "train/gap_progressive_minus_val", "train/steps",
                "model/trainable_params", "model/trainable_fraction")


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
    """The MLflow side of a study: experiment, parent run, child runs.

    Without `experiment_name` only calls on existing runs work (closing a dead worker's run, downloading artifacts).
    """

    def __init__(self, tracking_uri: str, experiment_name: str | None = None,
                 outage_s: float = DEFAULT_WINDOW_S) -> None:
        """`outage_s`: how long a call waits out a tracking server that is away (sweeper/tracking_outage.py)."""
        self.tracking_uri = tracking_uri
        self.client = patient_client(MlflowClient(tracking_uri=tracking_uri), tracking_uri, outage_s)
        self.experiment_id: str | None = None
        if experiment_name is None:
            return
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
            self.resume(run_id)
            self.client.set_tag(run_id, SORT_TAG, sort_key("parent"))  # a study run from before the sort key
        return run_id

    def resume(self, run_id: str) -> None:
        """Mark a run RUNNING again (the study's run while a worker or the confirmation works on it)."""
        self.client.update_run(run_id, status="RUNNING")

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

    def download(self, run_id: str, artifact: str, folder: Path) -> Path:
        """One artifact of a run, downloaded into `folder`; its local path."""
        return Path(self.client.download_artifacts(run_id, artifact, str(folder)))

    def end(self, run_id: str, status: str) -> None:
        """Close a run: FINISHED, FAILED or KILLED (never leave it RUNNING)."""
        try:
            self.client.set_terminated(run_id, status=status)
        except mlflow.exceptions.MlflowException:
            pass

    def fail_dead(self, run_id: str, reason: str) -> None:
        """Close the run of a trial whose worker died: FAILED, with the reason; raises TrackingError."""
        self.client.set_tag(run_id, "sweep.fail_reason", reason)
        self.client.set_tag(run_id, "sweep.state", "FAIL")
        self.client.set_terminated(run_id, status="FAILED")

    def log_trial_result(self, run_id: str, cfg: ExperimentConfig, result: TrialResult) -> None:
        """A finished trial's records on its run: data digests and lineage (tags), data files (dataset inputs),
        SUMMARY_KEYS and timings (metrics), config, figures, scores and history (artifacts), and with
        train.save_checkpoint its critic."""
        digests = {f"data.digest.{name}": digest for name, digest in result.data_digests.items()}
        self.set_tags(run_id, {**digests, **result.lineage})
        self._log_trial_datasets(run_id, cfg, result)
        summary = {k: result.metrics[k] for k in SUMMARY_KEYS if k in result.metrics}
        last_step = int(result.metrics["train/steps"])
        self.log_metrics(run_id, [Metric(k, float(v), now_ms(), last_step) for k, v in summary.items()]
                         + [Metric(f"timing/{k}", float(v), now_ms(), 0) for k, v in result.timings.items()])
        self._log_trial_artifacts(run_id, cfg, result)

    def log_checkpoint(self, run_id: str, result: TrialResult, cfg: ExperimentConfig, artifact_dir: str) -> None:
        """The trial's critic as a Hugging Face checkpoint (AutoModelForTokenClassification) plus its spec, curves
        and metrics (critic/checkpoint.py), under `artifact_dir` of the run."""
        from critic.checkpoint import save_trial_checkpoint
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_trial_checkpoint(result, cfg, result.train_history, Path(tmp) / artifact_dir)
            self.log_dir(run_id, folder, artifact_dir)

    def _log_trial_datasets(self, run_id: str, cfg: ExperimentConfig, result: TrialResult) -> None:
        """Each data file as an MLflow dataset input with its digest (val and confirm are splits of the train file)."""
        from critic.config import CONFIRM_SET
        from critic.data import resolve_path
        splits = ["val", *([CONFIRM_SET] if cfg.eval.confirm_split else [])]
        specs = {"train": cfg.data.train_path, **{name: cfg.data.train_path for name in splits}, **cfg.data.eval_sets}
        frames = {}
        for name, digest in {**{s: result.data_digests.get("train", "") for s in splits},
                             **result.data_digests}.items():
            path = str(resolve_path(specs[name], cfg.data.cache_dir))  # demo:<name> -> its parquet file
            frames[name] = (pd.DataFrame({"path": [path], "digest": [digest]}), path, digest)
        self.log_datasets(run_id, frames)

    def _log_trial_artifacts(self, run_id: str, cfg: ExperimentConfig, result: TrialResult) -> None:
        import yaml

        from critic.config import to_dict
        from sweeper import figures  # matplotlib: only once a trial has finished
        eval_sets = list(dict.fromkeys(result.pair_scores["set"]))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            self.log_file(run_id, folder / "config.yaml")
            self.log_file(run_id, figures.training_progress(
                result.train_history, result.eval_history, eval_sets, folder / "training_progress.png"), "figures")
            self.log_file(run_id, figures.score_histograms(result.pair_scores, folder / "score_hist.png"), "figures")
            self.log_frame(run_id, result.pair_scores, SCORES_ARTIFACT)
            (folder / "history.json").write_text(json.dumps({"train": result.train_history,
                                                             "eval": result.eval_history}))
            self.log_file(run_id, folder / "history.json")
        if result.model is not None and cfg.train.save_checkpoint:
            self.log_checkpoint(run_id, result, cfg, CHECKPOINT_ARTIFACT)


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

    def _add(self, step: int, metrics: dict[str, float]) -> None:
        stamp = now_ms()
        self.buffer.extend(Metric(k, float(v), stamp, step) for k, v in metrics.items())

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        self._add(step, metrics)
        if len(self.buffer) >= 5 * MAX_BATCH:
            self.flush()

    def log_eval(self, step: int, metrics: dict[str, float], pair_scores=None, final: bool = False) -> None:
        self._add(step, metrics)
        self.flush()

    def flush(self) -> None:
        if self.buffer:
            batch, self.buffer = self.buffer, []
            self.tracker.log_metrics(self.run_id, batch)
