"""The report's statistics against hand computations and simulations: intervals, tests, Holm, the Pareto front."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from ablations.stats import (MCNEMAR, SEEDS_AND_SENTENCES, TOO_FEW_SEEDS, accuracy_interval, binomial_interval,
                             compare_seed_pairs, discordant, holm, mcnemar_exact, pareto_front, seeds_and_sentences_t,
                             t_interval)


def correctness(accuracy: float, seed: int, n: int) -> str:
    """A '0'/'1' string with exactly round(accuracy * n) ones, placed by the seed."""
    right = set(np.random.default_rng(seed).permutation(n)[:round(accuracy * n)])
    return "".join("1" if i in right else "0" for i in range(n))


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
    assert discordant(config, baseline) == (8, 2)
    # 2 * P(X <= 2 | Bin(10, 1/2)) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(config, baseline) == pytest.approx(0.109375)
    assert mcnemar_exact("1010", "1010") == 1.0


def test_runs_on_different_validation_sets_are_refused():
    with pytest.raises(ValueError, match="same validation set"):
        mcnemar_exact("101", "1010")
    with pytest.raises(ValueError, match="same validation set"):
        seeds_and_sentences_t([("1010", "1010"), ("101", "101")])


def test_seeds_and_sentences_t_matches_hand_computation():
    # D = config - baseline: seed pair 1 [1, 1, 0, 0], seed pair 2 [1, 0, 0, 0]; mean 0.375.
    pairs = [("1101", "0001"), ("1001", "0001")]
    seed_term = 0.03125 / 2            # per-seed means 0.5, 0.25: variance 0.03125, over 2 seeds
    example_term = 0.6875 / 3 / 4      # per-example means 1, .5, 0, 0: squared deviations 0.6875, 3 df, 4 examples
    variance = seed_term + example_term
    df = variance ** 2 / (seed_term ** 2 / 1 + example_term ** 2 / 3)
    both = 2 * stats.t.sf(0.375 / math.sqrt(variance), df)
    over_seeds = 2 * stats.t.sf(0.375 / math.sqrt(seed_term), 1)   # the paired t over seeds: t = 3, 1 df
    result = seeds_and_sentences_t(pairs)
    assert (result.test, result.seed_pairs) == (SEEDS_AND_SENTENCES, 2)
    assert result.delta == pytest.approx(0.375)
    assert result.std_error == pytest.approx(math.sqrt(variance))
    assert result.df == pytest.approx(df)
    assert result.p_value == pytest.approx(max(both, over_seeds))
    assert both > over_seeds  # here the sentences, not the seeds, decide


def test_one_seed_pair_is_the_paired_t_over_sentences():
    config, baseline = correctness(0.86, 1, 300), correctness(0.80, 2, 300)
    differences = [int(a) - int(b) for a, b in zip(config, baseline)]
    expected = stats.ttest_1samp(differences, 0).pvalue
    assert seeds_and_sentences_t([(config, baseline)]).p_value == pytest.approx(expected)


def pooled_mcnemar(pairs) -> float:
    """The bug this module replaced: discordant counts added over seeds, one exact binomial test (for p = 1/2 the
    two-sided binomtest p is twice the smaller tail; binom.cdf is that, without binomtest's search)."""
    b = sum(discordant(x, y)[0] for x, y in pairs)
    c = sum(discordant(x, y)[1] for x, y in pairs)
    return min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5))


def test_identical_seed_pairs_do_not_count_the_sentences_again():
    pair = (correctness(0.86, 1, 300), correctness(0.82, 2, 300))
    one = seeds_and_sentences_t([pair]).p_value
    three = seeds_and_sentences_t([pair] * 3).p_value
    assert three == pytest.approx(one)
    assert pooled_mcnemar([pair] * 3) < one / 3 < one  # what pooling did: the same sentences, three times the evidence


def test_seeds_that_disagree_are_not_significant():
    # Per-seed differences +6, -2, +5 points: a mean of +3 with a seed spread as large as the difference itself.
    base = [correctness(0.80, seed, 500) for seed in range(3)]
    config = [correctness(0.80 + shift, 10 + seed, 500) for seed, shift in enumerate((0.06, -0.02, 0.05))]
    pairs = list(zip(config, base))
    assert pooled_mcnemar(pairs) < 0.05          # pooled: "significant"
    assert seeds_and_sentences_t(pairs).p_value > 0.2


def exchangeable_hits(rng: np.random.Generator, seeds: int, seed_noise: float, example_noise: float,
                      difficulty: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per seed, which examples each of two exchangeable configurations gets right (the null holds exactly): each
    has its own per-example and per-seed deviations from a common difficulty; a seed's runs share a random stream,
    so their errors correlate."""
    examples = len(difficulty)
    per_example = rng.normal(0, example_noise, (2, examples))
    hits = []
    for _ in range(seeds):
        per_seed = rng.normal(0, seed_noise, 2)
        stream = rng.random(examples)
        other = np.where(rng.random(examples) < 0.7, stream, rng.random(examples))
        hits.append(tuple(draws < np.clip(difficulty + per_example[k] + per_seed[k], 0, 1)
                          for k, draws in enumerate((other, stream))))
    return hits


def simulated_pairs(rng: np.random.Generator, seeds: int, seed_noise: float, example_noise: float,
                    examples: int = 400) -> list[tuple[str, str]]:
    """`exchangeable_hits` as the correctness strings the accuracy test reads."""
    hits = exchangeable_hits(rng, seeds, seed_noise, example_noise, rng.beta(4, 1, examples))
    return [tuple((right.astype(np.uint8) + ord("0")).tobytes().decode() for right in pair) for pair in hits]


@pytest.mark.parametrize("seeds, seed_noise, example_noise", [
    (2, 0.04, 0.0),    # training noise dominates: the min F' t alone rejects 11 % of these at the 5 % level
    (3, 0.04, 0.1),    # both, at the seed count of the stored studies
    (5, 0.0, 0.2),     # sentence effects only: the paired t over seeds alone rejects 18 %
])
def test_false_positive_rate_stays_at_the_level_under_both_noises(seeds, seed_noise, example_noise):
    rng = np.random.default_rng(seeds)
    trials = 400
    studies = [simulated_pairs(rng, seeds, seed_noise, example_noise) for _ in range(trials)]
    rejected = sum(seeds_and_sentences_t(pairs).p_value < 0.05 for pairs in studies)
    assert rejected / trials <= 0.075
    assert sum(pooled_mcnemar(pairs) < 0.05 for pairs in studies) / trials > 0.15  # pooling: 18-52 %


def test_compare_seed_pairs_names_the_test_or_says_too_few_seeds():
    pair = (correctness(0.86, 1, 200), correctness(0.80, 2, 200))
    single = compare_seed_pairs([pair], config_seeds=1, baseline_seeds=1)
    assert (single.test, single.seed_pairs) == (MCNEMAR, 1)
    assert single.p_value == pytest.approx(mcnemar_exact(*pair))
    assert single.delta == pytest.approx(0.06)
    for few in (compare_seed_pairs([pair], config_seeds=3, baseline_seeds=1), compare_seed_pairs([], 3, 3)):
        assert few.test == TOO_FEW_SEEDS and math.isnan(few.p_value)
    assert compare_seed_pairs([pair, pair], 3, 2).test == SEEDS_AND_SENTENCES


def test_holm_matches_hand_computation():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> held at 0.06; nan is no test
    adjusted = holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[4])
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([]) == []


def test_holm_is_monotone_in_the_raw_order_and_never_below_the_raw_p():
    # Without the running maximum 0.012 would become 0.024, below the 0.03 of a smaller raw p.
    assert holm([0.01, 0.012, 0.2]) == pytest.approx([0.03, 0.03, 0.2])
    rng = np.random.default_rng(0)
    raw = list(rng.uniform(0, 0.2, 12))
    adjusted = holm(raw)
    order = sorted(range(12), key=raw.__getitem__)
    assert [adjusted[i] for i in order] == sorted(adjusted)
    assert all(a >= r and a <= 1 for a, r in zip(adjusted, raw))


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
