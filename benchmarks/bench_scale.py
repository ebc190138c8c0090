#!/usr/bin/env python
"""Scale-out benchmark: trials per hour with 1 and 2 workers, and the bookkeeping cost of a trial per store.

Throughput: a small version of experiments/demo.yaml (every trial the same length: `train.max_steps`
steps, one epoch, no pruner; one torch thread per worker) run by the real CLI, `sweep.py run
--workers 1` and `--workers 2`, on SQLite stores. Trials per hour come from the span between the first
trial's start and the last trial's end as Optuna recorded them (process start-up excluded); the
command's wall time is printed beside it. Tokenized data is cached before both runs.

Bookkeeping: `sweeper.runner.run_trials` (the code every worker runs) with the engine replaced by a
trivial trial that streams 30 steps of metrics and 3 evaluations in microseconds, so the time per
trial is what Optuna and MLflow cost: claim and ask, child run, params, metrics, tags, artifacts,
heartbeat, tell. Measured twice: as is (the trial's two figures rendered by matplotlib) and with the
figures replaced by empty files (storage only). Stores: SQLite + SQLite (the embedded default),
PostgreSQL + PostgreSQL (MLflow's store on the database directly), PostgreSQL + an MLflow tracking
server backed by PostgreSQL (HTTP). PostgreSQL is a throwaway local server (benchmarks/servers.py); its rows
are skipped when the server binaries are not installed.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from critic.trial import TrialResult  # noqa: E402
from sweeper import figures as figures_mod  # noqa: E402
from sweeper import objective as objective_mod  # noqa: E402
from sweeper import study as study_mod  # noqa: E402
from sweeper.sweep import Sweep  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def small_demo_spec(folder: Path, n_trials: int, max_steps: int, cache_dir: Path) -> Path:
    """experiments/demo.yaml with equal-length trials: no epochs in the space, no pruner, max_steps, 1 thread."""
    from critic.demo import demo_path
    raw = yaml.safe_load((ROOT / "experiments" / "demo.yaml").read_text())
    raw["data"]["cache_dir"] = str(cache_dir)
    # The demo's files themselves rather than `demo:` names, which MLflow's dataset inputs cannot resolve.
    raw["data"]["train_path"] = str(demo_path(raw["data"]["train_path"].split(":", 1)[1], cache_dir))
    raw["data"]["eval_sets"] = {name: str(demo_path(path.split(":", 1)[1], cache_dir))
                                for name, path in raw["data"]["eval_sets"].items()}
    raw.setdefault("model", {}).update(device="cpu", torch_threads=1)
    raw["train"]["max_steps"] = max_steps
    raw["eval"]["every_steps"] = max(1, max_steps // 2)
    raw["sweep"].update(n_trials=n_trials, pruner="none")
    raw["sweep"]["search_space"].pop("train.epochs")
    raw["sweep"]["baseline"].pop("train.epochs")
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def throughput(n_workers: int, spec: Path, folder: Path) -> dict:
    """`sweep.py run SPEC --workers N` on SQLite stores in `folder`; trials/hour over the trials' own span."""
    storage = f"sqlite:///{folder / 'optuna.db'}"
    command = [sys.executable, str(ROOT / "sweep.py"), "run", str(spec), "--workers", str(n_workers),
               "--storage", storage, "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--no-progress"]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    study = optuna.load_study(study_name=yaml.safe_load(spec.read_text())["sweep"]["study_name"], storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {"workers": n_workers, "trials": len(done), "span_s": span, "wall_s": wall,
            "trials_per_hour": len(done) / span * 3600, "median_trial_s": float(np.median(
                [t.duration.total_seconds() for t in done]))}


def trivial_run_trial(cfg, reporter=None, progress=False, keep_model=False) -> TrialResult:
    """What the engine reports for a 30-step trial with 3 evaluations, produced in microseconds."""
    rng = np.random.default_rng(int(cfg.train.lr * 1e9) % 2**32)
    eval_history, train_history = [], []
    for step in range(1, 31):
        train_history.append((step, {f"critic/{k}": float(rng.random()) for k in (
            "loss", "d_acc", "score_diff", "teacher_score_mean", "student_score_mean", "grad_norm", "lr",
            "temperature", "length_corr")} | {"perf/pairs_per_s": 100.0, "perf/tokens_per_s": 1e4}))
        reporter.log_train(*train_history[-1])
        if step % 10 == 0:
            metrics = {f"{s}/{m}": float(rng.random()) for s in ("val", "shifted")
                       for m in ("d_acc", "score_diff", "auc", "teacher_score_mean", "student_score_mean")}
            eval_history.append((step, metrics))
            reporter.log_eval(step, metrics)
    scores = pd.DataFrame({"set": ["val"] * 100 + ["shifted"] * 100, "teacher_score": rng.normal(size=200),
                           "student_score": rng.normal(size=200)})
    metrics = dict(eval_history[-1][1], **{"train/steps": 30.0, "train/progressive_d_acc": 0.6,
                                           "train/gap_progressive_minus_val": 0.0})
    return TrialResult(metrics, eval_history, scores, {}, timings={"total_s": 0.0}, train_history=train_history)


def _empty_figure(*args) -> Path:
    path = Path(args[-1])
    path.write_bytes(b"")
    return path


def bookkeeping(name: str, storage: str, tracking: str, spec_path: Path, n_trials: int, figures: bool) -> dict:
    """Seconds per trial of run_trials with the trivial engine: Optuna + MLflow bookkeeping only."""
    raw = yaml.safe_load(spec_path.read_text())
    raw["sweep"]["study_name"] = f"bookkeeping-{name.replace('+', '_')}-{'figures' if figures else 'storage'}"
    spec = study_mod.load_sweep_spec(str(spec_path), raw=raw)
    sweep = Sweep.init(spec, storage, tracking)
    saved = objective_mod.run_trial, figures_mod.training_progress, figures_mod.score_histograms
    objective_mod.run_trial = trivial_run_trial
    if not figures:
        figures_mod.training_progress = figures_mod.score_histograms = _empty_figure
    try:
        sweep.run_trials(1, progress=False)  # warm-up: connections
        started = time.perf_counter()
        sweep.run_trials(1 + n_trials, progress=False)
        elapsed = time.perf_counter() - started
    finally:
        objective_mod.run_trial, figures_mod.training_progress, figures_mod.score_histograms = saved
    return {"stores": name, "figures": figures, "trials": n_trials, "s_per_trial": elapsed / n_trials}


def store_pairs(folder: Path, with_postgres: bool):
    """(name, Optuna storage, MLflow tracking URI) per store combination; PostgreSQL servers started here."""
    yield "sqlite+sqlite", f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{folder / 'mlflow.db'}"
    from benchmarks.servers import MlflowServer, PostgresServer, postgres_bin
    bin_dir = postgres_bin() if with_postgres else None
    if bin_dir is None:
        print("[bench] PostgreSQL rows skipped: no server binaries (initdb, pg_ctl)" if with_postgres else
              "[bench] PostgreSQL rows skipped (--no-postgres)", file=sys.stderr)
        return
    server = PostgresServer(bin_dir).start()
    mlflow_server = None
    try:
        yield "postgresql+postgresql", server.url("optuna_direct"), server.url("mlflow_direct")
        mlflow_server = MlflowServer(server.url("mlflow_server"), folder / "server-artifacts").wait_ready()
        yield "postgresql+mlflow-server", server.url("optuna_server"), mlflow_server.uri
    finally:
        if mlflow_server is not None:
            mlflow_server.stop()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="trials per throughput run")
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps per trial in the throughput runs")
    parser.add_argument("--bookkeeping-trials", type=int, default=10, help="trivial trials per store and variant")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite rows only")
    parser.add_argument("--skip-throughput", action="store_true", help="only the bookkeeping table")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        spec = small_demo_spec(tmp, args.trials, args.max_steps, cache)
        rows = []
        if not args.skip_throughput:
            from critic.config import build_config
            from critic.trial import prepare
            prepare(build_config(yaml.safe_load(spec.read_text()), str(spec)))  # tokenizer and tokenized data
            for n_workers in (1, 2):
                folder = tmp / f"workers{n_workers}"
                folder.mkdir()
                rows.append(throughput(n_workers, spec, folder))
                print(f"[bench] {n_workers} worker(s): {rows[-1]}", file=sys.stderr)
        costs = []
        for name, storage, tracking in store_pairs(tmp, not args.no_postgres):
            for figures in (True, False):
                costs.append(bookkeeping(name, storage, tracking, spec, args.bookkeeping_trials, figures))
                print(f"[bench] {costs[-1]}", file=sys.stderr)

    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPU cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"1 torch thread per worker")
    if rows:
        print(f"\nthroughput: {args.trials} trials of the small demo spec ({args.max_steps} steps, SQLite stores)")
        print(f"{'workers':>8} {'trials/hour':>12} {'speed-up':>9} {'median trial s':>15} {'span s':>8} {'wall s':>8}")
        for row in rows:
            print(f"{row['workers']:>8} {row['trials_per_hour']:>12.0f} "
                  f"{row['trials_per_hour'] / rows[0]['trials_per_hour']:>9.2f} {row['median_trial_s']:>15.1f} "
                  f"{row['span_s']:>8.1f} {row['wall_s']:>8.1f}")
    print(f"\nbookkeeping per trial (trivial engine, {args.bookkeeping_trials} trials each)")
    print(f"{'Optuna + MLflow stores':<26} {'with figures s':>15} {'storage only s':>15}")
    for name in dict.fromkeys(c["stores"] for c in costs):
        cells = {c["figures"]: c["s_per_trial"] for c in costs if c["stores"] == name}
        print(f"{name:<26} {cells[True]:>15.3f} {cells[False]:>15.3f}")
    print(json.dumps({"throughput": rows, "bookkeeping": costs, "load_average": load, "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
