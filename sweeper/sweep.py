"""The sweep handle: a study with its spec, its MLflow experiment and study run, and its storage.

What `optuna.Study` is to a storage, a sampler and a pruner, `Sweep` is to the
orchestration: the five values every stage needs travel as one object. It is
built once, by `Sweep.init` (create or resume: schema, study, MLflow experiment,
study run) or `Sweep.attach` (a worker joining by name), and each stage is a
method that hands it to the module that does the work: trials (runner.py), the
parent run's summaries (parent.py), worker processes (workers.py), the
confirmation (confirm_stage.py), the report (report.py). Those modules take the handle as an argument and never import
this one, so dependencies point one way. MLflow is reached through `tracker` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna

from critic.config import SpecError
from sweeper.board import best_trials, trial_params
from sweeper.candidates import enqueue_candidates
from sweeper.outage import fail_left_trials
from sweeper.pruning import make_pruner
from sweeper.stores import StorageLock, make_storage, mask
from sweeper.study import SweepSpec, config_for, fingerprint, fingerprint_differs, make_sampler, run_tags, stored_spec
from sweeper.tracking import BEST_CHECKPOINT_ARTIFACT, CHECKPOINT_TAG, Tracker, TrackingError

if TYPE_CHECKING:
    from critic.trial import TrialResult


@dataclass
class Sweep:
    study: optuna.Study
    spec: SweepSpec
    tracker: Tracker  # the study's MLflow experiment (a confirmation study's: its search study's)
    parent_id: str  # the study's MLflow run: trials link to it, summaries and the report go on it
    storage_url: str  # locked while a trial is claimed (sweeper/stores.py StorageLock); workers join it

    @classmethod
    def init(cls, spec: SweepSpec, storage_url: str, tracking_uri: str, study_name: str | None = None,
             new_study: bool = False, stale_trial_callback=None) -> Sweep:
        """Create (or check and resume) the study, the MLflow experiment and the study run. Run once, before
        workers; N `run`s started at once take turns: one creates everything, the others resume it."""
        with StorageLock(storage_url):
            storage = make_storage(storage_url, spec.cfg.sweep.heartbeat_interval, spec.cfg.sweep.grace_period,
                                   stale_trial_callback, spec.cfg.sweep.outage_window_s)
            name = _resumable_name(storage, spec, study_name or spec.cfg.sweep.study_name, new_study)
            study = optuna.create_study(study_name=name, storage=storage, directions=spec.cfg.sweep.directions,
                                        sampler=make_sampler(spec), pruner=make_pruner(spec.cfg),
                                        load_if_exists=True)
            tracker = Tracker(tracking_uri, name, spec.cfg.sweep.outage_window_s)
            sweep = cls(study, spec, tracker, tracker.parent_run(name, run_tags(spec, name)), storage_url)
            fail_left_trials(study, storage_url, stale_trial_callback)  # a worker stopped on an outage: fail them now
            if "fingerprint" not in study.user_attrs:
                sweep._record_setup()
            return sweep

    @classmethod
    def attach(cls, storage_url: str, study_name: str, tracking_uri: str, worker_index: int = 0,
               stale_trial_callback=None) -> Sweep:
        """Load an initialised study (a worker's view); never creates anything but the tracker client."""
        probe = make_storage(storage_url)
        names = [s.study_name for s in optuna.get_all_study_summaries(probe, include_best_trial=False)]
        if study_name not in names:
            raise SpecError(f"study {study_name!r} not found in {mask(storage_url)}; run `sweep.py init SPEC "
                            f"--storage URL` (or `sweep.py run`) first. Existing studies: {names or 'none'}")
        stored = optuna.load_study(study_name=study_name, storage=probe)
        spec, attrs = stored_spec(stored), stored.user_attrs
        storage = make_storage(storage_url, spec.cfg.sweep.heartbeat_interval, spec.cfg.sweep.grace_period,
                               stale_trial_callback, spec.cfg.sweep.outage_window_s)
        confirming = "confirm_of" in attrs  # every confirmation trial is enqueued; none may be pruned
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(spec, worker_index),
                                  pruner=optuna.pruners.NopPruner() if confirming else make_pruner(spec.cfg))
        # confirmation runs join the search's experiment
        tracker = Tracker(tracking_uri, attrs.get("confirm_of", study_name), spec.cfg.sweep.outage_window_s)
        fail_left_trials(study, storage_url, stale_trial_callback)  # a worker stopped on an outage: fail them now
        return cls(study, spec, tracker, attrs["mlflow_parent_run_id"], storage_url)

    @classmethod
    def load(cls, study: optuna.Study, tracking_uri: str, storage_url: str) -> Sweep:
        """A study loaded as it is (`confirm` on a finished search): its stored spec, experiment and study run."""
        spec = stored_spec(study)
        return cls(study, spec, Tracker(tracking_uri, study.study_name, spec.cfg.sweep.outage_window_s),
                   study.user_attrs["mlflow_parent_run_id"], storage_url)

    def _record_setup(self) -> None:
        """A new study: what workers and resumes need, in its user attrs; the baseline and candidates queued."""
        study, spec = self.study, self.spec
        study.set_user_attr("fingerprint", fingerprint(spec))
        study.set_user_attr("spec", mask(json.dumps(spec.raw, default=str)))  # credentials come from env
        study.set_user_attr("spec_source", spec.source)
        study.set_user_attr("mlflow_parent_run_id", self.parent_id)
        study.set_user_attr("mlflow_experiment_id", self.tracker.experiment_id)
        if spec.cfg.sweep.baseline:
            study.enqueue_trial(spec.cfg.sweep.baseline, user_attrs={"baseline": True})
        enqueue_candidates(study, spec.candidates)  # right after the baseline
        self.tracker.log_params(self.parent_id, {"study": study.study_name, "n_trials": spec.cfg.sweep.n_trials,
                                                 "storage": mask(self.storage_url),
                                                 "search_space": spec.cfg.sweep.search_space})

    def on(self, study: optuna.Study) -> Sweep:
        """The same sweep on another study of its storage (its `<study>.confirm`), sharing the run and tracker."""
        return dataclasses.replace(self, study=study)

    def run_trials(self, n_trials: int | None = None, progress: bool = True, plan=None) -> None:
        """Trials in this process until the plan (default: n_trials, the spec's, finished trials) is done."""
        from sweeper.runner import run_trials
        run_trials(self, self.spec.cfg.sweep.n_trials if n_trials is None else n_trials, progress, plan=plan)

    def launch_workers(self, n_workers: int, progress: bool = True, plan=None, launch=None) -> None:
        """Trials in `n_workers` launched workers until the plan is done: `launch` (sweeper/cluster.py: Ray tasks, a
        Slurm job array), by default processes on this machine (sweeper/workers.py)."""
        if launch is None:
            from sweeper.workers import launch_workers as launch
        launch(self, n_workers, progress, plan)

    def run(self, workers: int = 1, progress: bool = True, launch=None) -> None:
        """The search: in this process, or in `workers` launched workers (`launch`, sweeper/cluster.py
        make_launcher; None with workers > 1: processes on this machine)."""
        if launch is not None or workers > 1:
            self.launch_workers(workers, progress, launch=launch)
        else:
            self.run_trials(progress=progress)

    def confirm(self, top_k: int, seeds: int, trial_numbers: list[int] | None = None, workers: int = 1,
                progress: bool = True, max_seeds: int | None = None, launch=None) -> dict[str, Any]:
        """The confirmation stage (sweeper/confirm_stage.py): its result, also stored on the study and its run.
        `launch`: as for `run`."""
        from sweeper.confirm_stage import run_confirmation
        return run_confirmation(self, top_k, seeds, trial_numbers, workers, progress, max_seeds, launch)

    def finish(self) -> None:
        """Leaderboard, best trials and Optuna's plots on the study run."""
        from sweeper.parent import finish_parent
        finish_parent(self)

    def report(self) -> None:
        """The HTML report, written beside the stores and logged on the study run; a failure is a warning."""
        from sweeper.report import report_quietly
        report_quietly(self)

    def save_best_critic(self, trial_number: int, result: TrialResult) -> None:
        """sweep.save_best_checkpoint: trial `trial_number`'s critic (`result`, in this process) on the study run,
        if that trial is now the study's best. With several workers the study's newest trial can be another
        worker's, whose critic is not here: so the trial is named, not taken to be the newest. Workers take turns
        (the storage's lock) from that check to the tag, so two saves never mix their files. While the folder
        changes, CHECKPOINT_TAG names no trial: readers (diagnose, export) trust the folder only for the trial it
        names, so a save that fails half-way (a full disk) leaves nothing they would trust."""
        if not self.spec.cfg.sweep.save_best_checkpoint or result.model is None:
            return
        with StorageLock(self.storage_url):
            best = best_trials(self.study)  # COMPLETE trials only
            if not best or best[0].number != trial_number:
                return
            cfg = config_for(self.spec, trial_params(best[0]), "best trial")
            try:
                self.tracker.set_tags(self.parent_id, {CHECKPOINT_TAG: f"saving trial {trial_number}"})
                self.tracker.log_checkpoint(self.parent_id, result, cfg, BEST_CHECKPOINT_ARTIFACT)
                self.tracker.set_tags(self.parent_id, {CHECKPOINT_TAG: trial_number})
            except (OSError, TrackingError) as exc:  # the trial keeps its result; the sweep goes on
                print(f"[sweep] best checkpoint (trial {trial_number}) not saved: {exc}", file=sys.stderr,
                      flush=True)
                with contextlib.suppress(OSError, TrackingError):
                    self.tracker.set_tags(self.parent_id,
                                          {CHECKPOINT_TAG: f"none: trial {trial_number}'s not saved ({exc})"})

    def resume(self) -> None:
        """The study run is RUNNING again while this process works on it."""
        self.tracker.resume(self.parent_id)

    def end(self, status: str) -> None:
        """Close the study run: FINISHED, FAILED or KILLED."""
        self.tracker.end(self.parent_id, status)


def _resumable_name(storage, spec: SweepSpec, name: str, new_study: bool) -> str:
    """`name`, unless a study of that name holds incomparable trials: refused, or with --new-study a fresh name."""
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name not in existing:
        return name
    old = existing[name].user_attrs.get("fingerprint")
    if old is not None and fingerprint_differs(old, spec) and not new_study:
        raise SpecError(
            f"study {name!r} already exists with a different objective, direction, search space or data "
            f"split (stored: objective={old['objective']}, direction={old['direction']}, split="
            f"{old.get('split', 'not recorded')}). Resuming it would mix "
            f"incomparable trials. Pass --new-study to start a fresh study, or --study NAME to pick another "
            f"name.")
    if new_study:
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"[sweep] starting a new study {name!r}")
    return name
