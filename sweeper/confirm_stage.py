"""Run the confirmation stage and turn it into numbers and words: table, verdict, noise floor, figure.

The per-seed values are the trials' reported objective; the per-pair scores are the held-out
score tables every trial already logs to MLflow (scores/heldout_pair_scores.parquet).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd

from critic.config import DataConfig
from critic.metrics import PAIR_METRICS, pair_metric
from critic.stats import ConfigScores, compare, detectable_difference
from sweeper import figures
from sweeper.board import (
    format_table,  # noqa: F401  (re-exported; `best` prints it without the engine)
    split_text,
)
from sweeper.confirm import (
    ConfirmPlan,
    choose_finalists,
    confirmation_metric,
    describe_split,
    extend_plan,
    make_plan,
    open_confirm_study,
    params_text,
    plan_summary,
    promising,
)
from sweeper.stores import StorageLock
from sweeper.tracking import SCORES_ARTIFACT, Tracker


def _pair_frame(tracker: Tracker, run_id: str, set_name: str, folder: Path) -> pd.DataFrame:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download is noise here
    local = tracker.download(run_id, SCORES_ARTIFACT, folder / run_id)
    frame = pd.read_parquet(local)
    return frame[frame["set"] == set_name].reset_index(drop=True)


def gather(confirm: optuna.Study, metric: str, tracker: Tracker) -> tuple[dict[str, ConfigScores], list[int]]:
    """config label -> its per-seed values and per-pair scores; and the planned seed indices."""
    plan = ConfirmPlan.of(confirm)
    set_name, _, pair_name = metric.partition("/")
    per_pair = pair_name in PAIR_METRICS
    done = ConfirmPlan.completed(confirm)
    configs: dict[str, ConfigScores] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in dict.fromkeys(item.config for item in plan.items):
            values, frames = {}, {}
            for item in (i for i in plan.items if i.config == label):
                trial = done.get((label, item.seed))
                if trial is None:
                    continue
                values[item.seed] = trial.values[0]
                if per_pair:
                    frame = _pair_frame(tracker, trial.user_attrs["mlflow_run_id"], set_name, Path(tmp))
                    recomputed = float(pair_metric(pair_name, frame["teacher_score"], frame["student_score"],
                                                   frame["teacher_length"], frame["student_length"]))
                    if not math.isclose(recomputed, trial.values[0], rel_tol=1e-9, abs_tol=1e-12):
                        raise RuntimeError(f"{label} seed {item.seed}: {metric} from the logged pair scores is "
                                           f"{recomputed}, the trial reported {trial.values[0]}")
                    frames[item.seed] = frame
            planned = tuple(item.seed for item in plan.items if item.config == label)
            configs[label] = ConfigScores(label, values, frames if per_pair else None, planned)
    return configs, sorted({item.seed for item in plan.items})


def analyse(confirm: optuna.Study, objective: str, direction: str, tracker: Tracker, n_resamples: int,
            data: DataConfig, unconfirmed: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The confirmation of the search objective as one JSON-able dict: rows, verdict, noise floor, scored split.

    `unconfirmed`: the study's other objectives, which the verdict names as not confirmed.
    """
    metric = confirmation_metric(objective, data)  # val/d_acc -> confirm/d_acc: pairs the search never saw
    configs, seeds = gather(confirm, metric, tracker)
    plan = {item.config: item for item in ConfirmPlan.of(confirm).items}  # label -> trial number and params
    baseline = configs.pop("baseline")
    pair_name = metric.partition("/")[2]  # e.g. confirm/d_acc -> d_acc, on the confirmation split's pair scores
    base_row, rows = compare(pair_name, direction, baseline, list(configs.values()), seeds, n_resamples)
    table = [{**row.row(), "trial": plan[row.label].trial, "kind": plan[row.label].kind,
              "params": params_text({**plan[row.label].params, **plan[row.label].extra})}
             for row in (base_row, *rows)]
    base_values = [baseline.seed_values[s] for s in base_row.seeds]
    noise = {"baseline_seed_sd": float(np.std(base_values, ddof=1)) if len(base_values) > 1 else math.nan,
             "baseline_se": base_row.value.se, "detectable_difference": detectable_difference(rows),
             "n_pairs": base_row.n_pairs, "n_prompts": base_row.n_prompts, "seeds": len(base_row.seeds),
             "form": base_row.form}
    winners = sorted((r for r in rows if r.verdict == "better"),
                     key=lambda r: -r.diff.mean if direction == "maximize" else r.diff.mean)
    result = {"metric": metric, "direction": direction, "seeds": seeds, "table": table, "noise": noise,
              "winner": plan[winners[0].label].trial if winners else None, "unconfirmed": list(unconfirmed),
              "split": describe_split(objective, metric, data, base_row.n_pairs)}
    result["verdict"] = verdict_text(result)
    return result


def _interval(row: dict[str, Any]) -> str:
    """The difference with its simultaneous interval: the one the verdict is read from."""
    return (f"{row['diff_mean']:+.4f}, {row['diff_level']:.1%} simultaneous interval "
            f"[{row['diff_low']:+.4f}, {row['diff_high']:+.4f}]")


def _who(row: dict[str, Any]) -> str:
    if row.get("kind") == "candidate":
        return f"your planned change {row['config']!r} (trial {row['trial']})"
    return f"finalist trial {row['trial']} ({row['params']})"


def _judgement(row: dict[str, Any]) -> str:
    """One config against the baseline, in words, with its difference and Bonferroni-adjusted p."""
    p = f"(p={row['p_adjusted']:.3g})"
    if row["verdict"] == "unstable":
        return (f"is unstable: no result for seed(s) {row['missing_seeds']} (diverged or failed); "
                f"not recommended")
    if row["verdict"] in ("better", "worse"):
        return f"is {row['verdict']} than the baseline by {_interval(row)} {p}"
    return f"shows no difference from the baseline beyond noise: {_interval(row)} {p}"


def verdict_text(result: dict[str, Any]) -> str:
    """Plain words: the conclusion; then each planned change and each finalist; the pairs scored; the noise floor."""
    metric, rows, noise = result["metric"], result["table"][1:], result["noise"]
    scale = (f"{noise['seeds']} seeds x {noise['n_pairs']} pairs from {noise['n_prompts']} prompts"
             if noise["n_pairs"] else f"{noise['seeds']} seeds")
    kinds = {row.get("kind", "finalist") for row in rows}
    what = " or ".join(name for kind, name in (("candidate", "planned change"), ("finalist", "finalist"))
                       if kind in kinds)
    better = [r for r in rows if r["verdict"] == "better"]
    if better:
        best = next(r for r in better if r["trial"] == result["winner"])
        lines = [f"{_who(best)} beats the baseline on {metric} by {_interval(best)} (p={best['p_adjusted']:.3g}, "
                 f"Bonferroni over {len(rows)} comparisons, {scale})"]
    elif rows:
        lines = [f"no {what} beats the baseline beyond noise on {metric} ({scale}, Bonferroni over {len(rows)} "
                 f"comparisons); keep your current setting" + (" or widen the search" if "finalist" in kinds else "")]
    else:
        lines = ["no finalist to confirm (no COMPLETE trial other than the baseline)"]
    lines += [f"{_who(row)} {_judgement(row)}" + (f" (on {row['seeds']} seeds: after them it looked no better, so "
              f"it got no more)" if row["seeds"] < noise["seeds"] and row["verdict"] != "unstable" else "")
              for row in rows]
    if result.get("unconfirmed"):
        lines.append(f"confirmed on {metric} only, the first objective; not confirmed: "
                     f"{', '.join(result['unconfirmed'])}")
    lines.append(f"scored {split_text(result)}")
    lines.append(f"noise floor: the baseline's {metric} varies by {noise['baseline_seed_sd']:.4f} (sd over "
                 f"{noise['seeds']} seeds); the smallest difference these seeds and prompts detect (80% power, at the "
                 f"verdict's level) is about {noise['detectable_difference']:.4f}. Add seeds when the seed part "
                 f"dominates (seed_share in confirmation.csv), held-out prompts when it does not.")
    return "\n".join(lines)


def store(result: dict[str, Any], search: optuna.Study, confirm: optuna.Study, tracker: Tracker,
          parent_id: str) -> None:
    """On both studies' user attrs, and on the parent run: CSV, figure, verdict tags."""
    text = json.dumps(result, default=float)
    search.set_user_attr("confirmation", text)
    confirm.set_user_attr("confirmation", text)
    split = result["split"]
    frame = pd.DataFrame(result["table"]).assign(scored_on=f"{split['set']} ({split['n_pairs']} pairs"
                                                 + (", never seen by the search)" if split["fresh"] else ")"))
    tracker.log_frame(parent_id, frame, "confirmation/confirmation.csv")
    tracker.log_text(parent_id, result["verdict"] + "\n", "confirmation/verdict.txt")
    with tempfile.TemporaryDirectory() as tmp:
        path = figures.confirmation_intervals(frame, result["metric"], Path(tmp) / "confirmation.png",
                                              title=f"Confirmation {split_text(result)}")
        tracker.log_file(parent_id, path, "confirmation")
    tracker.set_tags(parent_id, {"confirm.verdict": result["verdict"].splitlines()[0][:5000],
                                 "confirm.split": split_text(result)[:5000],
                                 "confirm.winner": result["winner"] if result["winner"] is not None else "none"})


def run_confirmation(sweep, top_k: int, seeds: int, trial_numbers: list[int] | None = None, workers: int = 1,
                     progress: bool = True, max_seeds: int | None = None, launch=None) -> dict[str, Any]:
    """Plan, run (resuming what is done) and analyse the confirmation of `sweep`'s search (the study's handle,
    sweeper/sweep.py); store and return the result.

    launch: how `run` starts its workers (sweeper/cluster.py); None: `workers` processes here, or this one.
    max_seeds (default: the spec's sweep.confirm.max_seeds): the second look's last seed index (sweeper.confirm)."""
    search, spec = sweep.study, sweep.spec
    baseline, candidates, finalists = choose_finalists(search, top_k, trial_numbers)
    tested = {t.user_attrs["candidate"] for t in candidates}
    for name in [c.name for c in spec.candidates if c.name not in tested]:
        print(f"[confirm] candidate {name!r} is not in study {search.study_name!r} (candidates are enqueued when a "
              f"study is created); run the sweep with --new-study to test it")
    items = make_plan(baseline, candidates, finalists, seeds)
    confirm = sweep.on(open_confirm_study(search, spec, sweep.storage_url, items))
    where = "the confirmation split" if spec.cfg.data.confirm_fraction > 0 else "the val pairs (no confirmation split)"
    print(f"[confirm] {plan_summary(items)}, scored on {where}; study {confirm.study.study_name!r}")
    _run_plan(confirm, items, workers, progress, launch)
    maximize = search.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    more = range(seeds + 1, max(seeds, spec.cfg.sweep.confirm.max_seeds if max_seeds is None else max_seeds) + 1)
    if more:
        chosen = promising(confirm.study, items, maximize)
        if chosen:
            items = extend_plan(items, chosen, more)
            confirm.study.set_user_attr("confirm_plan", [item.__dict__ for item in items])
            print(f"[confirm] after {seeds} seeds {', '.join(chosen)} look{'s' * (len(chosen) == 1)} better than the "
                  f"baseline: seed indices {more.start}..{more.stop - 1} for them and the baseline "
                  f"({len(more) * (len(chosen) + 1)} runs) before their verdict")
            _run_plan(confirm, items, workers, progress, launch)
        else:
            print(f"[confirm] after {seeds} seeds no config looks better than the baseline: no more seeds")
    direction = "maximize" if maximize else "minimize"
    metric, *others = spec.cfg.sweep.objectives
    result = analyse(confirm.study, metric, direction, sweep.tracker, spec.cfg.sweep.confirm.n_resamples,
                     spec.cfg.data, others)
    store(result, search, confirm.study, sweep.tracker, sweep.parent_id)
    return result


def _run_plan(confirm, items: list, workers: int, progress: bool, launch=None) -> None:
    """Run every planned (config, seed) not yet settled, in this process or in `workers` launched workers.

    `confirm`: the sweep's handle on its confirmation study."""
    plan = ConfirmPlan(items)
    if launch is not None or workers > 1:
        with StorageLock(confirm.storage_url):
            plan.refill(confirm.study)  # before the workers look
        confirm.launch_workers(workers, progress, plan=plan, launch=launch)
    else:
        confirm.run_trials(plan.n_trials, progress=progress, plan=plan)
