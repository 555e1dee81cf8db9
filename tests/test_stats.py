"""The report's statistics against hand computations: t and Wilson intervals, exact McNemar, Pareto front."""
from __future__ import annotations

import math

import pytest

from ablations.stats import accuracy_interval, binomial_interval, mcnemar_exact, pareto_front, t_interval


def test_t_interval_matches_hand_computation():
    values = [0.80, 0.82, 0.84]
    # mean 0.82, sample sd 0.02, sem 0.02/sqrt(3); t(0.975, df=2) = 4.302652729911275
    half_width = 4.302652729911275 * 0.02 / math.sqrt(3)
    interval = t_interval(values)
    assert interval.method == "t"
    assert interval.mean == pytest.approx(0.82)
    assert interval.low == pytest.approx(0.82 - half_width)
    assert interval.high == pytest.approx(0.82 + half_width)


def test_t_interval_of_identical_seeds_is_a_point():
    interval = t_interval([0.9, 0.9])
    assert (interval.low, interval.mean, interval.high) == pytest.approx((0.9, 0.9, 0.9))


def test_one_seed_gets_a_wilson_interval_over_the_validation_set():
    interval = accuracy_interval([0.85], correct=170, total=200)
    assert interval.method == "wilson"
    p, n, z = 0.85, 200, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert interval.mean == pytest.approx(0.85)
    assert interval.low == pytest.approx(centre - half)
    assert interval.high == pytest.approx(centre + half)
    assert binomial_interval(170, 200) == interval


def test_mcnemar_exact_p_value_matches_binomial_hand_computation():
    config = "1" * 8 + "0" * 2 + "1" * 40 + "0" * 10
    baseline = "0" * 8 + "1" * 2 + "1" * 40 + "0" * 10
    test = mcnemar_exact([(config, baseline)])
    assert (test.only_config, test.only_baseline, test.pairs) == (8, 2, 1)
    # 2 * P(X <= 2 | Bin(10, 1/2)) = 2 * (1 + 10 + 45) / 1024
    assert test.p_value == pytest.approx(0.109375)


def test_mcnemar_pools_discordant_counts_over_seed_pairs():
    pairs = [("1" * 5 + "0", "0" * 5 + "1"), ("111" + "0", "000" + "1")]  # (5, 1) and (3, 1) -> (8, 2)
    test = mcnemar_exact(pairs)
    assert (test.only_config, test.only_baseline, test.pairs) == (8, 2, 2)
    assert test.p_value == pytest.approx(0.109375)


def test_mcnemar_without_discordance_or_pairs():
    assert mcnemar_exact([("1010", "1010")]).p_value == 1.0
    assert math.isnan(mcnemar_exact([]).p_value)


def test_mcnemar_refuses_runs_on_different_validation_sets():
    with pytest.raises(ValueError, match="same validation set"):
        mcnemar_exact([("101", "1010")])


def test_pareto_flags_only_non_dominated_points():
    accuracy = [0.90, 0.88, 0.85, 0.86, 0.80, 0.88]
    seconds = [45.0, 30.0, 20.0, 35.0, 25.0, 30.0]
    # 0.86@35 is dominated by 0.88@30; 0.80@25 by 0.85@20; the two identical 0.88@30 points do not dominate each other
    assert pareto_front(accuracy, seconds) == [True, True, True, False, False, True]
    flags = pareto_front(accuracy, seconds)
    for i, flagged in enumerate(flags):
        if flagged:
            assert not any(a >= accuracy[i] and s <= seconds[i] and (a, s) != (accuracy[i], seconds[i])
                           for a, s in zip(accuracy, seconds))
