"""The statistics behind the trade-off report: intervals over seeds, the paired McNemar test, the Pareto front.

Every test and interval comes from `scipy.stats`; this module only decides which one applies and what goes in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    method: str  # "t" (Student t over seeds) or "wilson" (binomial over validation examples, one seed)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean over seeds with a Student-t interval: mean ± t(1-α/2, n-1) · s/√n. Needs at least two values."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a Student-t interval needs at least two seeds, got {n}")
    mean = sum(values) / n
    spread = stats.sem(values)
    if spread == 0:  # identical seeds: scipy returns (nan, nan) for a zero scale
        return Interval(mean, mean, mean, "t")
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=spread)
    # An accuracy lies in [0, 1]; with 2-3 seeds the t interval can reach past either end.
    return Interval(mean, max(0.0, float(low)), min(1.0, float(high)), "t")


def binomial_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> Interval:
    """One seed: the uncertainty left is the finite validation set, so a Wilson interval on correct/total."""
    if total <= 0:
        raise ValueError("a binomial interval needs at least one validation example")
    ci = stats.binomtest(correct, total).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(correct / total, float(ci.low), float(ci.high), "wilson")


def accuracy_interval(accuracies: Sequence[float], correct: int | None = None, total: int | None = None,
                      confidence: float = CONFIDENCE) -> Interval:
    """Student t over seeds when there are several; Wilson over the validation set for a single seed."""
    if len(accuracies) >= 2:
        return t_interval(accuracies, confidence)
    if correct is not None and total:
        return binomial_interval(correct, total, confidence)
    return Interval(float(accuracies[0]), math.nan, math.nan, "none")


@dataclass(frozen=True)
class McNemar:
    only_config: int     # b: examples the configuration gets right and the baseline gets wrong
    only_baseline: int   # c: examples the baseline gets right and the configuration gets wrong
    pairs: int           # seed pairs that entered the pooled count
    p_value: float       # two-sided exact binomial test of b against Bin(b + c, 1/2); nan without pairs


def discordant(config_correct: str, baseline_correct: str) -> tuple[int, int]:
    """(b, c) for one pair of runs from their per-example correctness strings of '0'/'1'."""
    if len(config_correct) != len(baseline_correct):
        raise ValueError(f"correctness strings differ in length ({len(config_correct)} vs {len(baseline_correct)}): "
                         "the runs were not evaluated on the same validation set")
    b = sum(1 for x, y in zip(config_correct, baseline_correct) if x == "1" and y == "0")
    c = sum(1 for x, y in zip(config_correct, baseline_correct) if x == "0" and y == "1")
    return b, c


def mcnemar_exact(pairs: Sequence[tuple[str, str]]) -> McNemar:
    """Exact McNemar test with the discordant counts pooled over (config, baseline) pairs of the same seed."""
    b = c = 0
    for config_correct, baseline_correct in pairs:
        more_b, more_c = discordant(config_correct, baseline_correct)
        b, c = b + more_b, c + more_c
    if not pairs:
        return McNemar(0, 0, 0, math.nan)
    p_value = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return McNemar(b, c, len(pairs), p_value)


def pareto_front(accuracy: Sequence[float], seconds: Sequence[float], low: Sequence[float] | None = None,
                 high: Sequence[float] | None = None) -> list[bool]:
    """True where no other point dominates: is at least as accurate and *clearly* faster (its time interval
    [low, high] lies entirely below this point's), or has the very same time and is more accurate.

    A time difference inside the timing noise (overlapping intervals) decides nothing. Configs that share a
    work shape share one timing, so their times are equal by construction and accuracy decides between them.
    A point without an interval (nan, or no `low`/`high` given) counts as its time exactly: then this is the
    usual rule, at least as accurate and at least as fast, strictly better in one."""
    n = len(seconds)

    def bounds(values: Sequence[float] | None) -> list[float]:
        return [s if values is None or values[i] is None or math.isnan(values[i]) else values[i]
                for i, s in enumerate(seconds)]

    lows, highs = bounds(low), bounds(high)

    def dominates(j: int, i: int) -> bool:
        if accuracy[j] < accuracy[i]:
            return False
        same_time = math.isclose(seconds[j], seconds[i], rel_tol=1e-9, abs_tol=1e-12)
        return highs[j] < lows[i] or (same_time and accuracy[j] > accuracy[i])

    return [not any(dominates(j, i) for j in range(n) if j != i) for i in range(n)]
