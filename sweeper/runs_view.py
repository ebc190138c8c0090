"""How a study looks in the MLflow UI: run names, colours, and a sort key that puts the right runs on the charts.

MLflow's chart view draws only the runs visible in the runs table, and of those only the first 10 by
default; a nested child run is drawn only after its parent row is expanded. So search trials are
top-level runs (tagged with the study and its parent run; the confirmation runs stay nested under the
study's run), and every run carries `sweep.sort_key`. The link `run` prints sorts by that tag, so the
page opens in chart view on: the baseline, the trials still running, then finished trials best first,
pruned, failed, then the study's own run and its confirmation runs.
"""

from __future__ import annotations

import math
import struct
from typing import Any
from urllib.parse import quote

SORT_TAG = "sweep.sort_key"
BASELINE_COLOR = "#000000"
# Tableau 10 without its grey: no trial line can be mistaken for the black baseline.
TRIAL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
# The study's run comes before its confirmation runs: a sorted MLflow table shows nested runs flat (mlflow#15802).
_RANKS = {"baseline": "0", "running": "1", "complete": "2", "pruned": "3", "failed": "4", "parent": "7",
          "confirm": "8"}


def ordered_hex(value: float) -> str:
    """16 hex digits whose string order is the numeric order of `value` (IEEE 754 bits, sign folded)."""
    bits = struct.unpack(">Q", struct.pack(">d", value))[0]
    bits = (~bits & 0xFFFFFFFFFFFFFFFF) if bits >> 63 else bits | (1 << 63)
    return f"{bits:016x}"


def sort_key(kind: str, value: float | None = None, direction: str = "maximize") -> str:
    """The tag value that orders a run: `kind` is one of _RANKS; a finished trial is ranked by its value, best first."""
    rank = _RANKS[kind]
    if kind != "complete" or value is None or not math.isfinite(value):
        return rank
    return rank + ordered_hex(-value if direction == "maximize" else value)


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def run_name(trial_number: int, sampled: dict[str, Any], baseline: bool, limit: int = 120) -> str:
    """'t003 lr=0.000312 warmup_steps=14 adaptive_temperature=on': the sampled values, readable in a legend."""
    if baseline:
        return f"t{trial_number:03d} baseline"
    parts = [f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in sampled.items()]
    name = " ".join([f"t{trial_number:03d}", *parts])
    return name if len(name) <= limit else name[:limit - 1] + "…"


def run_color(trial_number: int, baseline: bool) -> str:
    return BASELINE_COLOR if baseline else TRIAL_COLORS[trial_number % len(TRIAL_COLORS)]


def charts_link(base: str, experiment_id: str) -> str:
    """The runs page in chart view, sorted by the sort key (baseline first, then the best trials)."""
    order = quote(f"tags.`{SORT_TAG}`", safe="")
    return f"{base}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART&orderByKey={order}&orderByAsc=true"
