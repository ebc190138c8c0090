"""The study report: one self-contained HTML file (plotly.js inlined once) that opens offline.

Sections: every trial's training and held-out curves (one line per trial; the baseline thick and black,
the best trial red, pruned and failed trials dimmed; the legend groups lines by kind, so a click hides all
pruned trials at once), the objective by trial number with the running best, Optuna's parameter
importances and parallel coordinates, best vs baseline per metric (the numbers `run` prints), and the
confirmation table and verdict when the study has one. Data: sweeper.report_data.
"""

from __future__ import annotations

import html
import math
import sys
import time
import warnings
from pathlib import Path

import optuna
import plotly.graph_objects as go
from mlflow import MlflowClient
from optuna.trial import TrialState
from plotly.subplots import make_subplots

from sweeper.board import trial_params
from sweeper.report_data import KINDS, ReportData, gather, running_best
from sweeper.stores import DEFAULT_ROOT

ARTIFACT_DIR = "report"  # on the parent run: report/<study>-report.html

# kind -> (legend label, colour, width, opacity): highlighted lines stand out, pruned and failed fade
STYLE = {
    "baseline": ("baseline", "black", 3.5, 1.0),
    "candidate": ("candidate", "#2ca02c", 2.5, 1.0),
    "best": ("best", "#d62728", 2.5, 1.0),
    "complete": ("complete", "#1f77b4", 1.2, 0.55),
    "pruned": ("pruned", "#7f7f7f", 1.0, 0.25),
    "failed": ("failed", "#c7c7c7", 1.0, 0.2),
    "running": ("running", "#bcbd22", 1.0, 0.35),
}
_COLUMNS = 3
CANDIDATE_COLOURS = ("#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")  # one per planned change


def report_path(storage_url: str, study_name: str) -> Path:
    """Beside the stores: the SQLite storage's folder (default mlruns/), else mlruns/."""
    folder = DEFAULT_ROOT
    if storage_url.startswith("sqlite:///") and ":memory:" not in storage_url:
        folder = Path(storage_url[len("sqlite:///"):]).parent
    return folder / f"{study_name}-report.html"


def _label(kind: str, number: int, multi: bool, data: ReportData) -> str:
    if kind == "baseline":
        return f"baseline (trial {number})"
    if kind == "candidate":
        return f"candidate {data.candidates[number]!r} (trial {number})"
    if kind == "best":
        return "Pareto front" if multi else f"best (trial {number})"
    return STYLE[kind][0]


def curves_figure(data: ReportData, keys: list[str], title: str) -> go.Figure:
    """One panel per metric, one Scattergl line per trial; one legend entry per kind (legendgroup = kind)."""
    rows = max(1, math.ceil(len(keys) / _COLUMNS))
    figure = make_subplots(rows=rows, cols=_COLUMNS, subplot_titles=keys, horizontal_spacing=0.06,
                           vertical_spacing=0.12 if rows > 1 else 0.1)
    shown: set[str] = set()
    multi = len(data.directions) > 1
    ordered = sorted(data.curves, key=lambda c: -KINDS.index(c.kind))  # highlighted lines drawn on top
    for index, key in enumerate(keys):
        row, col = index // _COLUMNS + 1, index % _COLUMNS + 1
        for trial in ordered:
            if key not in trial.curves:
                continue
            steps, values = trial.curves[key]
            _, colour, width, opacity = STYLE[trial.kind]
            if trial.kind == "candidate":  # each planned change its own colour
                colour = CANDIDATE_COLOURS[sorted(data.candidates).index(trial.number) % len(CANDIDATE_COLOURS)]
            label = _label(trial.kind, trial.number, multi, data)
            figure.add_trace(go.Scattergl(
                x=steps, y=values, mode="lines", name=label, legendgroup=trial.kind, showlegend=label not in shown,
                line={"color": colour, "width": width}, opacity=opacity, meta={"trial": trial.number,
                                                                               "kind": trial.kind, "metric": key},
                hovertemplate=f"trial {trial.number} ({trial.state.lower()})<br>step %{{x}}<br>{key} "
                              f"%{{y:.4f}}<extra></extra>"), row=row, col=col)
            shown.add(label)
    figure.update_xaxes(title_text="optimizer step")
    figure.update_layout(title=title, height=330 * rows, template="plotly_white", hovermode="closest",
                         legend={"title": {"text": "click to hide a kind"}})
    return figure


def objective_figure(data: ReportData) -> go.Figure:
    """Each objective by trial number: finished values, pruned trials at their last report, the running best."""
    figure = make_subplots(rows=len(data.objectives), cols=1, subplot_titles=data.objectives)
    for index, (name, direction) in enumerate(zip(data.objectives, data.directions)):
        values = [t.values[index] if t.state == TrialState.COMPLETE and t.values else math.nan for t in data.trials]
        numbers = [t.number for t in data.trials]
        for kind in ("complete", "candidate", "best", "baseline"):
            chosen = [(n, v) for n, v in zip(numbers, values) if data.kinds[n] == kind and math.isfinite(v)]
            if chosen:
                figure.add_trace(go.Scatter(
                    x=[n for n, _ in chosen], y=[v for _, v in chosen], mode="markers",
                    name=_label(kind, chosen[0][0], len(data.objectives) > 1, data) if kind in ("best", "baseline")
                    else {"complete": "complete", "candidate": "your planned changes"}[kind],
                    text=[data.candidates.get(n, "") for n, _ in chosen],
                    legendgroup=kind, showlegend=index == 0, meta={"kind": kind, "objective": name},
                    marker={"color": STYLE[kind][1], "size": 11 if kind != "complete" else 7}), row=index + 1, col=1)
        pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in data.trials
                  if t.state == TrialState.PRUNED and t.intermediate_values and index == 0]
        if pruned:
            figure.add_trace(go.Scatter(
                x=[n for n, _ in pruned], y=[v for _, v in pruned], mode="markers", name="pruned (last report)",
                marker={"color": STYLE["pruned"][1], "symbol": "x", "size": 6}, opacity=0.6,
                meta={"kind": "pruned", "objective": name}), row=1, col=1)
        if len(data.objectives) == 1:
            figure.add_trace(go.Scatter(
                x=numbers, y=running_best(values, direction == "maximize"), mode="lines", name="running best",
                line={"color": "#ff7f0e", "shape": "hv", "width": 2}, meta={"kind": "running_best"}), row=1, col=1)
    figure.update_xaxes(title_text="trial number")
    figure.update_layout(title="Objective by trial", height=380 * len(data.objectives), template="plotly_white")
    return figure


def optuna_figure(study: optuna.Study, data: ReportData, name: str) -> tuple[go.Figure | None, str]:
    """Optuna's own plot and its warnings; or None and why it cannot be drawn (e.g. fewer than 2 complete trials)."""
    plot = {"importances": optuna.visualization.plot_param_importances,
            "parallel": optuna.visualization.plot_parallel_coordinate}[name]
    complete = sum(t.state == TrialState.COMPLETE for t in data.trials)
    if complete < 2:
        return None, f"needs at least 2 COMPLETE trials (this study has {complete})"
    multi = len(data.directions) > 1
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. "fewer than 2 trials in a regime": shown below
            warnings.simplefilter("always")
            figure = plot(study, target=lambda t: t.values[0], target_name=data.objectives[0]) if multi else plot(study)
    except Exception as exc:  # an optional figure: the report says why it is missing instead of failing
        return None, f"{type(exc).__name__}: {exc}"
    return figure, " ".join(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))


def comparison_table(data: ReportData) -> str:
    """Best vs baseline and your candidates: the numbers and layout of `run`'s summary table, as HTML."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _, _ in data.comparison)
    rows = [("trial", [str(t.number) if t else "-" for _, t, _ in data.comparison]),
            ("state", [t.state.name if t else "-" for _, t, _ in data.comparison])]
    keys = sorted(set().union(*[m.keys() for _, _, m in data.comparison]))
    rows += [(key, [f"{m.get(key, math.nan):.4f}" for _, _, m in data.comparison]) for key in keys]
    rows += [(key, [str(trial_params(t).get(key, "-")) if t else "-" for _, t, _ in data.comparison])
             for key in data.param_keys]
    body = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                   for k, cells in rows)
    return f'<table class="numbers" id="best-vs-baseline"><tr><th></th>{head}</tr>{body}</table>'


def confirmation_section(data: ReportData) -> str:
    if not data.confirmation:
        return "<p class='note'>not confirmed yet: `sweep.py confirm` re-runs the finalists and the baseline " \
               "with new seeds and gives a verdict.</p>"
    from sweeper.board import format_table, split_text
    result = data.confirmation
    return (f"<p>on {html.escape(result['metric'])}, {len(result['seeds'])} new seeds per config, paired with the "
            f"baseline; 95% intervals over seeds and held-out pairs; scored {html.escape(split_text(result))}</p>"
            f"<pre id='confirmation-table'>{html.escape(format_table(result))}</pre>"
            f"<pre id='verdict'>{html.escape(result['verdict'])}</pre>")


def _counts(data: ReportData) -> str:
    counts = {}
    for trial in data.trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())) or "no trials yet"


def render(study: optuna.Study, data: ReportData) -> str:
    """The HTML page: plotly.js once in <head>, every figure a div that uses it."""
    from plotly.offline import get_plotlyjs

    def fig(figure: go.Figure, div_id: str) -> str:
        return figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                              config={"displaylogo": False, "responsive": True})

    sections = [f"<h1>Study {html.escape(data.study_name)}</h1><p>{len(data.trials)} trials: {_counts(data)}. "
                f"Objective: " + ", ".join(f"{html.escape(o)} ({d})" for o, d in zip(data.objectives, data.directions))
                + f". Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>"]
    sections.append("<h2>Best vs baseline and your planned changes (search, one seed per trial)</h2>"
                    + comparison_table(data))
    sections.append("<h2>Confirmation</h2>" + confirmation_section(data))
    sections.append("<h2>Objective</h2>" + fig(objective_figure(data), "objective"))
    for keys, title, div_id in ((data.train_keys, "Training curves (first row: critic/avg_*, the mean over the last "
                                 "eval.every_steps steps; then each step's batch, before its update)",
                                 "training-curves"),
                                (data.heldout_keys, "Held-out curves (every eval.every_steps)", "heldout-curves")):
        if keys:
            sections.append(f"<h2>{title}</h2>" + fig(curves_figure(data, keys, title), div_id))
        else:
            sections.append(f"<h2>{title}</h2><p class='note'>no curves: no trial run of this study in MLflow has "
                            f"logged them</p>")
    for name, title in (("importances", "Parameter importances (Optuna)"),
                        ("parallel", "Parallel coordinates (Optuna)")):
        figure, note = optuna_figure(study, data, name)
        if figure is None:
            sections.append(f"<h2>{title}</h2><p class='note'>skipped: {html.escape(note)}</p>")
        else:
            sections.append(f"<h2>{title}</h2>" + fig(figure, name)
                            + (f"<p class='note'>Optuna: {html.escape(note)}</p>" if note else ""))
    style = ("body{font-family:sans-serif;margin:1.5em;max-width:1500px}table.numbers td,table.numbers th"
             "{padding:2px 10px;text-align:right;font-family:monospace}pre{background:#f6f6f6;padding:8px;"
             "overflow-x:auto}.note{color:#666}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(data.study_name)} report</title>"
            f"<style>{style}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            + "\n".join(sections) + "</body></html>")


def build_report(study: optuna.Study, client: MlflowClient) -> str:
    return render(study, gather(study, client))


def write_report(study: optuna.Study, client: MlflowClient, path: Path) -> Path:
    """Write the report to `path` (its folder is created) and return the path."""
    page = build_report(study, client)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def write_and_log(study, tracker, storage_url: str, output: Path | None = None) -> Path:
    """Write the report and attach it to the study's parent run (when the study has one)."""
    path = write_report(study, tracker.client, output or report_path(storage_url, study.study_name))
    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    if parent_id:
        tracker.log_file(parent_id, path, ARTIFACT_DIR)
    return path


def report_quietly(sweep) -> None:
    """The report at the end of `run`/`confirm` (`sweep`: the study's handle, sweeper/sweep.py): a failure is one
    warning line and a tag, never a failed sweep."""
    try:
        path = write_and_log(sweep.study, sweep.tracker, sweep.storage_url)
    except Exception as exc:  # the sweep's results are stored already; the report is a view of them
        reason = f"{type(exc).__name__}: {exc}"
        print(f"[sweep] warning: the report could not be built ({reason}); retry with `sweep.py report`",
              file=sys.stderr)
        try:
            sweep.tracker.set_tags(sweep.parent_id, {"report.error": reason[:5000]})
        except Exception:  # the tracking store itself may be what failed
            pass
        return
    print(f"[sweep] report: {path} (also on the parent run, {ARTIFACT_DIR}/{path.name})")
