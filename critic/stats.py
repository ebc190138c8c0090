"""Statistics of held-out pair scores over seeds and prompts: the confirmation stage's verdict (is a finalist
really better than the baseline?) and diagnose's standard errors, one code path for both.

Design: every configuration is trained with the same S seeds and scored on the same N held-out pairs,
which come from G prompts. Seeds and prompts are two crossed random factors. The prompt, not the pair,
is the unit: in GAD a prompt has one teacher response and rollout.n student responses, so the pairs of
a prompt share the teacher's score (the score table's `prompt_id`; tables without it, from older runs,
count each pair as its own prompt).

Mean-type metrics (MEAN_METRICS: a mean over pairs of a per-pair quantity; d_acc, tie_rate, score_diff,
pair_logloss, ...) get the exact two-way decomposition, form "exact". With m_s the metric of seed s
and z[s, g] = G/N (sum over prompt g's pairs - n_g m_s) + m_s (linearised per-prompt value: its mean
over prompts is m_s), and the two-way mean squares of z: MS_seed (S-1 df), MS_prompt (G-1 df),
MS_inter ((S-1)(G-1) df):
    se^2 = MS_seed / (S G)  +  max(MS_prompt - MS_inter, 0) / (S G)
         = var(m_s) / S     +  the prompt main effect alone.
Its expectation is var_seed/S + var_prompt/G + var_inter/(S G): the seed x prompt interaction is in the
seed part (another seed reorders the prompts) and counted there only.

Other metrics (auc, score_length_spearman, score stds, length_ratio) are not a mean of per-pair terms;
form "conservative": se^2 = var(m_s)/S + the variance of the seed-averaged metric over a bootstrap of
whole prompts. Both parts contain the interaction, so se^2 is too large by up to var_inter/(S G).
Metrics without per-pair scores (training metrics): form "seeds only", se^2 = var(m_s)/S.

Small S: the standardised difference is referred to the Behrens-Fisher (fiducial) distribution
    sqrt(w) t_{S-1} + sqrt(1 - w) t_{df_prompt},   w = the seed part's share of se^2,
df_prompt = G-1, that of MS_prompt, whose noise the prompt part carries (Satterthwaite's df for
MS_prompt - MS_inter falls below 1 when the difference is small, and then over-covers: 98.9%).
Student's t with Welch-Satterthwaite df gives up to 7.8% false positives at nominal 5% with 3 seeds
when the seed part dominates; this reference is exact when either part dominates and conservative in
between (measured at 3 seeds: 2.9-4.4% false positives over the scenarios of tests/test_stats.py).

K finalists: Bonferroni. The verdict and the simultaneous intervals (diff_low/diff_high, level 1 - alpha/K)
agree by construction: an interval excludes 0 exactly when the verdict is better or worse. Raw
per-comparison 95% intervals are kept beside them as diff_raw_low/diff_raw_high.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import special, stats
from scipy.optimize import elementwise

from critic.metrics import MEAN_OVER_PAIRS, pair_metric, per_pair_values

LEVEL = 0.95
POWER = 0.80
# Metrics that equal the mean over pairs of the metric of each single pair (critic.metrics, checked by
# tests/test_metrics.py): for these the interaction can be separated.
MEAN_METRICS = frozenset(MEAN_OVER_PAIRS)
SCORE_COLUMNS = ("teacher_score", "student_score", "teacher_length", "student_length")
# Gauss-Legendre nodes on (0, 1) for the two chi-square variates of the Behrens-Fisher reference.
# p = u^m (m = min(df, 4)) makes the integrand smooth where a small-df t gets its heavy tail (p -> 0);
# 64 x 32 nodes: tail probabilities within 3e-5 absolute of adaptive quadrature for df >= 1.
_SEED_NODES = np.polynomial.legendre.leggauss(64)
_PROMPT_NODES = np.polynomial.legendre.leggauss(32)
_MAX_DF = 1e6  # a chi-square with more df is 1 to within 0.1%; keeps ppf finite where df is infinite


@dataclass(frozen=True)
class Spread:
    """A mean and its variance in a seed part and a prompt part; numpy arrays, one element per estimate."""
    mean: np.ndarray
    seed_var: np.ndarray
    prompt_var: np.ndarray
    seed_df: np.ndarray  # S - 1
    prompt_df: np.ndarray

    @property
    def se(self) -> np.ndarray:
        return np.sqrt(self.seed_var + self.prompt_var)

    @property
    def seed_share(self) -> np.ndarray:
        total = self.seed_var + self.prompt_var
        return np.divide(self.seed_var, total, out=np.ones_like(total), where=total > 0)


def _spread(mean, seed_var, prompt_var, seed_df, prompt_df) -> Spread:
    arrays = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in
                                   (mean, seed_var, prompt_var, seed_df, prompt_df)))
    return Spread(*arrays)


def prompt_codes(frame: pd.DataFrame) -> np.ndarray:
    """(N,) int prompt of each pair: the score table's prompt_id, or each pair its own (tables before it)."""
    column = "prompt_id" if "prompt_id" in frame.columns else "pair_id"
    return pd.factorize(frame[column])[0]


def crossed_spread(values: np.ndarray, prompts: np.ndarray) -> Spread:
    """Mean of (..., S, N) per-pair values over seeds and pairs, with the two-way seeds x prompts variance."""
    values = np.asarray(values, dtype=np.float64)
    n_seeds, n_pairs = values.shape[-2:]
    order = np.argsort(prompts, kind="stable")
    sorted_codes = np.asarray(prompts)[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    sizes = np.diff(np.r_[starts, n_pairs])  # (G,) pairs per prompt
    n_prompts = len(starts)
    if n_prompts < 2:
        raise ValueError(f"the held-out pairs come from {n_prompts} prompt; prompt variation needs at least 2")
    totals = np.add.reduceat(values[..., order], starts, axis=-1)  # (..., S, G)
    per_seed = values.mean(axis=-1, keepdims=True)  # (..., S, 1)
    z = n_prompts / n_pairs * (totals - sizes * per_seed) + per_seed  # mean over prompts == per_seed
    grand = z.mean(axis=(-2, -1), keepdims=True)
    seed_means, prompt_means = z.mean(axis=-1, keepdims=True), z.mean(axis=-2, keepdims=True)
    ms_prompt = n_seeds * ((prompt_means - grand) ** 2).sum(axis=(-2, -1)) / (n_prompts - 1)
    scale, mean = n_seeds * n_prompts, grand[..., 0, 0]
    if n_seeds == 1:  # no seed variation to see: prompts only (one critic, e.g. diagnose)
        return _spread(mean, 0.0, ms_prompt / scale, math.nan, n_prompts - 1)
    ms_seed = n_prompts * ((seed_means - grand) ** 2).sum(axis=(-2, -1)) / (n_seeds - 1)
    inter_df = (n_seeds - 1) * (n_prompts - 1)
    ms_inter = ((z - seed_means - prompt_means + grand) ** 2).sum(axis=(-2, -1)) / inter_df
    prompt_part = np.maximum(ms_prompt - ms_inter, 0.0)
    return _spread(mean, ms_seed / scale, prompt_part / scale, n_seeds - 1, n_prompts - 1)


def seeds_spread(seed_values: np.ndarray, prompt_var=0.0, prompt_df=math.inf) -> Spread:
    """Mean of (..., S) per-seed values: var(values)/S on S-1 df, plus a prompt part known from elsewhere."""
    values = np.asarray(seed_values, dtype=np.float64)
    n = values.shape[-1]
    seed_var = values.var(axis=-1, ddof=1) / n if n > 1 else np.zeros(values.shape[:-1])
    return _spread(values.mean(axis=-1), seed_var, prompt_var, n - 1 if n > 1 else math.nan, prompt_df)


def _chi2_nodes(nodes, df: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., K) values of chi2_df / df at Gauss-Legendre nodes (p = u^m) and their weights."""
    u, weight = (nodes[0] + 1) / 2, nodes[1] / 2
    df = np.minimum(df, _MAX_DF)[..., None]
    power = np.minimum(df, 4.0)
    return stats.chi2.ppf(u ** power, df) / df, weight * power * u ** (power - 1)


@dataclass(frozen=True)
class Reference:
    """The Behrens-Fisher distribution sqrt(w) t_{seed_df} + sqrt(1 - w) t_{prompt_df}, elementwise.

    Its two-sided tail is E[2 Phi(-t / sqrt(w / V_seed + (1 - w) / V_prompt))] over V ~ chi2_df / df,
    taken on fixed quadrature nodes computed once here (chi2.ppf is the slow part).
    """
    share: np.ndarray  # (n,)
    v_seed: np.ndarray  # (n, 64) nodes and weights
    w_seed: np.ndarray
    v_prompt: np.ndarray  # (n, 32)
    w_prompt: np.ndarray

    @classmethod
    def of(cls, seed_share, seed_df, prompt_df) -> "Reference":
        share, seed_df, prompt_df = (a.ravel() for a in np.broadcast_arrays(
            *(np.asarray(a, dtype=np.float64) for a in (seed_share, seed_df, prompt_df))))
        seed_df = np.where(share > 0, seed_df, 1.0)  # a part with no weight: any df
        prompt_df = np.where(share < 1, prompt_df, 1.0)
        return cls(share, *_chi2_nodes(_SEED_NODES, seed_df), *_chi2_nodes(_PROMPT_NODES, prompt_df))

    def tail(self, t: np.ndarray, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """P(|X| > t) for the elements `index` (all by default)."""
        share = self.share[index][:, None, None]
        variance = share / self.v_seed[index][:, :, None] + (1 - share) / self.v_prompt[index][:, None, :]
        tail = 2 * special.ndtr(-np.asarray(t)[:, None, None] / np.sqrt(variance))  # (n, seed nodes, prompt nodes)
        return np.clip(np.einsum("nij,ni,nj->n", tail, self.w_seed[index], self.w_prompt[index]), 0.0, 1.0)

    def quantile(self, alpha) -> np.ndarray:
        """q with tail(q) = alpha (two-sided)."""
        alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), self.share.shape)
        # Bracket: the tail is 1 at 0 and at most alpha at 2c, P(|t_1| > c) = alpha / 2: P(|X| > 2c) <=
        # P(|T_seed| > c) + P(|T_prompt| > c), each at most t_1's (every df here is >= 1).
        upper = 2 * stats.t.ppf(1 - alpha / 4, 1.0)
        index = np.arange(len(self.share))
        result = elementwise.find_root(lambda q, i, a: self.tail(q, i.astype(int)) - a, (np.zeros_like(upper), upper),
                                       args=(index, alpha), tolerances={"xrtol": 1e-10, "xatol": 1e-12})
        return result.x


def tail_probability(t, seed_share, seed_df, prompt_df) -> np.ndarray:
    """P(|sqrt(w) T_seed + sqrt(1 - w) T_prompt| > t), T ~ Student t (Behrens-Fisher), elementwise."""
    t = np.asarray(t, dtype=np.float64)
    shape = np.broadcast_shapes(t.shape, *(np.shape(a) for a in (seed_share, seed_df, prompt_df)))
    reference = Reference.of(*(np.broadcast_to(a, shape) for a in (seed_share, seed_df, prompt_df)))
    return reference.tail(np.broadcast_to(t, shape).ravel()).reshape(shape)


def critical_value(level, seed_share, seed_df, prompt_df) -> np.ndarray:
    """q with tail_probability(q) = 1 - level: the interval is mean +- q se."""
    shape = np.broadcast_shapes(*(np.shape(a) for a in (level, seed_share, seed_df, prompt_df)))
    reference = Reference.of(*(np.broadcast_to(a, shape) for a in (seed_share, seed_df, prompt_df)))
    alpha = 1 - np.broadcast_to(np.asarray(level, dtype=np.float64), shape).ravel()
    return reference.quantile(alpha).reshape(shape)


def p_value(spread: Spread, null=0.0) -> np.ndarray:
    """Two-sided p-value of 'the true mean is `null`'."""
    se = spread.se
    distance = np.abs(spread.mean - null)
    t = np.divide(distance, se, out=np.where(distance > 0, np.inf, 0.0), where=se > 0)
    finite = np.isfinite(t)
    p = tail_probability(np.where(finite, t, 0.0), spread.seed_share, spread.seed_df, spread.prompt_df)
    p = np.where(t == 0, 1.0, p)  # exactly: the quadrature weights sum to 1 only to rounding
    return np.where(finite, p, np.where(np.isnan(t), np.nan, 0.0))


def interval(spread: Spread, level=LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) arrays of the `level` confidence interval of the mean."""
    known = np.isfinite(spread.se) & (spread.se > 0)
    half = np.zeros_like(spread.se)
    half[known] = critical_value(level, spread.seed_share[known], spread.seed_df[known],
                                 spread.prompt_df[known]) * spread.se[known]
    half = np.where(np.isfinite(spread.se), half, np.nan)
    return spread.mean - half, spread.mean + half


def decide(diff: Spread, sign: float, alpha: float, n_comparisons: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p, Bonferroni-adjusted p, verdict) of differences to the baseline; sign +1 maximises, -1 minimises."""
    p = p_value(diff)
    adjusted = np.minimum(1.0, n_comparisons * p)
    direction = np.where(sign * diff.mean > 0, "better", "worse")
    return p, adjusted, np.where(adjusted < alpha, direction, "no difference")


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    se: float
    level: float  # confidence of [low, high]
    seed_share: float  # share of se^2 from seeds (S-1 df); the rest from prompts
    seed_df: float
    prompt_df: float

    @classmethod
    def of(cls, spread: Spread, level: float = LEVEL) -> "Estimate":
        low, high = interval(spread, level)
        return cls(float(spread.mean), float(low), float(high), float(spread.se), level,
                   float(spread.seed_share), float(spread.seed_df), float(spread.prompt_df))

    @classmethod
    def missing(cls, level: float = LEVEL) -> "Estimate":
        return cls(*[math.nan] * 4, level, *[math.nan] * 3)


@dataclass(frozen=True)
class ConfigScores:
    """One configuration's results over seeds: the metric per seed and, where it has them, per-pair scores."""
    label: str
    seed_values: dict[int, float]  # seed index -> metric on all held-out pairs (the trial's reported value)
    pair_frames: dict[int, pd.DataFrame] | None  # seed index -> per-pair scores of the objective's set
    planned: tuple[int, ...] | None = None  # its planned seed indices (default: compare's planned_seeds)


def _scores(configs: list[ConfigScores], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(configs, seeds, 4, N) teacher/student scores and lengths, and the (N,) prompt of each pair."""
    reference = configs[0].pair_frames[seeds[0]]
    for config in configs:
        for seed in seeds:
            frame = config.pair_frames[seed]
            for column in ("pair_id", "prompt_id"):
                if column in reference and not np.array_equal(frame[column].to_numpy(), reference[column].to_numpy()):
                    raise ValueError(f"{config.label} seed {seed} was scored on other held-out pairs than "
                                     f"{configs[0].label} ({column} differs); a paired comparison needs the same pairs")
    scores = np.array([[[c.pair_frames[s][col].to_numpy(np.float64) for col in SCORE_COLUMNS] for s in seeds]
                       for c in configs])
    return scores, prompt_codes(reference)


def prompt_resamples(prompts: np.ndarray, n_resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Bootstrap of whole prompts: (resamples, pairs) index arrays, one array per resample length."""
    order = np.argsort(prompts, kind="stable")  # the pairs of a prompt side by side
    sizes = np.bincount(prompts)
    starts = np.cumsum(sizes) - sizes
    drawn = rng.integers(len(sizes), size=(n_resamples, len(sizes)))  # prompts, with replacement
    totals = sizes[drawn].sum(axis=1)
    blocks = []
    for total in np.unique(totals):  # prompts of unequal size give resamples of unequal length
        rows = drawn[totals == total]
        lengths = sizes[rows].ravel()
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        blocks.append(order[np.repeat(starts[rows].ravel(), lengths) + within].reshape(len(rows), total))
    return blocks


def bootstrap_variance(metric: str, scores: np.ndarray, prompts: np.ndarray, n_resamples: int,
                       rng_seed: int) -> np.ndarray:
    """(configs, configs) covariance over a prompt bootstrap of each config's seed-averaged metric.

    scores: (configs, seeds, 4, N) as from _scores. The same resampled prompts for every config and seed.
    """
    draws = []
    for index in prompt_resamples(prompts, n_resamples, np.random.default_rng(rng_seed)):
        resampled = scores[..., index]  # (configs, seeds, 4, resamples, pairs)
        per_seed = pair_metric(metric, *np.moveaxis(resampled, 2, 0))  # (configs, seeds, resamples)
        draws.append(per_seed.mean(axis=1))
    return np.atleast_2d(np.cov(np.concatenate(draws, axis=-1)))


@dataclass(frozen=True)
class Comparison:
    label: str
    seeds: list[int]
    n_pairs: int
    n_prompts: int
    form: str  # exact | conservative | seeds only: how se was computed (module docstring)
    value: Estimate  # this config's metric, mean over seeds (95%)
    diff: Estimate  # this config minus the baseline, paired by seed and pair; simultaneous (1 - alpha/K)
    diff_raw: Estimate  # the same difference, 95% for this comparison alone
    p_value: float
    p_adjusted: float  # Bonferroni over the K compared configs
    verdict: str  # better | worse | no difference | unstable (diverged or failed on some seeds)
    missing_seeds: list[int]

    def row(self) -> dict:
        out = {"config": self.label, "seeds": len(self.seeds), "n_pairs": self.n_pairs, "n_prompts": self.n_prompts,
               "form": self.form}
        out.update({f"mean_{k}": v for k, v in asdict(self.value).items() if k in ("mean", "low", "high", "se")})
        out.update({f"diff_{k}": v for k, v in asdict(self.diff).items()})
        out.update({"diff_raw_low": self.diff_raw.low, "diff_raw_high": self.diff_raw.high,
                    "p_value": self.p_value, "p_adjusted": self.p_adjusted, "verdict": self.verdict,
                    "missing_seeds": ",".join(map(str, self.missing_seeds))})
        return out


def config_spreads(metric: str, configs: list[ConfigScores], seeds: list[int], n_resamples: int,
                   rng_seed: int) -> tuple[list[Spread], str, int, int]:
    """Each config's own spread and, for configs[1:], the spread of config minus configs[0].

    Returns (spreads: own for every config, then one difference per later config), form, pairs, prompts.
    """
    values = np.array([[c.seed_values[s] for s in seeds] for c in configs])  # (configs, seeds)
    diffs = values[1:] - values[0]
    if any(c.pair_frames is None for c in configs):
        return [seeds_spread(v) for v in (*values, *diffs)], "seeds only", 0, 0
    scores, prompts = _scores(configs, seeds)
    n_pairs, n_prompts = scores.shape[-1], int(prompts.max()) + 1
    if metric in MEAN_METRICS:
        per_pair = per_pair_values(metric, *np.moveaxis(scores, 2, 0))  # (configs, seeds, N)
        own = crossed_spread(per_pair, prompts)
        paired = crossed_spread(per_pair[1:] - per_pair[0], prompts)
        spreads = [_index(own, i) for i in range(len(configs))] + [_index(paired, i) for i in range(len(diffs))]
        return spreads, "exact", n_pairs, n_prompts
    cov = bootstrap_variance(metric, scores, prompts, n_resamples, rng_seed)
    own = [seeds_spread(v, cov[i, i], n_prompts - 1) for i, v in enumerate(values)]
    paired = [seeds_spread(d, cov[i, i] + cov[0, 0] - 2 * cov[0, i], n_prompts - 1) for i, d in enumerate(diffs, 1)]
    return own + paired, "conservative", n_pairs, n_prompts


def _index(spread: Spread, i: int) -> Spread:
    return Spread(*(getattr(spread, f)[i] for f in ("mean", "seed_var", "prompt_var", "seed_df", "prompt_df")))


def compare(metric: str, direction: str, baseline: ConfigScores, finalists: list[ConfigScores],
            planned_seeds: list[int], n_resamples: int = 1000, alpha: float = 1 - LEVEL,
            rng_seed: int = 0) -> tuple[Comparison, list[Comparison]]:
    """The baseline's own estimate, and each finalist against it (Bonferroni over the finalists)."""
    sign = 1.0 if direction == "maximize" else -1.0
    base_seeds = [s for s in planned_seeds if s in baseline.seed_values]
    n_compared, simultaneous = max(len(finalists), 1), 1 - alpha / max(len(finalists), 1)
    comparisons = []
    for finalist in finalists:
        seeds = [s for s in base_seeds if s in finalist.seed_values]
        missing = [s for s in (finalist.planned or planned_seeds) if s not in finalist.seed_values]
        if len(seeds) < 2:
            nan = Estimate.missing()
            comparisons.append(Comparison(finalist.label, seeds, 0, 0, "", nan, Estimate.missing(simultaneous), nan,
                                          1.0, 1.0, "unstable", missing))
            continue
        (_, own, diff), form, n_pairs, n_prompts = config_spreads(metric, [baseline, finalist], seeds,
                                                                  n_resamples, rng_seed)
        p, adjusted, verdict = decide(diff, sign, alpha, n_compared)
        comparisons.append(Comparison(finalist.label, seeds, n_pairs, n_prompts, form, Estimate.of(own),
                                      Estimate.of(diff, simultaneous), Estimate.of(diff), float(p), float(adjusted),
                                      "unstable" if missing else str(verdict), missing))
    return _baseline_row(metric, baseline, base_seeds, n_resamples, rng_seed), comparisons


def _baseline_row(metric: str, baseline: ConfigScores, seeds: list[int], n_resamples: int,
                  rng_seed: int) -> Comparison:
    zero = Estimate(0.0, 0.0, 0.0, 0.0, LEVEL, math.nan, math.nan, math.nan)
    if not seeds:
        return Comparison(baseline.label, seeds, 0, 0, "", Estimate.missing(), zero, zero, 1.0, 1.0, "baseline", [])
    (own,), form, n_pairs, n_prompts = config_spreads(metric, [baseline], seeds, n_resamples, rng_seed)
    return Comparison(baseline.label, seeds, n_pairs, n_prompts, form, Estimate.of(own), zero, zero, 1.0, 1.0,
                      "baseline", [])


def detectable_difference(comparisons: list[Comparison], power: float = POWER) -> float:
    """The smallest true difference these seeds and prompts detect with `power`, at the verdict's level."""
    usable = [c.diff for c in comparisons if math.isfinite(c.diff.se) and c.diff.se > 0]
    if not usable:
        return math.nan
    # two-sided test at the simultaneous level, plus the one-sided `power` quantile of the same reference
    needed = [(critical_value(d.level, d.seed_share, d.seed_df, d.prompt_df)
               + critical_value(1 - 2 * (1 - power), d.seed_share, d.seed_df, d.prompt_df)) * d.se for d in usable]
    return float(np.median(needed))
