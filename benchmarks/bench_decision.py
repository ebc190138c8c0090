"""Decision benchmark: how often a sweep policy finds a truly better config, claims one that is not, and at what cost.

Two scenarios with known truth (benchmarks/decision_truth.py): *planted*, a baseline far worse than configs in its
search space, and *null*, a baseline already in the flat top of the space. Three policies, each a configuration of
this tool run through the real CLI (`sweep.py run`: Optuna SQLite storage and MLflow store in a temp folder):

- tool defaults: TPE, the paired pruner, the confirmation stage with its default top_k and seeds; the answer is the
  confirmed winner, or "keep the baseline" when no finalist is confirmed better;
- optuna defaults: TPE, MedianPruner, no confirmation (top_k 0); the answer is the best trial, claimed better when
  its value beats the baseline trial's;
- careful by hand: random sampler, no pruner, the top 3 re-run on 3 seeds (the confirmation stage without its added
  seeds, its verdict ignored); the answer is the best mean, claimed better when it beats the baseline's mean.

Per run: the claim, the answer's true improvement (its fresh/d_acc over new seeds minus the stored truth of the
baseline), trial-seconds (every trial's datetime_complete - datetime_start, search and confirmation). Out:
benchmarks/results/decision.jsonl (one line per run), decision.md (the table), decision.png (the figure).

  OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_decision [--quick] [--repeats 5] [--append] [--truth]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from benchmarks.decision_truth import (
    ANSWER_SEED_BASE,
    FULL,
    QUICK,
    SCENARIOS,
    Size,
    load_truth,
    scenario_raw,
    true_score,
)
from sweeper.board import trial_params
from sweeper.confirm import confirm_study_name

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Policy:
    name: str
    sweep: dict[str, Any] = field(default_factory=dict)  # sweep.* settings on top of the tool's defaults
    answer: str = "confirmed"  # confirmed | best_trial | best_mean


POLICIES = [
    Policy("tool defaults"),
    Policy("optuna defaults", {"sampler": "tpe", "pruner": "median", "confirm": {"top_k": 0}}, "best_trial"),
    Policy("careful by hand", {"sampler": "random", "pruner": "none",
                               "confirm": {"top_k": 3, "seeds": 3, "max_seeds": 3}}, "best_mean"),
]


def run_pipeline(scenario: str, policy: Policy, sweep_seed: int, size: Size, folder: Path) -> dict[str, Any]:
    """One `sweep.py run` of the scenario under the policy; returns its answer, claim and trial-seconds."""
    from sweeper.commands import main as sweep_main
    raw = scenario_raw(scenario, size)
    raw["sweep"] = {**raw["sweep"], **policy.sweep, "seed": sweep_seed}
    if size.confirm_seeds is not None:
        seeds, max_seeds = size.confirm_seeds
        raw["sweep"]["confirm"] = {**raw["sweep"].get("confirm", {}), "seeds": seeds, "max_seeds": max_seeds,
                                   "n_resamples": 200}
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    storage = f"sqlite:///{folder / 'optuna.db'}"
    started = time.perf_counter()
    with open(folder / "sweep.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = sweep_main(["run", str(spec), "--storage", storage, "--tracking-uri",
                           f"sqlite:///{folder / 'mlflow.db'}", "--no-progress"])
    wall = time.perf_counter() - started
    if code:
        raise RuntimeError(f"sweep.py run exited {code}; see {folder / 'sweep.log'}")
    search = optuna.load_study(study_name=raw["sweep"]["study_name"], storage=storage)
    studies = [search]
    if confirm_study_name(search.study_name) in optuna.get_all_study_names(storage):
        studies.append(optuna.load_study(study_name=confirm_study_name(search.study_name), storage=storage))
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for s in studies
                  for t in s.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete)
    answer, claim = answer_of(search, policy)
    confirmation = json.loads(search.user_attrs.get("confirmation", "{}"))
    return {"scenario": scenario, "policy": policy.name, "sweep_seed": sweep_seed, "claim": claim,
            "answer": answer, "trial_seconds": round(seconds, 1), "wall_s": round(wall, 1),
            "trials": sum(len(s.trials) for s in studies),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in search.trials),
            "search_values": [round(t.value, 4) if t.value is not None else None for t in search.trials],
            # the confirmation as the tool saw it: each config's mean and its difference to the baseline
            "confirmed": [{k: row.get(k) for k in ("config", "mean_mean", "diff_mean", "diff_low", "verdict")}
                          for row in confirmation.get("table", [])]}


def answer_of(search: optuna.Study, policy: Policy) -> tuple[dict[str, Any], bool]:
    """(the params the policy answers with, whether it claims them better than the baseline)."""
    complete = search.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    baseline = next(t for t in complete if t.user_attrs.get("baseline"))
    by_number = {t.number: t for t in complete}
    if policy.answer == "best_trial":
        best = max(complete, key=lambda t: (t.value, -t.number))
        return trial_params(best), best.number != baseline.number and best.value > baseline.value
    result = json.loads(search.user_attrs["confirmation"])
    if policy.answer == "confirmed":
        winner = result["winner"]
        return (trial_params(by_number[winner]), True) if winner is not None else (trial_params(baseline), False)
    rows = [r for r in result["table"] if not r.get("missing_seeds")]  # a diverged config has no mean
    best = max(rows, key=lambda r: r["mean_mean"])
    base = next(r for r in result["table"] if r["config"] == "baseline")
    claim = best["config"] != "baseline" and best["mean_mean"] > base["mean_mean"]
    return trial_params(by_number[best["trial"]]), claim


class TrueImprovement:
    """An answer's fresh/d_acc over new seeds minus the truth's baseline mean; each distinct answer measured once."""

    def __init__(self, truth: dict[str, Any], size: Size):
        self.truth, self.size, self.cache = truth, size, {}

    def __call__(self, scenario: str, params: dict[str, Any]) -> float:
        baseline = self.truth["scenarios"][scenario]["baseline"]
        if same_params(params, baseline["params"]):
            return 0.0  # the answer is "keep the baseline": nothing changes
        key = (scenario, json.dumps(params, sort_keys=True))
        if key not in self.cache:
            self.cache[key] = self.measure(scenario, params)
        return self.cache[key]

    def measure(self, scenario: str, params: dict[str, Any]) -> float:
        """Trained with size.answer_seeds seed indices no sweep and no truth run uses, scored on the fresh pairs."""
        values = [true_score(scenario, params, ANSWER_SEED_BASE + i, self.size)
                  for i in range(1, self.size.answer_seeds + 1)]
        return statistics.fmean(values) - self.truth["scenarios"][scenario]["baseline"]["mean"]


def same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-9) if isinstance(a[k], float) else a[k] == b[k] for k in a)


def run_benchmark(size: Size, repeats: int, out: Path, budget_s: float = math.inf, log=print,
                  append: bool = False, first_seed: int | None = None, truth: dict | None = None) -> list[dict]:
    """Every (repetition, scenario, policy) pipeline, interleaved; returns the aggregated table rows.

    append: keep the runs already in out/decision.jsonl and add repetitions with the next sweep seeds (repeats 0:
    only table and figure again). first_seed: the first repetition's sweep seed (default: 0, or the next one).
    truth: a truth already measured at `size` (default: load_truth's)."""
    out.mkdir(parents=True, exist_ok=True)
    truth = truth or load_truth(size, log=log)
    improvement = TrueImprovement(truth, size)
    planted = truth["scenarios"]["planted"]["margin"]
    runs, started = [], time.perf_counter()
    if append and (out / "decision.jsonl").exists():
        runs = [r for r in map(json.loads, (out / "decision.jsonl").read_text().splitlines()) if "claim" in r]
    (out / "decision.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    first = max((r["sweep_seed"] for r in runs), default=-1) + 1 if first_seed is None else first_seed
    for rep in range(first, first + repeats):
        if time.perf_counter() - started > budget_s:
            log(f"[bench] budget of {budget_s:.0f} s spent: stopped before sweep seed {rep}")
            break
        for scenario in SCENARIOS:
            for policy in POLICIES:
                with tempfile.TemporaryDirectory() as tmp:
                    run = run_pipeline(scenario, policy, rep, size, Path(tmp))
                run["true_improvement"] = improvement(scenario, run["answer"])
                # Truly better: at least half the planted margin above the baseline, on fresh seeds and pairs.
                run["truly_better"] = run["true_improvement"] >= planted / 2
                runs.append(run)
                log(json.dumps(run, default=str))
                with open(out / "decision.jsonl", "a") as f:
                    f.write(json.dumps(run, default=str) + "\n")
    rows = aggregate(runs)
    meta = {"size": asdict(size), "repetitions": len({r["sweep_seed"] for r in runs}),
            "wall_s": round(time.perf_counter() - started, 1),
            "pipelines_wall_s": round(sum(r["wall_s"] for r in runs)), "answer_seeds": size.answer_seeds,
            "truth": {s: {k: e[k] for k in ("margin", "noise_se", "margin_in_noise")}
                      for s, e in truth["scenarios"].items()}}
    (out / "decision.md").write_text(table_markdown(rows, meta))
    with open(out / "decision.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps({"summary": row}) + "\n")
        f.write(json.dumps({"meta": meta}) + "\n")
    plot(runs, out / "decision.png")
    return rows


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per policy x scenario: claim rate, power or false claims, true improvement, trial-seconds."""
    rows = []
    for policy in POLICIES:
        for scenario in SCENARIOS:
            chosen = [r for r in runs if r["policy"] == policy.name and r["scenario"] == scenario]
            if not chosen:
                continue
            claims = [r["claim"] for r in chosen]
            found = [r["claim"] and r["truly_better"] for r in chosen]
            rows.append({"policy": policy.name, "scenario": scenario, "repetitions": len(chosen),
                         "claim_rate": statistics.fmean(claims),
                         # planted: confirmed a truly better config; null: every claim is false
                         "power": statistics.fmean(found) if scenario == "planted" else None,
                         "false_claim_rate": statistics.fmean(claims) if scenario == "null" else None,
                         "true_improvement": spread([r["true_improvement"] for r in chosen]),
                         "trial_seconds": spread([r["trial_seconds"] for r in chosen]),
                         "wall_s": spread([r["wall_s"] for r in chosen])})
    return rows


def table_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"R = {meta['repetitions']} repetitions, wall {meta['wall_s']:.0f} s (this invocation; the pipelines "
             f"alone {meta['pipelines_wall_s']} s); true improvement over "
             f"{meta['answer_seeds']} fresh seeds; truth margins {json.dumps(meta['truth'], default=float)}", "",
             "| policy | scenario | claims better | power (planted) / false claims (null) | true improvement "
             "mean ± sd [min, max] | trial-seconds mean ± sd [min, max] |", "|---|---|---|---|---|---|"]
    for r in rows:
        rate = r["power"] if r["scenario"] == "planted" else r["false_claim_rate"]
        ti, ts = r["true_improvement"], r["trial_seconds"]
        lines.append(f"| {r['policy']} | {r['scenario']} | {r['claim_rate']:.0%} of {r['repetitions']} | {rate:.0%} "
                     f"| {ti['mean']:+.4f} ± {ti['sd']:.4f} [{ti['min']:+.4f}, {ti['max']:+.4f}] "
                     f"| {ts['mean']:.0f} ± {ts['sd']:.0f} [{ts['min']:.0f}, {ts['max']:.0f}] |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    """True improvement vs trial-seconds, one colour per policy, one marker per scenario."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, policy in zip(("tab:blue", "tab:orange", "tab:green"), POLICIES):
        for marker, scenario in zip(("o", "s"), SCENARIOS):
            chosen = [r for r in runs if r["policy"] == policy.name and r["scenario"] == scenario]
            if chosen:
                ax.scatter([r["trial_seconds"] for r in chosen], [r["true_improvement"] for r in chosen],
                           c=colour, marker=marker, alpha=0.7, label=f"{policy.name}, {scenario}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("trial-seconds to the answer (search + confirmation)")
    ax.set_ylabel("true improvement of the answer (fresh/d_acc)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition of tiny trials, two confirmation seeds: "
                        "a smoke check of the harness (its numbers decide nothing; written to --out/quick)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (sweep seeds 0..R-1)")
    parser.add_argument("--budget-s", type=float, default=math.inf, help="start no repetition after this many s")
    parser.add_argument("--truth", action="store_true", help="recompute benchmarks/decision_truth.json and stop")
    parser.add_argument("--append", action="store_true", help="keep the runs in --out and add --repeats more")
    parser.add_argument("--first-seed", type=int, help="sweep seed of the first repetition (default 0, or the next)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.truth:
        print(json.dumps(load_truth(FULL, recompute=True)["scenarios"], default=float, indent=1))
        return
    size, repeats = (QUICK, 1) if args.quick else (FULL, args.repeats)
    out = args.out / "quick" if args.quick else args.out  # a smoke check never overwrites the measured runs
    run_benchmark(size, repeats, out, args.budget_s, append=args.append, first_seed=args.first_seed)
    print((out / "decision.md").read_text())


if __name__ == "__main__":
    main()
