"""How a study looks in the MLflow UI: run names, colours, and a sort key that puts the right runs on the charts.

MLflow's chart view draws only the runs visible in the runs table, and of those only the first 10 by
default; a nested child run is drawn only after its parent row is expanded. So search trials are
top-level runs (tagged with the study and its parent run; the confirmation runs stay nested under the
study's run), and every run carries `sweep.sort_key`. The link `run` prints sorts by that tag, so the
page opens in chart view on: the baseline, your candidates (sweep.candidates), the trials still running, then
finished trials best first, pruned, failed, then the study's own run and its confirmation runs.
"""

from __future__ import annotations

import math
import struct
from typing import Any
from urllib.parse import quote

from critic.sections import short_params

SORT_TAG = "sweep.sort_key"
BASELINE_COLOR = "#000000"
# Tableau 10 without its grey: no trial line can be mistaken for the black baseline.
TRIAL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
# The study's run comes before its confirmation runs: a sorted MLflow table shows nested runs flat (mlflow#15802).
_RANKS = {"baseline": "0", "candidate": "0c", "running": "1", "complete": "2", "pruned": "3", "failed": "4",
          "parent": "7", "confirm": "8"}


def ordered_hex(value: float) -> str:
    """16 hex digits whose string order is the numeric order of `value` (IEEE 754 bits, sign folded)."""
    bits = struct.unpack(">Q", struct.pack(">d", value))[0]
    bits = (~bits & 0xFFFFFFFFFFFFFFFF) if bits >> 63 else bits | (1 << 63)
    return f"{bits:016x}"


def sort_key(kind: str, value: float | None = None, direction: str = "maximize") -> str:
    """The tag value that orders a run: `kind` is one of _RANKS; a finished trial is ranked by its value, best first,
    a candidate by its trial number (the spec's order)."""
    rank = _RANKS[kind]
    if kind == "candidate" and value is not None:
        return rank + f"{int(value):06d}"
    if kind != "complete" or value is None or not math.isfinite(value):
        return rank
    return rank + ordered_hex(-value if direction == "maximize" else value)


def run_name(trial_number: int, sampled: dict[str, Any], baseline: bool, candidate: str | None = None,
             limit: int = 120) -> str:
    """'t003 lr=0.000312 warmup_steps=14 adaptive_temperature=on': the sampled values, readable in a legend;
    your own configs by name ('t000 baseline', "t001 candidate '3 epochs'")."""
    if baseline:
        return f"t{trial_number:03d} baseline"
    if candidate is not None:
        name = f"t{trial_number:03d} candidate {candidate!r}"
    else:
        name = " ".join([f"t{trial_number:03d}", *([short_params(sampled)] if sampled else [])])
    return name if len(name) <= limit else name[:limit - 1] + "…"


def confirm_run_name(config: str, seed_index: int) -> str:
    """A confirmation run: 'confirm-trial-3-seed1', 'confirm-baseline-seed2', "confirm-'3 epochs'-seed1"."""
    label = config if config == "baseline" or config.startswith("trial-") else repr(config)
    return f"confirm-{label}-seed{seed_index}"


def run_color(trial_number: int, baseline: bool) -> str:
    return BASELINE_COLOR if baseline else TRIAL_COLORS[trial_number % len(TRIAL_COLORS)]


def charts_link(base: str, experiment_id: str) -> str:
    """The runs page in chart view, sorted by the sort key (baseline first, then the best trials)."""
    order = quote(f"tags.`{SORT_TAG}`", safe="")
    return f"{base}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART&orderByKey={order}&orderByAsc=true"
