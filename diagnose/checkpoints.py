"""Where a diagnosed critic comes from and where its report goes: checkpoints saved as MLflow artifacts."""

from __future__ import annotations

import tempfile
from pathlib import Path

from critic.config import SpecError


def trial_candidates(study, trial_number: int, client) -> list[tuple[str, str]]:
    """(run id, artifact) that may hold trial N's critic: its own `checkpoint` (a COMPLETE trial's), or the parent
    run's `best_checkpoint` when N is the trial it holds."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.number == trial_number]
    if not trials or "mlflow_run_id" not in trials[0].user_attrs:
        raise SpecError(f"trial {trial_number} of study {study.study_name!r} has no MLflow run; "
                        f"pick a trial from `sweep.py status`")
    # Only a COMPLETE trial's checkpoint is whole: a trial whose artifacts failed half-way (a full disk) is FAIL,
    # and MLflow copies a folder file by file.
    complete = trials[0].state.name == "COMPLETE"
    candidates = [(trials[0].user_attrs["mlflow_run_id"], "checkpoint")] if complete else []
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent and client.get_run(parent).data.tags.get("best.checkpoint_trial") == str(trial_number):
        candidates.append((parent, "best_checkpoint"))
    return candidates


def download_checkpoint(client, candidates: list[tuple[str, str]], what: str) -> tuple[Path, str]:
    """The first candidate artifact that exists, downloaded to a temp folder; and its run id."""
    for run_id, artifact in candidates:
        if any(a.path == artifact for a in client.list_artifacts(run_id)):
            target = Path(tempfile.mkdtemp(prefix="diagnose-"))
            local = client.download_artifacts(run_id, artifact, str(target))
            return Path(local), run_id
    raise SpecError(f"{what} has no saved critic; rerun it with --set train.save_checkpoint=true "
                    f"(or sweep.save_best_checkpoint: true for the best trial)")
