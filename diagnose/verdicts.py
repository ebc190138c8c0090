"""Verdicts of `diagnose`: each proposed cause of a d_acc gap, judged from measured numbers.

Every threshold is a constant here, documented in docs/diagnose.md. A difference between two
accuracies counts only when it exceeds both MIN_GAP and NOISE_Z standard errors of the difference
(d_acc_se: prompts resampled whole, plus the spread of val d_acc across fold critics when `--folds` ran).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from diagnose.stats import late_trend, window_mean

# --- verdict thresholds -------------------------------------------------------------------------
MIN_GAP = 0.05  # a d_acc difference under 5 points is never called a cause
NOISE_Z = 2.0  # ... nor one within 2 standard errors of the difference
TIE_RATE_MIN = 0.02  # the tie rule matters where ties move d_acc by >= 2 points (strict vs ties-correct)
SHORTCUT_MIN_SPEARMAN = 0.3  # |spearman(score, response length)| a length-using critic shows
SHORTCUT_MIN_BASELINE = 0.6  # "longer response wins" must be right this often for length to be usable
SHORTCUT_MARGIN = 0.05  # critic d_acc within 5 points of the length-only baseline: it adds nothing to length
SHORTCUT_MIN_DEPENDENCE = 0.3  # d_acc(teacher longer) - d_acc(teacher shorter) of a length-following critic
MIN_BUCKET_PAIRS = 20  # a length bucket with fewer pairs is not judged
CALIBRATION_LEVEL_SHIFT = 0.5  # mean score level moved by >= 0.5 pooled std of val
ORDERING_MIN_AUC = 0.6  # "ordering holds" on a set: AUC at least this
LINEAGE_COLUMN = "student_model"  # optional parquet column naming the model that wrote student_response

# --- training-health thresholds (the curves of the saved train history) -------------------------
HEALTH_MAX_FINAL_D_ACC = 0.8  # above: learning too fast / memorising; lower train.lr or raise loss.temperature
HEALTH_MAX_GRAD_NORM = 5.0  # median grad_norm at the end above: unstable
HEALTH_MIN_GRAD_NORM = 0.1  # below: stalled
HEALTH_LENGTH_RATIO = (0.9, 1.1)  # student/teacher length ratio outside: the batches separate by length
HEALTH_SCORE_DIFF_RISE = 0.2  # score_diff still rising by > 20% of its final value over the last half
HEALTH_WINDOW = 0.1  # "at the end" = the last 10% of steps, at least HEALTH_MIN_STEPS
HEALTH_MIN_STEPS = 5

HOLDS, DOES_NOT_HOLD, NOT_MEASURABLE = "holds", "does not hold", "not measurable"
OK, WARN = "ok", "warn"


@dataclass
class Verdict:
    cause: str
    status: str  # HOLDS | DOES_NOT_HOLD | NOT_MEASURABLE
    value: float  # the number behind the verdict (a gap, a rate, a shift in std)
    evidence: str


@dataclass
class HealthCheck:
    check: str
    status: str  # OK | WARN
    value: float
    advice: str


def gap_threshold(a: dict[str, float], b: dict[str, float], extra_std: float = 0.0) -> float:
    """Smallest d_acc difference between sets a and b that is called real."""
    var = a["d_acc_se"] ** 2 + b["d_acc_se"] ** 2
    return max(MIN_GAP, NOISE_Z * math.sqrt(var + (extra_std if math.isfinite(extra_std) else 0.0) ** 2))


def _shift(sets: dict[str, dict], others: list[str], fold_std: float) -> Verdict:
    cause = "different data (distribution shift)"
    if not others:
        return Verdict(cause, NOT_MEASURABLE, math.nan, "no dataset besides the training file; pass --data NAME=PATH")
    val = sets["val"]
    gaps = {name: val["d_acc"] - sets[name]["d_acc"] for name in others}
    worst = max(gaps, key=gaps.get)
    limit = gap_threshold(val, sets[worst], fold_std)
    other = sets[worst]
    text = (f"val d_acc {val['d_acc']:.3f} vs {worst} {other['d_acc']:.3f}: gap {gaps[worst]:+.3f} "
            f"({'>' if gaps[worst] > limit else '<='} noise limit {limit:.3f}); response tokens JS "
            f"{other.get('js_teacher', math.nan):.2f} from train (val: {val.get('js_teacher', math.nan):.2f})")
    return Verdict(cause, HOLDS if gaps[worst] > limit else DOES_NOT_HOLD, gaps[worst], text)


def _ties(sets: dict[str, dict], others: list[str]) -> Verdict:
    cause = "tie rule (> in training vs >= / <= elsewhere)"
    names = ["val", *others]
    worst = max(names, key=lambda n: sets[n]["tie_rate"])
    m = sets[worst]
    text = (f"{worst}: {m['tie_rate']:.1%} ties ({m.get('identical_rate', math.nan):.1%} identical responses): "
            f"strict {m['d_acc']:.3f} vs ties-correct {m['d_acc_ties_correct']:.3f}")
    if worst != "val":
        gap = sets["val"]["d_acc"] - m["d_acc"]
        text += f"; the rule moves d_acc by {m['tie_rate']:.3f}, against the {gap:+.3f} val-{worst} gap"
    return Verdict(cause, HOLDS if m["tie_rate"] >= TIE_RATE_MIN else DOES_NOT_HOLD, m["tie_rate"], text)


def _overfitting(sets: dict[str, dict], progressive: float, fold_std: float) -> Verdict:
    train, val = sets["train"], sets["val"]
    gap = train["d_acc"] - val["d_acc"]
    limit = gap_threshold(train, val, fold_std)
    text = (f"post-hoc train d_acc {train['d_acc']:.3f} vs val {val['d_acc']:.3f}: gap {gap:+.3f} "
            f"({'>' if gap > limit else '<='} noise limit {limit:.3f}); progressive (first epoch) {progressive:.3f}")
    return Verdict("overfitting", HOLDS if gap > limit else DOES_NOT_HOLD, gap, text)


def _shortcut(val: dict[str, float]) -> Verdict:
    rho, base, acc = abs(val["score_length_spearman"]), val["length_baseline_acc"], val["d_acc"]
    longer, shorter = val["teacher_longer_d_acc"], val["teacher_shorter_d_acc"]
    judged = min(val["teacher_longer_pairs"], val["teacher_shorter_pairs"]) >= MIN_BUCKET_PAIRS
    dependence = longer - shorter if judged else math.nan
    adds_nothing = base >= SHORTCUT_MIN_BASELINE and acc <= base + SHORTCUT_MARGIN
    follows_length = judged and dependence >= SHORTCUT_MIN_DEPENDENCE
    holds = rho >= SHORTCUT_MIN_SPEARMAN and (adds_nothing or follows_length)
    text = (f"val: d_acc {acc:.3f} vs length-only baseline {base:.3f} ({acc - base:+.3f}); |spearman(score, length)| "
            f"{rho:.2f}; d_acc teacher longer {longer:.3f} (n={val['teacher_longer_pairs']:.0f}) / shorter "
            f"{shorter:.3f} (n={val['teacher_shorter_pairs']:.0f}) / length-matched "
            f"{val['length_matched_d_acc']:.3f} (n={val['length_matched_pairs']:.0f})")
    return Verdict("length shortcut", HOLDS if holds else DOES_NOT_HOLD, acc - base, text)


def _calibration(sets: dict[str, dict], others: list[str]) -> Verdict:
    cause = "calibration drift (absolute score level)"
    if not others:
        return Verdict(cause, NOT_MEASURABLE, math.nan, "no dataset besides the training file; pass --data NAME=PATH")
    val = sets["val"]
    std = val["score_pooled_std"] or math.nan
    shifts = {name: (sets[name]["score_level"] - val["score_level"]) / std for name in others}
    worst = max(shifts, key=lambda n: abs(shifts[n]))
    other = sets[worst]
    ordering = "holds" if other["auc"] >= ORDERING_MIN_AUC else "does not hold"
    text = (f"mean score level val {val['score_level']:+.2f} -> {worst} {other['score_level']:+.2f} "
            f"({shifts[worst]:+.2f} val std); ordering on {worst} {ordering} (AUC {other['auc']:.3f}); "
            f"absolute scores are not comparable across datasets, d_acc is unaffected by a level shift")
    status = HOLDS if abs(shifts[worst]) >= CALIBRATION_LEVEL_SHIFT else DOES_NOT_HOLD
    return Verdict(cause, status, shifts[worst], text)


def _student(lineage: dict[str, str | None], others: list[str]) -> Verdict:
    cause = "different student"
    train = lineage.get("train")
    known = [n for n in others if lineage.get(n) is not None]
    if train is None or not known:
        return Verdict(cause, NOT_MEASURABLE, math.nan,
                       f"no lineage for {'train' if train is None else ', '.join(others)}: responses generated "
                       f"with student.model / student.endpoint carry it, or add a '{LINEAGE_COLUMN}' column "
                       f"to every file" + (f"; train: {train}" if train else ""))
    differ = [n for n in known if lineage[n] != train]
    text = f"train: {train}; " + "; ".join(f"{n}: {lineage[n]}" for n in known)
    return Verdict(cause, HOLDS if differ else DOES_NOT_HOLD, float(len(differ)), text)


def judge(sets: dict[str, dict], others: list[str], progressive: float, fold_std: float,
          lineage: dict[str, str | None]) -> list[Verdict]:
    """One verdict per proposed cause. `sets` holds the metrics of 'train' (post-hoc), 'val' and each other set."""
    return [_shift(sets, others, fold_std), _ties(sets, others), _overfitting(sets, progressive, fold_std),
            _shortcut(sets["val"]), _calibration(sets, others), _student(lineage, others)]


def gap_bridge(sets: dict[str, dict], others: list[str], progressive: float) -> list[tuple[str, dict[str, float]]]:
    """Steps from the training number to each other set's number; the strict steps add up to the whole gap.

    progressive -> post-hoc train (the critic improved during the epoch) -> val (overfitting) -> other
    (shift) -> other with ties counted correct (tie rule).
    """
    train, val = sets["train"]["d_acc"], sets["val"]["d_acc"]
    return [("progressive (training log, first epoch)", {n: progressive for n in others}),
            ("post-hoc train split", {n: train for n in others}),
            ("val split", {n: val for n in others}),
            ("other set, strict (>)", {n: sets[n]["d_acc"] for n in others}),
            ("other set, ties correct (>=)", {n: sets[n]["d_acc_ties_correct"] for n in others})]


def training_health(train_history) -> list[HealthCheck]:
    """Checks of the saved training curves; empty when no history was saved."""
    if not train_history:
        return []
    end = lambda key: window_mean(train_history, key, HEALTH_WINDOW, HEALTH_MIN_STEPS)  # noqa: E731
    checks = []
    d_acc = end("critic/d_acc")
    checks.append(HealthCheck("training d_acc at the end", WARN if d_acc > HEALTH_MAX_FINAL_D_ACC else OK, d_acc,
                              f"above {HEALTH_MAX_FINAL_D_ACC}: learning too fast / overfitting risk; lower train.lr "
                              f"or raise loss.temperature (t_min/t_max when adaptive)"))
    grad = end("critic/grad_norm")
    grad_bad = grad > HEALTH_MAX_GRAD_NORM or grad < HEALTH_MIN_GRAD_NORM
    checks.append(HealthCheck("grad_norm at the end (median)", WARN if grad_bad else OK, grad,
                              f"> {HEALTH_MAX_GRAD_NORM}: unstable (lower lr, check grad_clip); < "
                              f"{HEALTH_MIN_GRAD_NORM}: stalled (raise lr, check the loss temperature)"))
    final_diff, rise = end("critic/score_diff"), late_trend(train_history, "critic/score_diff")
    rising = math.isfinite(rise) and rise > HEALTH_SCORE_DIFF_RISE * max(abs(final_diff), 1e-9)
    checks.append(HealthCheck("score_diff still rising (change over the last half)", WARN if rising else OK, rise,
                              f"final score_diff {final_diff:.3f}; still rising by > {HEALTH_SCORE_DIFF_RISE:.0%}: "
                              f"scores keep spreading apart, consider loss.center_coef or fewer steps"))
    ratio = window_mean(train_history, "critic/length_ratio", 1.0, 1)
    low, high = HEALTH_LENGTH_RATIO
    checks.append(HealthCheck("length_ratio (student/teacher, all steps)", OK if low <= ratio <= high else WARN, ratio,
                              f"outside {low}-{high}: teacher and student differ in length; see the shortcut check"))
    return checks
