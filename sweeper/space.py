"""The search space is data: each spec entry binds a config key to an Optuna distribution.

    train.lr: {type: float, low: 1.0e-5, high: 3.0e-3, log: true}
    loss.t_max: {type: float, low: 1.5, high: 4.0, when: {loss.adaptive_temperature: true}}

`when` makes a parameter conditional: it is sampled only when the already
resolved config (base spec + parameters sampled before it, in spec order)
matches every listed value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from critic.config import SpecError, coerce, field_hint

_ENTRY_KEYS = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
               "categorical": {"choices"}}


@dataclass(frozen=True)
class SpaceEntry:
    key: str  # "section.field"
    distribution: BaseDistribution
    when: tuple[tuple[str, Any], ...] = ()


def _field_hint(key: str) -> Any:
    """The type hint of a search-space key: section.field, or section.block.field inside a nested block."""
    return field_hint(key, "sweep.search_space", verb="sample")


def to_distribution(key: str, entry: Any) -> BaseDistribution:
    """One search-space entry -> an Optuna distribution; raises SpecError saying what to fix."""
    where = f"sweep.search_space.{key}"
    if not isinstance(entry, dict) or "type" not in entry:
        raise SpecError(f"{where}: expected a mapping with 'type' (float, int or categorical), got {entry!r}")
    kind = entry["type"]
    if kind not in _ENTRY_KEYS:
        raise SpecError(f"{where}: type must be float, int or categorical, got {kind!r}")
    extra = set(entry) - _ENTRY_KEYS[kind] - {"type", "when"}
    if extra:
        raise SpecError(f"{where}: unknown field(s) {sorted(extra)} for type {kind}; "
                        f"valid: {', '.join(sorted(_ENTRY_KEYS[kind] | {'type', 'when'}))}")
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpecError(f"{where}: categorical needs a non-empty list 'choices'")
        return CategoricalDistribution(choices)
    if "low" not in entry or "high" not in entry:
        raise SpecError(f"{where}: {kind} needs 'low' and 'high'")
    low, high, log, step = entry["low"], entry["high"], bool(entry.get("log", False)), entry.get("step")
    numeric = (int,) if kind == "int" else (int, float)
    if not all(isinstance(v, numeric) and not isinstance(v, bool) for v in (low, high)):
        raise SpecError(f"{where}: low and high must be {'integers' if kind == 'int' else 'numbers'}, "
                        f"got low={low!r}, high={high!r} (write floats as 1.0e-5: YAML reads 1e-5 as text)")
    if low > high:
        raise SpecError(f"{where}: low ({low}) must be <= high ({high})")
    if log and low <= 0:
        raise SpecError(f"{where}: log scale needs low > 0, got low={low}")
    if log and step is not None:
        raise SpecError(f"{where}: use either log or step, not both")
    if kind == "int":
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=step)


def _check_value_type(key: str, value: Any) -> None:
    """A value the field cannot take (e.g. a string for train.lr) is a load-time error."""
    coerce(value, _field_hint(key), f"sweep.search_space.{key}")  # the spec's own type rules


def parse_space(raw: dict[str, Any]) -> list[SpaceEntry]:
    """Validate every entry of sweep.search_space; order is kept (conditions refer to earlier keys)."""
    entries: list[SpaceEntry] = []
    for key, entry in raw.items():
        _field_hint(key)
        distribution = to_distribution(key, entry)
        values = distribution.choices if isinstance(distribution, CategoricalDistribution) else \
            [distribution.low, distribution.high]
        for value in values:
            _check_value_type(key, value)
        when = entry.get("when") or {}
        if not isinstance(when, dict):
            raise SpecError(f"sweep.search_space.{key}: 'when' must be a mapping like "
                            f"{{loss.adaptive_temperature: true}}")
        for cond_key in when:
            _field_hint(cond_key)
        entries.append(SpaceEntry(key, distribution, tuple(when.items())))
    return entries


def condition_holds(entry: SpaceEntry, resolved: dict[str, Any]) -> bool:
    return all(resolved.get(k) == v for k, v in entry.when)


def suggest(trial: optuna.Trial, entries: list[SpaceEntry], base_flat: dict[str, Any],
            fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sample the active parameters of one trial; returns {key: value} overrides.

    `fixed`: values this trial sets outside Optuna (a candidate's keys outside the space or its ranges): they are
    not sampled, and `when` conditions see them.
    """
    fixed = fixed or {}
    resolved, sampled = {**base_flat, **fixed}, {}
    for entry in entries:
        if entry.key in fixed or not condition_holds(entry, resolved):
            continue
        value = _suggest_one(trial, entry.key, entry.distribution)
        resolved[entry.key] = sampled[entry.key] = value
    return sampled


def _suggest_one(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_categorical(key, dist.choices)


def contains(dist: BaseDistribution, value: Any) -> bool:
    """Whether the distribution can propose `value`: one of its choices, or a number within bounds and on its step."""
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    try:
        number = float(value)  # YAML 1.1 reads 1e-4 as a string; the spec loader accepts it as a number too
    except (TypeError, ValueError):
        return False
    if not dist.low <= number <= dist.high:
        return False
    if dist.step is None:
        return True
    steps = (number - dist.low) / dist.step
    return abs(steps - round(steps)) < 1e-8


def check_in_space(entries: list[SpaceEntry], values: dict[str, Any], what: str) -> None:
    """Every key of `values` is a search-space key and its value lies in the distribution."""
    by_key = {e.key: e for e in entries}
    for key, value in values.items():
        if key not in by_key:
            raise SpecError(f"{what}: key {key!r} is not in sweep.search_space; set it in the base spec instead "
                            f"(search-space keys: {', '.join(by_key) or 'none'})")
        dist = by_key[key].distribution
        if not contains(dist, value):
            raise SpecError(f"{what}: {key}={value!r} lies outside its search-space distribution {dist}")


def space_signature(entries: list[SpaceEntry]) -> list[list[Any]]:
    """A JSON-able description used to refuse resuming a study with a different space."""
    return [[e.key, optuna.distributions.distribution_to_json(e.distribution), [list(w) for w in e.when]]
            for e in entries]



def _values(entry: SpaceEntry) -> list[Any]:
    dist = entry.distribution
    return list(dist.choices) if isinstance(dist, CategoricalDistribution) else [dist.low, dist.high]


def _may_be(entries: dict[str, SpaceEntry], base: dict[str, Any], key: str, value: Any) -> bool:
    """Can `key` equal `value` in some trial (its base value, or one of its sampled values)?"""
    return value in _values(entries[key]) if key in entries else base.get(key) == value


def check_effective(entries: list[SpaceEntry], base: dict[str, Any], source: str) -> list[str]:
    """Ranges that cannot change the trial: an error when nothing in the range matters, a warning when part does.

    The adaptive temperature is T = clamp(t_a + t_b * |mean diff|, t_min, t_max) with t_b >= 0, so T is
    never below t_a: a t_min at or below t_a changes nothing. A fixed temperature matters only with
    adaptive_temperature off, the t_* bounds only with it on.
    """
    by_key, warnings = {e.key: e for e in entries}, []
    where = f"{source}: sweep.search_space"
    adaptive_on = _may_be(by_key, base, "loss.adaptive_temperature", True)
    adaptive_off = _may_be(by_key, base, "loss.adaptive_temperature", False)
    for key in ("loss.t_a", "loss.t_b", "loss.t_min", "loss.t_max"):
        if key in by_key and not adaptive_on:
            raise SpecError(f"{where}.{key} never takes effect: loss.adaptive_temperature is false in every trial; "
                            f"drop {key} or sample loss.adaptive_temperature")
    if "loss.temperature" in by_key and not adaptive_off:
        raise SpecError(f"{where}.loss.temperature never takes effect: loss.adaptive_temperature is true in every "
                        f"trial; drop it, or sample loss.adaptive_temperature and add when: "
                        f"{{loss.adaptive_temperature: false}}")
    if "loss.temperature" in by_key and adaptive_on and ("loss.adaptive_temperature", False) not in by_key[
            "loss.temperature"].when:
        warnings.append(f"{where}.loss.temperature is also sampled in trials with the adaptive temperature, where "
                        f"it does nothing; add when: {{loss.adaptive_temperature: false}}")
    if "loss.t_min" in by_key and "loss.t_b" not in by_key and base.get("loss.t_b", 0) >= 0:
        t_a = min(_values(by_key["loss.t_a"])) if "loss.t_a" in by_key else base["loss.t_a"]
        low, high = _values(by_key["loss.t_min"])[0], _values(by_key["loss.t_min"])[-1]
        fix = f"sample t_min from low: {t_a} upward, or sample loss.t_a instead"
        if max(low, high) <= t_a:
            raise SpecError(f"{where}.loss.t_min in [{low}, {high}] never takes effect: the adaptive temperature "
                            f"t_a + t_b*|mean diff| is never below t_a={t_a}; {fix}")
        if min(low, high) < t_a:
            warnings.append(f"{where}.loss.t_min values below t_a={t_a} all behave like t_a; {fix}")
    return warnings
