"""Figures logged with every trial: training progress (4 panels) and held-out score histograms."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend on training nodes


def _series(history: list[tuple[int, dict[str, float]]], key: str) -> tuple[list[int], list[float]]:
    points = [(step, m[key]) for step, m in history if key in m]
    return [p[0] for p in points], [p[1] for p in points]


def training_progress(train_history, eval_history, eval_sets: list[str], path: Path) -> Path:
    """d_acc (with the 0.5 line), score_diff (with 0), teacher vs student mean score, grad_norm."""
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    ax.plot(*_series(train_history, "critic/d_acc"), label="train (batch, before update)", alpha=0.6)
    for name in eval_sets:
        ax.plot(*_series(eval_history, f"{name}/d_acc"), marker="o", label=name)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(title="d_acc", xlabel="step", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(*_series(train_history, "critic/score_diff"), label="train", alpha=0.6)
    for name in eval_sets:
        ax.plot(*_series(eval_history, f"{name}/score_diff"), marker="o", label=name)
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set(title="score_diff (teacher - student)", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(*_series(train_history, "critic/teacher_score_mean"), label="teacher (train)")
    ax.plot(*_series(train_history, "critic/student_score_mean"), label="student (train)")
    ax.set(title="mean score", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    ax.plot(*_series(train_history, "critic/grad_norm"))
    ax.set(title="grad_norm (before clipping)", xlabel="step", yscale="log")
    fig.savefig(path, dpi=90)
    return path


def score_histograms(pair_scores: pd.DataFrame, path: Path) -> Path:
    """Teacher vs student held-out score distributions, one panel per set."""
    sets = list(dict.fromkeys(pair_scores["set"]))
    fig = Figure(figsize=(5 * len(sets), 3.5), layout="constrained")
    axes = fig.subplots(1, len(sets), squeeze=False)
    for ax, name in zip(axes[0], sets):
        part = pair_scores[pair_scores["set"] == name]
        ax.hist(part["teacher_score"], bins=40, alpha=0.6, label="teacher")
        ax.hist(part["student_score"], bins=40, alpha=0.6, label="student")
        ax.set(title=f"{name}: held-out scores", xlabel="score")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    return path


def confirmation_intervals(table: pd.DataFrame, metric: str, path: Path) -> Path:
    """Each finalist's difference to the baseline with its 95% interval, and the zero line."""
    rows = table[table["config"] != "baseline"].reset_index(drop=True)
    fig = Figure(figsize=(7, 1.2 + 0.6 * max(len(rows), 1)), layout="constrained")
    ax = fig.subplots()
    colours = {"better": "tab:green", "worse": "tab:red", "no difference": "tab:grey", "unstable": "tab:orange"}
    for i, row in rows.iterrows():
        error = [[row["diff_mean"] - row["diff_low"]], [row["diff_high"] - row["diff_mean"]]]
        ax.errorbar(row["diff_mean"], i, xerr=error,
                    fmt="o", capsize=4, color=colours.get(row["verdict"], "black"), label=row["verdict"])
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), [f"trial {t}" for t in rows["trial"]])
    ax.invert_yaxis()
    ax.set(xlabel=f"{metric}: finalist - baseline (95% interval, seeds x pairs)", title="Confirmation")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.savefig(path, dpi=110)
    return path
