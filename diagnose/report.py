"""The `diagnose` report: Markdown tables (report.md), PNG figures and diagnosis.json in one folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend on training nodes

from diagnose.diagnosis import Diagnosis, fold_spread
from diagnose.stats import LENGTH_MATCH_TOLERANCE
from diagnose.verdicts import MIN_GAP, NOISE_Z

FIGURES = "figures"
METRIC_ROWS = ["n_pairs", "d_acc", "d_acc_ties_correct", "tie_rate", "identical_rate", "auc", "teacher_score_mean",
               "teacher_score_std", "student_score_mean", "student_score_std", "score_diff", "standardized_diff",
               "length_ratio", "length_baseline_acc", "score_length_spearman", "length_matched_d_acc",
               "length_matched_pairs"]


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(value)
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 2 else f"{value:.{digits}f}"


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _header(d: Diagnosis) -> str:
    c = d.cfg
    steps = d.histories.train[-1][0] if d.histories.train else math.nan
    temperature = (f"adaptive {c.loss.t_a}+{c.loss.t_b}*|diff| in [{c.loss.t_min}, {c.loss.t_max}]"
                   if c.loss.adaptive_temperature else f"{c.loss.temperature}")
    sets = ", ".join(f"`{n}` ({r.role}, {len(r.pairs)} pairs from `{r.source}`)" for n, r in d.sets.items())
    return (f"# Critic diagnosis\n\nCheckpoint `{d.checkpoint}`: lr {c.train.lr:g}, {c.train.epochs} epoch(s), "
            f"{_fmt(steps)} steps of {c.train.batch_size} pairs, score reduction `{c.score.reduction}`, "
            f"temperature {temperature}.\n\nDatasets: {sets}.")


def _verdicts(d: Diagnosis) -> str:
    rows = [[v.cause, f"**{v.status}**", v.value, v.evidence] for v in d.verdicts]
    return "## Verdicts\n\n" + md_table(["cause", "verdict", "number", "evidence"], rows)


def _bridge(d: Diagnosis) -> str:
    if not d.others:
        return ""
    rows, previous = [], None
    for label, values in d.bridge:
        row = [label]
        for name in d.others:
            step = "" if previous is None else f" ({values[name] - previous[name]:+.3f})"
            row.append(f"{_fmt(values[name])}{step}")
        rows.append(row)
        previous = values
    return ("## From the training number to each dataset\n\nEach row changes one thing; the bracket is the "
            "change from the row above (learning during the epoch, overfitting, shift, tie rule).\n\n"
            + md_table(["d_acc", *d.others], rows))


def _per_dataset(d: Diagnosis) -> str:
    table = d.table()
    count = lambda v: str(int(v)) if math.isfinite(v) else "n/a"  # noqa: E731
    rows = [[name, *[count(table.loc[name, s]) if name.endswith("pairs") else table.loc[name, s]
                     for s in table.columns]] for name in METRIC_ROWS]
    return "## Per-dataset metrics\n\n" + md_table(["metric", *table.columns], rows)


def _ties(d: Diagnosis) -> str:
    rows = [[n, r.metrics["d_acc"], r.metrics["d_acc_ties_correct"], r.metrics["tie_rate"],
             r.metrics["identical_rate"]] for n, r in d.sets.items()]
    return ("## Tie rule\n\nTraining counts a pair correct when teacher > student (strict); a `<=`/`>=` script "
            "counts ties differently. The difference is the tie rate, mostly pairs with identical responses "
            "(the engine scores them in one row, so they tie exactly).\n\n"
            + md_table(["dataset", "strict (>)", "ties correct (>=)", "difference", "identical responses"], rows))


def _overfit_shift(d: Diagnosis) -> str:
    rows = [["progressive (first epoch)", d.progressive, "", d.progressive_source]]
    for name, r in d.sets.items():
        m = r.metrics
        rows.append([name, m["d_acc"], f"± {_fmt(NOISE_Z * m['d_acc_se'])}",
                     f"{r.role}, {m['n_pairs']:.0f} pairs"])
    return ("## Overfitting vs shift\n\nOverfitting = post-hoc train >> val; shift = val >> another file. "
            f"A gap counts when it exceeds {MIN_GAP} and {NOISE_Z:g} standard errors of the difference. "
            "Progressive d_acc scores each batch before its update, averaged over the first epoch, so it lags "
            "the final critic.\n\n" + md_table(["set", "d_acc", f"{NOISE_Z:g} SE", "note"], rows)
            + f"\n\n![d_acc per dataset]({FIGURES}/d_acc.png)")


def _shortcut(d: Diagnosis) -> str:
    rows = []
    for name, r in d.sets.items():
        m = r.metrics
        rows.append([name, m["d_acc"], m["length_baseline_acc"], m["d_acc"] - m["length_baseline_acc"],
                     abs(m["score_length_spearman"]),
                     f"{_fmt(m['teacher_longer_d_acc'])} ({m['teacher_longer_pairs']:.0f})",
                     f"{_fmt(m['teacher_shorter_d_acc'])} ({m['teacher_shorter_pairs']:.0f})",
                     f"{_fmt(m['length_matched_d_acc'])} ({m['length_matched_pairs']:.0f})"])
    return (f"## Shortcut check\n\nLength-only baseline: the longer response wins. Buckets by relative response "
            f"length difference (matched: < {LENGTH_MATCH_TOLERANCE:.0%}); a length-following critic is right when "
            f"the teacher is longer and wrong when it is shorter.\n\n"
            + md_table(["dataset", "d_acc", "length-only", "critic - length", "abs spearman(score, length)",
                        "d_acc teacher longer (n)", "teacher shorter (n)", "length-matched (n)"], rows)
            + f"\n\n![score vs length]({FIGURES}/score_vs_length.png)")


def _shift(d: Diagnosis) -> str:
    rows = []
    for name, r in d.sets.items():
        m = r.metrics
        rows.append([name] + [f"{m[f'{p}_tokens_mean']:.1f} / {m[f'{p}_tokens_median']:.0f} / "
                              f"{m[f'{p}_tokens_p90']:.0f}" for p in ("prompt", "teacher", "student")]
                    + [m["identical_rate"], m["js_prompt"], m["js_teacher"], m["js_student"]])
    return ("## Shift description\n\nToken lengths as mean / median / p90; JS = Jensen-Shannon distance (base 2, "
            "0 = same, 1 = disjoint) of unigram token frequencies against the training split. The val row is the "
            "same-distribution reference (its JS is sampling noise).\n\n"
            + md_table(["dataset", "prompt tokens", "teacher tokens", "student tokens", "identical",
                        "JS prompt", "JS teacher", "JS student"], rows)
            + f"\n\n![lengths]({FIGURES}/lengths.png)\n\n![scores]({FIGURES}/scores.png)")


def _calibration(d: Diagnosis) -> str:
    val = d.sets["val"].metrics
    rows = []
    for name, r in d.sets.items():
        m = r.metrics
        shift = (m["score_level"] - val["score_level"]) / val["score_pooled_std"] if val["score_pooled_std"] else 0
        rows.append([name, m["teacher_score_mean"], m["student_score_mean"], m["score_level"], shift,
                     m["score_diff"], m["standardized_diff"], m["auc"]])
    return ("## Calibration\n\nA Bradley-Terry critic is trained on differences only: its absolute level is free "
            "to move between datasets. Compare score_diff / standardized diff (mean diff / pooled std) and AUC, "
            "not absolute scores.\n\n"
            + md_table(["dataset", "teacher mean", "student mean", "level", "level shift (val std)", "score_diff",
                        "standardized diff", "AUC"], rows))


def _health(d: Diagnosis) -> str:
    if not d.health:
        return "## Training health\n\nNo training history in the checkpoint."
    rows = [[h.check, f"**{h.status}**", h.value, h.advice] for h in d.health]
    return ("## Training health\n\n" + md_table(["check", "status", "value", "threshold / advice"], rows)
            + f"\n\n![training curves]({FIGURES}/training.png)")


def _folds(d: Diagnosis) -> str:
    if d.folds is None:
        return ""
    spread = fold_spread(d)
    per_fold = [[int(row[0]), *row[1:]] for row in d.folds.itertuples(index=False)]
    summary = [[name, *spread.loc[name]] for name in spread.index]
    return (f"## Fold critics\n\n{len(d.folds)} critics trained with the checkpoint's spec, each on all folds of "
            "the training split but one (`fold` = the held-out fold). The std of val d_acc is added to the noise "
            "limit of the verdicts.\n\n" + md_table(list(d.folds.columns), per_fold)
            + "\n\n" + md_table(["metric", "mean", "std", "min", "max"], summary))


def render_markdown(d: Diagnosis) -> str:
    parts = [_header(d), _verdicts(d), _bridge(d), _per_dataset(d), _ties(d), _overfit_shift(d), _shortcut(d),
             _shift(d), _calibration(d), _health(d), _folds(d)]
    if d.notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in d.notes))
    return "\n\n".join(p for p in parts if p) + "\n"


def _hist_pair(ax, teacher, student, title: str) -> None:
    bins = np.histogram_bin_edges(np.concatenate([teacher, student]), bins=30)
    ax.hist(teacher, bins=bins, alpha=0.6, label="teacher")
    ax.hist(student, bins=bins, alpha=0.6, label="student")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot_figures(d: Diagnosis, folder: Path, training_figure=None) -> None:
    """d_acc.png, scores.png, lengths.png, score_vs_length.png and (with a history and a training_figure) training.png.

    training_figure: the sweep's training figure (sweeper.figures.training_progress, passed in by the command so that
    diagnose imports nothing from sweeper): the same panels for a diagnosed critic as for a sweep trial."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, plot in (("d_acc", _plot_d_acc), ("scores", _plot_scores), ("lengths", _plot_lengths),
                       ("score_vs_length", _plot_score_vs_length)):
        fig = plot(d)
        fig.savefig(folder / f"{name}.png", dpi=110)
    if d.histories.train and training_figure is not None:
        training_figure(d.histories.train, d.histories.eval, ["val", *d.others], folder / "training.png", dpi=110)


def _plot_d_acc(d: Diagnosis):
    names = list(d.sets)
    fig = Figure(figsize=(max(6, 1.6 * len(names)), 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(names))
    for offset, key, label in ((-0.27, "d_acc", "strict (>)"), (0, "d_acc_ties_correct", "ties correct (>=)"),
                               (0.27, "length_baseline_acc", "length-only baseline")):
        ax.bar(x + offset, [d.sets[s].metrics[key] for s in names], width=0.27, label=label)
    if math.isfinite(d.progressive):
        ax.axhline(d.progressive, color="black", linestyle=":", label="progressive (training log)")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(xticks=x, xticklabels=names, ylim=(0, 1.05), ylabel="accuracy", title="d_acc per dataset")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def _plot_scores(d: Diagnosis):
    fig = Figure(figsize=(3.4 * len(d.sets), 3), layout="constrained")
    axes = fig.subplots(1, len(d.sets), squeeze=False)
    for ax, (name, result) in zip(axes[0], d.sets.items()):
        s = result.scores
        _hist_pair(ax, s["teacher_score"].to_numpy(), s["student_score"].to_numpy(), f"{name}: scores")
    return fig


def _plot_lengths(d: Diagnosis):
    fig = Figure(figsize=(3.4 * len(d.sets), 5.5), layout="constrained")
    axes = fig.subplots(2, len(d.sets), squeeze=False)
    for col, (name, result) in enumerate(d.sets.items()):
        pairs = result.pairs
        axes[0, col].hist([len(p) for p in pairs.prompt_ids], bins=30, color="tab:green")
        axes[0, col].set_title(f"{name}: prompt tokens", fontsize=9)
        _hist_pair(axes[1, col], np.array([len(t) for t in pairs.teacher_ids]),
                   np.array([len(s) for s in pairs.student_ids]), f"{name}: response tokens")
    return fig


def _plot_score_vs_length(d: Diagnosis):
    fig = Figure(figsize=(3.4 * len(d.sets), 3), layout="constrained")
    axes = fig.subplots(1, len(d.sets), squeeze=False)
    for ax, (name, result) in zip(axes[0], d.sets.items()):
        s = result.scores
        ax.scatter(s["teacher_length"], s["teacher_score"], s=4, alpha=0.4, label="teacher")
        ax.scatter(s["student_length"], s["student_score"], s=4, alpha=0.4, label="student")
        ax.set_title(f"{name}: rho={result.metrics['score_length_spearman']:.2f}", fontsize=9)
        ax.set_xlabel("response tokens", fontsize=8)
        ax.legend(fontsize=7)
    return fig


def to_json(d: Diagnosis) -> dict:
    """Machine-readable summary: verdicts, per-set metrics, health, folds."""
    clean = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None  # noqa: E731
    return {
        "checkpoint": str(d.checkpoint), "progressive_d_acc": clean(d.progressive),
        "verdicts": [{"cause": v.cause, "status": v.status, "value": clean(v.value), "evidence": v.evidence}
                     for v in d.verdicts],
        "sets": {n: {"role": r.role, "source": r.source, **{k: clean(v) for k, v in r.metrics.items()}}
                 for n, r in d.sets.items()},
        "health": [{"check": h.check, "status": h.status, "value": clean(h.value)} for h in d.health],
        "folds": None if d.folds is None else [{k: clean(v) for k, v in row.items()}
                                                for row in d.folds.to_dict(orient="records")],
        "notes": d.notes,
    }


def write_report(d: Diagnosis, out_dir: str | Path, training_figure=None) -> tuple[Path, str]:
    """Write report.md, figures/*.png and diagnosis.json into out_dir; returns (report path, Markdown)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_figures(d, out / FIGURES, training_figure)
    markdown = render_markdown(d)
    (out / "report.md").write_text(markdown)
    (out / "diagnosis.json").write_text(json.dumps(to_json(d), indent=2, allow_nan=False))
    return out / "report.md", markdown
