"""The Optuna objective: sample -> build the trial config -> run the engine -> report -> value.

Outcomes: COMPLETE with a finite value; PRUNED by the pruner or by a
non-finite loss (reason recorded); FAIL with its reason (OOM after one retry
with forwards of half the pairs and the same loss, a non-finite objective, an infeasible sampled
combination, any other engine error) while the sweep goes on. A spec or data
error (SpecError) stops the whole sweep at once.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import optuna
import pandas as pd
import torch

from critic.config import ExperimentConfig, SpecError, flatten
from critic.reporting import FanoutReporter, Reporter
from critic.train import NonFiniteError, TrialOutOfMemory
from critic.trial import TrialResult, run_trial
from sweeper import pruning
from sweeper.confirm import confirmation_metric, confirmation_overrides
from sweeper.retry import interrupted, requeue, scheduler_job, worker_id
from sweeper.runs_view import SORT_TAG, confirm_run_name, run_color, run_name, sort_key
from sweeper.signals import defer_signals, raise_if_stop_requested, resume_signals
from sweeper.space import suggest
from sweeper.stores import mask
from sweeper.study import config_for
from sweeper.tracking import SUMMARY_KEYS, MlflowReporter


class TrialFailure(RuntimeError):
    """A trial that failed for a recorded reason; the sweep continues."""


class OptunaReporter(Reporter):
    """Reports the objective at every evaluation and raises TrialPruned, with the pruner's reason, when it says so.

    `report`: single-objective studies only (Optuna's intermediate values); `prune`: whether the pruner may stop
    this trial (never your own configs: the baseline and the candidates run to the end). Every reporting trial
    carries what the pruner needs (sweeper/pruning.py), protected ones too since others are compared with them:
    the first step it may be compared at (its own lr warmup plus one evaluation) and, for the paired test, its
    per-prompt held-out outcomes at each evaluation.
    """

    def __init__(self, trial: optuna.Trial, objective: str, report: bool, prune: bool, cfg: ExperimentConfig) -> None:
        self.trial, self.objective, self.report, self.prune = trial, objective, report, prune
        self.last_step = 0
        self.prompt_values = report and pruning.wants_prompt_values(trial.study.pruner)
        if report:
            trial.set_user_attr(pruning.FROM_STEP_ATTR, pruning.first_comparable_step(cfg))

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        raise_if_stop_requested()  # a signal's KeyboardInterrupt can be lost

    def log_eval(self, step: int, metrics: dict[str, float], pair_scores: pd.DataFrame | None = None,
                 final: bool = False) -> None:
        self.last_step = step
        value = metrics.get(self.objective)
        if not self.report or value is None or not math.isfinite(value):
            return
        if self.prompt_values and pair_scores is not None:
            pruning.record_prompt_values(self.trial, step, pair_scores, self.objective)
        self.trial.report(value, step)
        if self.prune and not final and self.trial.should_prune():  # final: trained to the end, a complete result
            decision = pruning.decision_for(self.trial.study.pruner, self.trial.number)
            if decision is None:  # a pruner built elsewhere (tests)
                decision = pruning.Decision("pruned by the pruner",
                                            f"pruned by the pruner at step {step} ({self.objective}={value:.4f})")
            self.trial.set_user_attr(pruning.CAUSE_ATTR, decision.cause)
            raise optuna.TrialPruned(decision.detail)


def trial_config(raw: dict[str, Any], sampled: dict[str, Any], source: str) -> ExperimentConfig:
    """The resolved config of a trial: base spec + sampled values, validated like any spec."""
    try:
        return config_for(raw, sampled, f"{source} (sampled {sampled})")
    except SpecError as exc:  # e.g. t_min > t_max: this combination is infeasible, not the spec
        raise TrialFailure(f"infeasible sampled combination: {exc}") from None


class Objective:
    """Callable passed to study.optimize; shares the process-level data/model caches across trials.

    `sweep`: the study's handle (sweeper/sweep.py: spec, tracker, study run; not imported here, it imports this).
    `on_complete(trial number, result)`: called with each trial this process completes, whose critic only this
    process holds (the runner saves it when that trial is the study's best: sweep.save_best_checkpoint).
    """

    def __init__(self, sweep, progress: bool = False,
                 on_complete: Callable[[int, TrialResult], None] | None = None) -> None:
        self.raw, self.cfg, self.entries = sweep.spec.raw, sweep.spec.cfg, sweep.spec.entries
        self.tracker, self.parent_run_id = sweep.tracker, sweep.parent_id
        self.tags = {"sweep.study": sweep.study.study_name, "sweep.sampler": self.cfg.sweep.sampler}
        self.progress, self.on_complete = progress, on_complete
        self.names = self.cfg.sweep.objectives
        self.report = len(self.names) == 1  # report even without a pruner: intermediate-value plots use it

    def _names(self, trial: optuna.Trial) -> list[str]:
        """The metrics this trial returns: the objectives; a confirmation run's on the confirmation split."""
        if trial.user_attrs.get("stage") == "confirm":
            return [confirmation_metric(name, self.cfg.data) for name in self.names]
        return self.names

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        run_id: str | None = None  # everything below is inside `try`: an interrupt at any point is recorded
        status, state, started = "FAILED", "FAIL", time.time()
        try:
            extra = trial.user_attrs.get("extra_params", {})  # a candidate's values outside the space: not sampled
            sampled = suggest(trial, self.entries, flatten(self.cfg), fixed=extra)
            confirming = confirmation_overrides(self.cfg, int(trial.user_attrs.get("seed_index", 0)))
            cfg = trial_config(self.raw, {**sampled, **extra, **confirming}, "sweep")
            run_id = self._open_run(trial, cfg, sampled)
            resume_signals()  # signals were deferred since the claim (runner.py): now the run exists to be KILLED
            result = self._run_with_oom_retry(trial, cfg, run_id)
            names = self._names(trial)
            values = [result.metrics.get(name, math.nan) for name in names]
            if not all(math.isfinite(v) for v in values):
                raise TrialFailure(f"non-finite objective {dict(zip(names, values))}")
            defer_signals()  # the outcome is decided: record it whole (runner.run_trials resumes after the tell)
            self._record_success(trial, cfg, run_id, result)
            status, state = "FINISHED", "COMPLETE"
            return values[0] if len(values) == 1 else values
        except optuna.TrialPruned as exc:
            defer_signals()
            status, state = "FINISHED", "PRUNED"
            self._record_reason(trial, run_id, str(exc) or "pruned", "prune_reason")
            raise
        except NonFiniteError as exc:
            defer_signals()
            status, state = "FINISHED", "PRUNED"
            trial.set_user_attr(pruning.CAUSE_ATTR, pruning.NON_FINITE_CAUSE)
            self._record_reason(trial, run_id, str(exc), "prune_reason")
            raise optuna.TrialPruned(str(exc)) from None
        except (SpecError, KeyboardInterrupt) as exc:
            defer_signals()
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self._record_reason(trial, run_id, "interrupted" if status == "KILLED" else str(exc), "fail_reason")
            if status == "KILLED":
                interrupted(trial)
            raise
        except TrialFailure as exc:
            defer_signals()
            self._record_reason(trial, run_id, str(exc), "fail_reason")
            raise
        except Exception as exc:  # an engine error in this trial only: record it, keep sweeping
            defer_signals()
            reason = f"{type(exc).__name__}: {exc}"
            self._record_reason(trial, run_id, reason, "fail_reason")
            raise TrialFailure(reason) from exc
        finally:  # signals stay deferred until the runner has told Optuna; it raises a signal that came meanwhile
            if isinstance(sys.exception(), KeyboardInterrupt):
                status = "KILLED"  # a signal in the instant before an `except` above deferred them
            if run_id is not None:
                self.tracker.set_tags(run_id, {"sweep.state": state, SORT_TAG: self._sort_key(trial, state),
                                               "sweep.duration_s": f"{time.time() - started:.1f}"})
                self.tracker.end(run_id, status)
            gc.collect()

    def _open_run(self, trial: optuna.Trial, cfg: ExperimentConfig, sampled: dict[str, Any]) -> str:
        """The trial's MLflow child run, with the resolved config as params; its id goes to the trial's attrs."""
        stage = trial.user_attrs.get("stage", "search")
        baseline = bool(trial.user_attrs.get("baseline", False))
        candidate = trial.user_attrs.get("candidate")
        tags = {**self.tags, "sweep.sampled_params": ",".join(sampled), "sweep.stage": stage,
                "sweep.baseline": str(baseline).lower(), SORT_TAG: self._sort_key(trial, "RUNNING"),
                "mlflow.runColor": run_color(trial.number, baseline),
                **({"sweep.candidate": candidate} if candidate is not None else {})}
        name = run_name(trial.number, sampled, baseline, candidate)
        if stage == "confirm":
            seed = trial.user_attrs["seed_index"]
            tags.update({"sweep.seed_index": seed, "sweep.confirm_config": trial.user_attrs["confirm_config"],
                         "sweep.confirm_of_trial": trial.user_attrs["config_trial"]})
            name = confirm_run_name(trial.user_attrs["confirm_config"], seed)
        # Before the run exists: a local parent fails the trial at once if this process dies, even while it creates
        # the run; and whoever reads the run id finds the owner beside it.
        trial.set_user_attr("worker", worker_id())
        run_id = self.tracker.child_run(self.parent_run_id, trial.number, tags, run_name=name,
                                        nested=stage == "confirm")
        trial.set_user_attr("mlflow_run_id", run_id)
        job = scheduler_job()
        if job is not None:  # the Slurm task or Ray task holding this worker: `status` shows it
            trial.set_user_attr("job", job)
            self.tracker.set_tags(run_id, {"sweep.job": job})
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        if devices is not None:  # the GPU slot this worker owns (sweeper/slots.py)
            trial.set_user_attr("devices", devices)
            self.tracker.set_tags(run_id, {"sweep.devices": devices})
        trial.set_user_attr("config", mask(json.dumps(flatten(cfg), default=str)))
        params = flatten(cfg, ("data", "model", "score", "loss", "train", "verl", "eval", "student"))
        self.tracker.log_params(run_id, {**params, **{f"sampled/{k}": v for k, v in sampled.items()}})
        return run_id

    def _sort_key(self, trial: optuna.Trial, state: str) -> str:
        """Where the run sits in the runs table (and so whether MLflow's chart view draws it): see runs_view.py."""
        if trial.user_attrs.get("stage", "search") == "confirm":
            return sort_key("confirm")
        if trial.user_attrs.get("baseline", False):
            return sort_key("baseline")
        if trial.user_attrs.get("candidate") is not None:
            return sort_key("candidate", trial.number)
        if state != "COMPLETE":
            return sort_key({"RUNNING": "running", "PRUNED": "pruned"}.get(state, "failed"))
        value = json.loads(trial.user_attrs.get("metrics", "{}")).get(self.names[0])
        return sort_key("complete", value, self.cfg.sweep.directions[0])

    def _run_with_oom_retry(self, trial: optuna.Trial, cfg: ExperimentConfig, run_id: str) -> TrialResult:
        """Out of memory once -> retry with forwards of half as many pairs; twice -> fail.

        The retry keeps train.micro_batch_size, the loss's micro-batch: under adaptive temperature T still
        comes from the same pairs (critic/train.py), so the retried trial optimises the same loss.
        """
        for attempt in range(2):
            mlflow_reporter = MlflowReporter(self.tracker, run_id)
            protected = trial.user_attrs.get("baseline") or trial.user_attrs.get("candidate") is not None
            reporter = FanoutReporter(mlflow_reporter, OptunaReporter(trial, self._names(trial)[0], self.report,
                                                                      self.report and not protected, cfg))
            try:
                return self._run_engine(cfg, reporter)
            except TrialOutOfMemory as exc:
                release_memory()
                forward = cfg.train.forward_micro_batch_size or cfg.train.micro_batch_size
                half = forward // 2
                if attempt == 1 or half < 1:
                    raise TrialFailure(f"out of memory (after retry with forwards of {forward} pairs)"
                                       f": {exc}") from None
                self.tracker.set_tags(run_id, {"sweep.oom_retry": f"forward_micro_batch_size {forward} -> {half} "
                                                                  f"(loss micro_batch_size "
                                                                  f"{cfg.train.micro_batch_size} kept)"})
                trial.set_user_attr("oom_retry", True)
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, forward_micro_batch_size=half))
            finally:
                mlflow_reporter.flush()
        raise AssertionError("unreachable")

    def _run_engine(self, cfg: ExperimentConfig, reporter: Reporter) -> TrialResult:
        """This process runs the trial, or with sweep.gpus_per_trial > 1 a torchrun job does (sweeper/launch.py)."""
        if cfg.sweep.gpus_per_trial > 1:
            from sweeper.launch import run_trial_distributed
            return run_trial_distributed(cfg, reporter, cfg.sweep.gpus_per_trial)
        return run_trial(cfg, reporter, progress=self.progress,
                         keep_model=cfg.train.save_checkpoint or self.cfg.sweep.save_best_checkpoint)

    def _record_reason(self, trial: optuna.Trial, run_id: str | None, reason: str, key: str) -> None:
        trial.set_user_attr(key, reason[:2000])
        if run_id is not None:
            self.tracker.set_tags(run_id, {f"sweep.{key}": reason[:5000]})

    def _record_success(self, trial: optuna.Trial, cfg: ExperimentConfig, run_id: str, result: TrialResult) -> None:
        """The run's records (sweeper/tracking.py); on the trial, the key metrics and which student it scored."""
        try:
            self.tracker.log_trial_result(run_id, cfg, result)
        except OSError as exc:  # a full disk, an unwritable artifact store: later reads (confirmation, export)
            # trust a COMPLETE trial's artifacts, so it fails; its params run again (a fault of the machine)
            requeue(trial, "artifacts not written")
            print(f"[sweep] trial {trial.number}: artifacts not written ({exc}); failed, its params queued again",
                  file=sys.stderr, flush=True)
            raise TrialFailure(f"artifacts not written: {exc}") from None
        if result.lineage:
            trial.set_user_attr("student_lineage", mask(json.dumps(result.lineage)))
            trial.study.set_user_attr("student_lineage", mask(json.dumps(result.lineage)))
            self.tracker.set_tags(self.parent_run_id, result.lineage)
        key_metrics = {k: v for k, v in result.metrics.items() if k.endswith("/d_acc") or k in self._names(trial)}
        key_metrics.update({k: result.metrics[k] for k in SUMMARY_KEYS if k in result.metrics})
        trial.set_user_attr("metrics", json.dumps(key_metrics))
        if self.on_complete is not None:
            self.on_complete(trial.number, result)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

