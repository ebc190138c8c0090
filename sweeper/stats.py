"""Paired statistics for the confirmation stage: is a finalist really better than the baseline?

Design: every configuration is trained with the same S seeds and scored on the same N held-out
pairs, a crossed seeds x pairs design. The mean over seeds of a metric varies for two reasons:
  - seeds: another seed gives another critic. Estimated from the S per-seed values:
    var_seed = var(values, ddof=1) / S (for a difference: of the per-seed paired differences);
  - pairs: another draw of N held-out pairs gives another number. Estimated by a paired bootstrap
    over pairs (scipy.stats.bootstrap, the same resampled pairs for every config and seed) of the
    seed-averaged statistic, recomputed through critic.metrics (one code path).
se^2 = var_seed + var_pair. Both parts contain the seed x pair interaction, so se is slightly
conservative. The interval and p-value use Student's t with Welch-Satterthwaite degrees of freedom
(the seed part has S-1, the bootstrap part is treated as known). K finalists are compared with
Holm's step-down correction (family-wise error 5%).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from critic.metrics import pair_metric

LEVEL = 0.95
POWER = 0.80


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    se: float
    df: float  # Welch-Satterthwaite degrees of freedom (inf when the seed part is 0)


@dataclass(frozen=True)
class ConfigScores:
    """One configuration's results over seeds: the metric per seed and, where it has them, per-pair scores."""
    label: str
    seed_values: dict[int, float]  # seed index -> metric on all held-out pairs (the trial's reported value)
    pair_frames: dict[int, pd.DataFrame] | None  # seed index -> per-pair scores of the objective's set


def estimate(seed_values: np.ndarray, pair_variance: float, level: float = LEVEL) -> Estimate:
    """Mean over seeds with an interval that adds seed-to-seed and held-out-pair variation."""
    values = np.asarray(seed_values, dtype=np.float64)
    n = len(values)
    seed_var = float(values.var(ddof=1)) / n if n > 1 else 0.0
    total = seed_var + pair_variance
    se = math.sqrt(total)
    df = total ** 2 / (seed_var ** 2 / (n - 1)) if seed_var > 0 and n > 1 else math.inf
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se if se > 0 else 0.0
    mean = float(values.mean())
    return Estimate(mean, mean - half, mean + half, se, df)


def p_value(est: Estimate) -> float:
    """Two-sided p-value of 'the true difference is 0'."""
    if est.se == 0:
        return 1.0 if est.mean == 0 else 0.0
    return float(2 * stats.t.sf(abs(est.mean) / est.se, est.df))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (scipy.stats offers only the BH/BY FDR corrections)."""
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def pair_bootstrap(metric: str, configs: list[ConfigScores], seeds: list[int], n_resamples: int,
                   rng_seed: int = 0) -> np.ndarray | None:
    """(configs, resamples) bootstrap distribution of each config's seed-averaged metric over held-out pairs.

    None when a config has no per-pair scores (a training metric): then only seeds are resampled.
    """
    if any(c.pair_frames is None for c in configs):
        return None
    reference = configs[0].pair_frames[seeds[0]]
    lengths = (reference["teacher_length"].to_numpy(), reference["student_length"].to_numpy())
    arrays: list[np.ndarray] = [*lengths]
    for config in configs:
        for seed in seeds:
            frame = config.pair_frames[seed]
            if not np.array_equal(frame["pair_id"].to_numpy(), reference["pair_id"].to_numpy()):
                raise ValueError(f"{config.label} seed {seed} was scored on other held-out pairs than "
                                 f"{configs[0].label}; a paired comparison needs the same pairs")
            arrays += [frame["teacher_score"].to_numpy(), frame["student_score"].to_numpy()]

    def seed_averaged(*resampled, axis=-1):  # (..., pairs) each -> (configs, ...)
        teacher_lengths, student_lengths, scores = resampled[0], resampled[1], resampled[2:]
        out, k = [], 0
        for _ in configs:
            per_seed = []
            for _ in seeds:
                per_seed.append(pair_metric(metric, scores[k], scores[k + 1], teacher_lengths, student_lengths))
                k += 2
            out.append(np.mean(per_seed, axis=0))
        return np.stack(out)

    result = stats.bootstrap(tuple(arrays), seed_averaged, paired=True, vectorized=True, n_resamples=n_resamples,
                             method="percentile", rng=rng_seed)
    return np.asarray(result.bootstrap_distribution)


@dataclass(frozen=True)
class Comparison:
    label: str
    seeds: list[int]
    n_pairs: int
    value: Estimate  # this config's metric, mean over seeds
    diff: Estimate  # this config minus the baseline, paired by seed and pair
    p_value: float
    p_holm: float
    verdict: str  # better | worse | no difference | unstable (diverged or failed on some seeds)
    missing_seeds: list[int]

    def row(self) -> dict:
        out = {"config": self.label, "seeds": len(self.seeds), "n_pairs": self.n_pairs}
        out.update({f"mean_{k}": v for k, v in asdict(self.value).items() if k != "df"})
        out.update({f"diff_{k}": v for k, v in asdict(self.diff).items()})
        out.update({"p_value": self.p_value, "p_holm": self.p_holm, "verdict": self.verdict,
                    "missing_seeds": ",".join(map(str, self.missing_seeds))})
        return out


def compare(metric: str, direction: str, baseline: ConfigScores, finalists: list[ConfigScores],
            planned_seeds: list[int], n_resamples: int = 1000, alpha: float = 1 - LEVEL,
            rng_seed: int = 0) -> tuple[Comparison, list[Comparison]]:
    """The baseline's own estimate, and each finalist against it (Holm-corrected over the finalists)."""
    sign = 1.0 if direction == "maximize" else -1.0
    rows, raw_p = [], []
    base_seeds = [s for s in planned_seeds if s in baseline.seed_values]
    for finalist in finalists:
        seeds = [s for s in base_seeds if s in finalist.seed_values]
        missing = [s for s in planned_seeds if s not in finalist.seed_values]
        if len(seeds) < 2:
            nan = Estimate(math.nan, math.nan, math.nan, math.nan, math.nan)
            rows.append((finalist, seeds, missing, nan, nan, 1.0, 0))
            raw_p.append(1.0)
            continue
        boot = pair_bootstrap(metric, [baseline, finalist], seeds, n_resamples, rng_seed)
        values = np.array([finalist.seed_values[s] for s in seeds])
        diffs = values - np.array([baseline.seed_values[s] for s in seeds])
        own = estimate(values, float(boot[1].var(ddof=1)) if boot is not None else 0.0)
        diff = estimate(diffs, float((boot[1] - boot[0]).var(ddof=1)) if boot is not None else 0.0)
        n_pairs = len(baseline.pair_frames[seeds[0]]) if baseline.pair_frames else 0
        rows.append((finalist, seeds, missing, own, diff, p_value(diff), n_pairs))
        raw_p.append(p_value(diff))
    adjusted = holm(raw_p) if raw_p else []
    comparisons = []
    for (finalist, seeds, missing, own, diff, p, n_pairs), p_adj in zip(rows, adjusted):
        if missing or len(seeds) < 2:
            verdict = "unstable"
        elif p_adj < alpha:
            verdict = "better" if sign * diff.mean > 0 else "worse"
        else:
            verdict = "no difference"
        comparisons.append(Comparison(finalist.label, seeds, n_pairs, own, diff, p, p_adj, verdict, missing))
    return _baseline_row(metric, baseline, base_seeds, n_resamples, rng_seed), comparisons


def _baseline_row(metric: str, baseline: ConfigScores, seeds: list[int], n_resamples: int,
                  rng_seed: int) -> Comparison:
    boot = pair_bootstrap(metric, [baseline], seeds, n_resamples, rng_seed) if len(seeds) >= 1 else None
    values = np.array([baseline.seed_values[s] for s in seeds])
    own = estimate(values, float(boot[0].var(ddof=1)) if boot is not None else 0.0) if len(values) else \
        Estimate(math.nan, math.nan, math.nan, math.nan, math.nan)
    zero = Estimate(0.0, 0.0, 0.0, 0.0, math.inf)
    n_pairs = len(baseline.pair_frames[seeds[0]]) if baseline.pair_frames and seeds else 0
    return Comparison(baseline.label, seeds, n_pairs, own, zero, 1.0, 1.0, "baseline", [])


def detectable_difference(comparisons: list[Comparison], level: float = LEVEL, power: float = POWER) -> float:
    """The smallest true difference these seeds and pairs detect with `power` (two-sided, at `level`)."""
    usable = [c.diff for c in comparisons if math.isfinite(c.diff.se) and c.diff.se > 0]
    if not usable:
        return math.nan
    se = float(np.median([d.se for d in usable]))
    df = float(np.median([d.df for d in usable]))
    return float((stats.t.ppf(0.5 + level / 2, df) + stats.t.ppf(power, df)) * se)
