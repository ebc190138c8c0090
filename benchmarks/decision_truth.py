"""Scenarios and ground truth of the decision benchmark (benchmarks/bench_decision.py).

A scenario is a sweep spec on the demo data: the demo critic, shrunk so a trial takes seconds on a CPU, with one
search space and a baseline. Its truth is measured outside the sweep: a config is trained with seed indices the
sweep never uses and scored on *fresh* pairs, prompts from the demo generator run with another seed, minus every
prompt of demo:train, so no policy trains on, selects with or confirms on them. `true_score` is that measurement;
the stored truth (benchmarks/decision_truth.json, `--truth` recomputes it) gives, per scenario, the baseline and a
reference good config over many seeds, and the margin between them in units of its noise floor.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from critic.config import apply_overrides, build_config
from critic.demo import demo_path, make_demo_frame
from critic.files import atomic_write
from critic.trial import run_trial

TRUTH_PATH = Path(__file__).resolve().parent / "decision_truth.json"
FRESH_SET = "fresh"
FRESH_SEED = 4321  # the demo generator's seed for the fresh pairs (demo:train uses 1234)
TRUTH_SEED_BASE = 100  # truth runs use seed indices 101, 102, ...; the sweep uses 0, its confirmation 1..seeds
ANSWER_SEED_BASE = 200  # an answered config's true improvement: seed indices 201, 202, ...


@dataclass(frozen=True)
class Size:
    """How big each trial and each measurement is: the only thing --quick and the test change."""
    n_trials: int = 6
    max_steps: int = 24
    eval_every: int = 12
    max_length: int = 64  # data.max_prompt_length and data.max_response_length
    fresh_pairs: int = 1000
    truth_seeds: int = 8
    answer_seeds: int = 3
    held_out_fraction: float = 0.2  # data.val_fraction and data.confirm_fraction: ~600 pairs each
    # (seeds, max_seeds) for every policy's confirmation instead of its own: a smoke check of the plumbing, whose
    # decisions mean nothing, need not run the tool's eight seeds. None: each policy's own (the measured runs).
    confirm_seeds: tuple[int, int] | None = None


FULL = Size()
# Smoke checks: seconds per trial, the truth measured on the fly (a few tiny runs), two confirmation seeds.
QUICK = Size(n_trials=3, max_steps=8, eval_every=4, max_length=48, fresh_pairs=300, truth_seeds=2, answer_seeds=2,
             held_out_fraction=0.05, confirm_seeds=(2, 2))
TINY = Size(n_trials=2, max_steps=4, eval_every=4, max_length=48, fresh_pairs=200, truth_seeds=2, answer_seeds=2,
            held_out_fraction=0.04, confirm_seeds=(2, 2))

# One search space for both scenarios; only the baseline differs. The lr range is the demo's.
SPACE = {
    "train.lr": {"type": "float", "low": 1.0e-5, "high": 3.0e-3, "log": True},
    "train.warmup_steps": {"type": "int", "low": 0, "high": 10},
    "loss.adaptive_temperature": {"type": "categorical", "choices": [True, False]},
}
GOOD = {"train.lr": 1.0e-4, "train.warmup_steps": 5, "loss.adaptive_temperature": True}
SCENARIOS = {
    # The users' under-trained critic: an lr 10x below the space's good region (their 3e-6 at the 1.5B scale).
    "planted": {"baseline": {**GOOD, "train.lr": 1.0e-5}, "reference": GOOD},
    # The demo's baseline: lr 3e-4, already in the flat top of the space.
    "null": {"baseline": {**GOOD, "train.lr": 3.0e-4}, "reference": GOOD},
}


def scenario_raw(scenario: str, size: Size) -> dict[str, Any]:
    """The scenario's sweep spec as a raw YAML mapping (no policy settings yet)."""
    return {
        "data": {"train_path": "demo:train", "val_fraction": size.held_out_fraction,
                 "confirm_fraction": size.held_out_fraction,
                 "max_prompt_length": size.max_length, "max_response_length": size.max_length},
        "model": {"preset": "tiny", "torch_threads": 1},
        "score": {"reduction": "mean", "exclude_eos": True},
        "loss": {"adaptive_temperature": True, "t_min": 0.5, "t_max": 2.0},
        "train": {**{k.split(".")[1]: v for k, v in SCENARIOS[scenario]["baseline"].items() if k.startswith("train.")},
                  "scheduler": "constant", "epochs": 1, "batch_size": 32, "micro_batch_size": 16,
                  "max_steps": size.max_steps},
        "eval": {"every_steps": size.eval_every, "batch_size": 128},
        "sweep": {"study_name": f"decision-{scenario}", "n_trials": size.n_trials, "objective": "val/d_acc",
                  "direction": "maximize", "search_space": SPACE, "baseline": SCENARIOS[scenario]["baseline"]},
    }


def fresh_pairs_path(n_pairs: int, cache_dir: str = "mlruns/cache") -> Path:
    """Parquet of n_pairs fresh demo pairs: the demo generator with FRESH_SEED, prompts of demo:train dropped."""
    path = Path(cache_dir) / "bench" / f"decision-fresh-{FRESH_SEED}-{n_pairs}.parquet"
    if not path.exists():
        import pandas as pd
        seen = set(pd.read_parquet(demo_path("train", cache_dir))["content"])
        frame = make_demo_frame("train", seed=FRESH_SEED)
        frame = frame[~frame["content"].isin(seen)].drop_duplicates("content").head(n_pairs)
        if len(frame) < n_pairs:
            raise ValueError(f"only {len(frame)} fresh demo prompts; ask for fewer than {n_pairs} fresh pairs")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return path


def true_score(scenario: str, params: dict[str, Any], seed_index: int, size: Size) -> float:
    """fresh/d_acc of `params` (on top of the scenario's baseline) trained with seed index `seed_index`."""
    raw = scenario_raw(scenario, size)
    seeds = {"train.seed": seed_index, "model.init_seed": seed_index}
    cfg = build_config(apply_overrides(raw, {
        **params, **seeds, "eval.every_steps": 10**9,  # one evaluation, after the last step
        "data.eval_sets": {FRESH_SET: str(fresh_pairs_path(size.fresh_pairs))}}))
    return float(run_trial(cfg).metrics[f"{FRESH_SET}/d_acc"])


def summary(values: list[float]) -> dict[str, Any]:
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return {"mean": statistics.fmean(values), "sd": sd, "se": sd / math.sqrt(len(values)), "n": len(values),
            "values": values}


def compute_truth(size: Size, log=print) -> dict[str, Any]:
    """Per scenario: baseline and reference, size.truth_seeds seeds each, and their margin in noise-floor units."""
    scores: dict[str, dict[str, Any]] = {}
    measured: dict[str, list[float]] = {}  # the reference is one config in both scenarios: trained once
    for scenario, configs in SCENARIOS.items():
        entry = {}
        for role in ("baseline", "reference"):
            trained = apply_overrides(scenario_raw(scenario, size), configs[role])
            key = json.dumps({k: v for k, v in trained.items() if k != "sweep"}, sort_keys=True, default=str)
            if key not in measured:
                measured[key] = [true_score(scenario, configs[role], TRUTH_SEED_BASE + i, size)
                                 for i in range(1, size.truth_seeds + 1)]
            values = measured[key]
            entry[role] = {"params": configs[role], **summary(values)}
            log(json.dumps({"scenario": scenario, "role": role, "mean": round(entry[role]["mean"], 4),
                            "sd": round(entry[role]["sd"], 4)}))
        margin = entry["reference"]["mean"] - entry["baseline"]["mean"]
        # The noise floor: the standard error of that difference of two means over independent seeds.
        noise = math.hypot(entry["baseline"]["se"], entry["reference"]["se"])
        entry.update({"margin": margin, "noise_se": noise, "margin_in_noise": margin / noise})
        scores[scenario] = entry
    return {"size": asdict(size), "metric": f"{FRESH_SET}/d_acc", "fresh_pairs": size.fresh_pairs, "scenarios": scores}


def same_trials(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two sizes train and score a config the same way (the search's size does not change the truth)."""
    return all(a.get(key) == b.get(key) for key in ("max_steps", "max_length", "fresh_pairs", "held_out_fraction"))


def load_truth(size: Size, recompute: bool = False, log=print) -> dict[str, Any]:
    """The stored truth when its trials are `size`'s; else measured now (and stored when size is FULL)."""
    if not recompute and TRUTH_PATH.exists():
        stored = json.loads(TRUTH_PATH.read_text())
        if same_trials(stored["size"], asdict(size)):
            return stored
    truth = compute_truth(size, log)
    if size == FULL:
        TRUTH_PATH.write_text(json.dumps(truth, indent=1) + "\n")
    return truth
