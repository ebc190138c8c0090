"""Figures: training progress (trials and diagnose), held-out score histograms, confirmation intervals."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend on training nodes

from critic.reporting import series, trailing_name


def training_progress(train_history, eval_history, eval_sets: list[str], path: Path, dpi: int = 90) -> Path:
    """The one training figure (sweep trials and diagnose): d_acc (0.5 line), score_diff (0 line), mean scores,
    grad_norm, length_ratio (0.9-1.1 band) and lr per step; d_acc and score_diff as their trailing mean (bold)
    over each step's batch (faint); held-out sets as points at each evaluation."""
    fig = Figure(figsize=(15, 7))
    # Fixed margins, not a layout engine: a 2x3 grid of titled panels always fits these, and a layout engine
    # measures every text twice, which doubles the drawing time of a figure that every trial saves.
    axes = fig.subplots(2, 3, gridspec_kw=dict(left=0.04, right=0.99, bottom=0.07, top=0.96, wspace=0.16, hspace=0.3))
    for ax in axes.flat:  # five ticks an axis, not up to ten: each tick is a few artists to draw, a quarter of the time
        ax.locator_params(nbins=4)
    for ax, metric in ((axes[0, 0], "d_acc"), (axes[0, 1], "score_diff")):
        ax.plot(*series(train_history, f"critic/{metric}"), color="C0", alpha=0.25, linewidth=0.8,
                label="train batch (before update)")
        ax.plot(*series(train_history, trailing_name(f"critic/{metric}")), color="C0", linewidth=2,
                label="train, mean of the last eval.every_steps steps")
        for index, name in enumerate(eval_sets, start=1):  # C0 is the training curve's
            ax.plot(*series(eval_history, f"{name}/{metric}"), marker="o", color=f"C{index}", label=name)
    axes[0, 0].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    _panel(axes[0, 0], "d_acc", xlabel="step", ylim=(-0.02, 1.02))
    axes[0, 1].axhline(0.0, color="grey", linestyle="--", linewidth=1)
    _panel(axes[0, 1], "score_diff (teacher - student)", xlabel="step")
    axes[0, 2].plot(*series(train_history, "critic/teacher_score_mean"), label="teacher (train)")
    axes[0, 2].plot(*series(train_history, "critic/student_score_mean"), label="student (train)")
    _panel(axes[0, 2], "mean score", xlabel="step")
    axes[1, 0].plot(*series(train_history, "critic/grad_norm"))
    _panel(axes[1, 0], "grad_norm (before clipping)", xlabel="step", yscale="log")
    axes[1, 1].plot(*series(train_history, "critic/length_ratio"))
    axes[1, 1].axhspan(0.9, 1.1, color="green", alpha=0.1)
    _panel(axes[1, 1], "length_ratio (student / teacher tokens)", xlabel="step")
    axes[1, 2].plot(*series(train_history, "critic/lr"))
    _panel(axes[1, 2], "lr", xlabel="step")
    axes[1, 2].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))  # "1e-4" once, not 0.000105 in the gap
    for ax in (axes[0, 0], axes[0, 1], axes[0, 2]):
        ax.legend(fontsize=8)
    _save(fig, path, dpi)
    return path


def score_histograms(pair_scores: pd.DataFrame, path: Path) -> Path:
    """Teacher vs student held-out score distributions, one panel per set."""
    sets = list(dict.fromkeys(pair_scores["set"]))
    fig = Figure(figsize=(5 * len(sets), 3.5))  # fixed margins, as training_progress's
    axes = fig.subplots(1, len(sets), squeeze=False, gridspec_kw=dict(left=0.09 / len(sets), right=0.99,
                                                                       bottom=0.14, top=0.91, wspace=0.2))
    for ax, name in zip(axes[0], sets):
        ax.locator_params(nbins=4)  # as training_progress's
        part = pair_scores[pair_scores["set"] == name]
        ax.hist(part["teacher_score"], bins=40, alpha=0.6, label="teacher", histtype="stepfilled")
        ax.hist(part["student_score"], bins=40, alpha=0.6, label="student", histtype="stepfilled")
        _panel(ax, f"{name}: held-out scores", xlabel="score")
        ax.legend(fontsize=8)
    _save(fig, path, 90)
    return path


def _panel(ax, title: str, **settings) -> None:
    """A panel's title at a fixed height (matplotlib otherwise measures every tick label to place it) and settings."""
    ax.set_title(title, y=1.0)
    ax.set(**settings)


def _save(fig: Figure, path: Path, dpi: int) -> None:
    """PNG at zlib level 1: a tenth larger than the default 6, in a fraction of the time (every trial saves two)."""
    fig.savefig(path, dpi=dpi, pil_kwargs={"compress_level": 1})


def confirmation_intervals(table: pd.DataFrame, metric: str, path: Path, title: str = "Confirmation") -> Path:
    """Each candidate's and finalist's difference to the baseline with its simultaneous interval (the verdict's)."""
    rows = table[table["config"] != "baseline"].reset_index(drop=True)
    fig = Figure(figsize=(7, 1.2 + 0.6 * max(len(rows), 1)), layout="constrained")
    ax = fig.subplots()
    colours = {"better": "tab:green", "worse": "tab:red", "no difference": "tab:grey", "unstable": "tab:orange"}
    for i, row in rows.iterrows():
        error = [[row["diff_mean"] - row["diff_low"]], [row["diff_high"] - row["diff_mean"]]]
        ax.errorbar(row["diff_mean"], i, xerr=error,
                    fmt="o", capsize=4, color=colours.get(row["verdict"], "black"), label=row["verdict"])
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)), list(rows["config"]))  # trial-<n>, or a candidate's name
    ax.invert_yaxis()
    level = f"{rows['diff_level'].iloc[0]:.1%} simultaneous" if len(rows) and "diff_level" in rows else "95%"
    ax.set(xlabel=f"{metric}: config - baseline ({level} interval, seeds x prompts)")
    ax.set_title(title, fontsize=9, wrap=True)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.savefig(path, dpi=110)
    return path
