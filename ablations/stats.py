"""The statistics behind the trade-off report: intervals over seeds, tests against the baseline, Holm, the front.

Distributions and intervals come from `scipy.stats`; written here is only what scipy lacks: the standard error of a
mean difference over seeds × examples (two crossed sources of noise) and Holm's adjustment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    method: str  # "t" (Student t over seeds), "wilson" (binomial over validation examples, one seed), "jackknife"
    #              (macro-F1 of one seed, over its validation examples) or "none"


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


# The tests the report can name in its `test` column.
SEEDS_AND_SENTENCES = "t over seeds and sentences"
MCNEMAR = "exact McNemar, one seed"
TOO_FEW_SEEDS = "too few seeds"
MIN_SEED_PAIRS = 2  # the seed-to-seed spread needs at least two seed pairs


@dataclass(frozen=True)
class Comparison:
    """A configuration against its baseline on seed-matched runs evaluated on the same examples."""
    test: str            # SEEDS_AND_SENTENCES, MCNEMAR or TOO_FEW_SEEDS
    seed_pairs: int      # seeds that both have
    delta: float         # mean correctness difference (configuration − baseline) over those pairs and examples
    std_error: float     # of delta over seeds and sentences; nan for McNemar and without a test
    df: float            # its Welch–Satterthwaite degrees of freedom; nan otherwise
    p_value: float       # two-sided, not adjusted for multiple comparisons; nan without a test


def correctness(text: str) -> np.ndarray:
    """A '0'/'1' correctness string (a record's `validation_correct`) as 0/1 integers."""
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int8) - ord("0")


def _differences(pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    """Seeds × examples matrix of config minus baseline correctness (-1, 0 or 1)."""
    for config_correct, baseline_correct in pairs:
        if len(config_correct) != len(baseline_correct) or len(config_correct) != len(pairs[0][0]):
            raise ValueError(f"correctness strings differ in length ({len(config_correct)} vs "
                             f"{len(baseline_correct)}): the runs were not evaluated on the same validation set")
    return np.stack([correctness(mine) - correctness(theirs) for mine, theirs in pairs]).astype(float)


def discordant(config_correct: str, baseline_correct: str) -> tuple[int, int]:
    """(b, c) for one pair of runs: examples right only in the configuration, right only in the baseline."""
    difference = _differences([(config_correct, baseline_correct)])[0]
    return int((difference > 0).sum()), int((difference < 0).sum())


def mcnemar_exact(config_correct: str, baseline_correct: str) -> float:
    """Exact McNemar p for ONE pair of runs: two-sided binomial test of b against Bin(b + c, 1/2).

    It measures only the noise of the finite example set, for these two trained models: never pool b and c over
    seeds (the same examples would count once per seed, and the training noise would not count at all)."""
    b, c = discordant(config_correct, baseline_correct)
    return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


def _two_sided_t(delta: float, std_error: float, df: float) -> float:
    if std_error == 0:  # no spread at all: any difference is certain, none is no evidence
        return 1.0 if delta == 0 else 0.0
    return float(2 * stats.t.sf(abs(delta) / std_error, df))


def seeds_and_sentences_t(pairs: Sequence[tuple[str, str]]) -> Comparison:
    """Test the mean difference against both noises: the seeds (training) and the sentences (sampling).

    D[s, i] is the correctness difference of seed pair s on example i (a pairs × n examples, crossed: every seed
    is scored on the same examples). Two t tests, and the larger p of the two:
    - over seeds: the paired t on the a per-seed accuracy differences (a − 1 degrees of freedom). Exact for the
      training noise, but the example set is held fixed, so it misses the sampling noise of the sentences;
    - over seeds and sentences: its squared standard error adds the paired t's over seeds and the paired t's over
      examples (the per-example differences averaged over seeds, /√n), with Welch–Satterthwaite degrees of
      freedom: Clark's (1973) min F′ for two crossed random factors (subjects × items there, seeds × sentences
      here). It counts both noises, but with two or three seeds that happen to agree its degrees of freedom run
      high and its p low.
    Each covers the other's weak case, and a difference must pass both (an intersection–union rule), which
    keeps the level in both regimes (simulated in tests/test_stats.py). Three identical seed pairs give exactly
    the p of one pair (the seed spread is zero, and the sentences count once, not three times).

    Why not a bootstrap over seeds and then sentences: with the 2–5 seeds a study affords, resampling seeds sees a
    handful of distinct draws, shrinks the seed variance by (a − 1)/a and has no small-sample correction, so its
    p-values come out too small exactly where studies live; these tests are closed-form and deterministic."""
    return crossed_t(_differences(pairs))


def crossed_t(differences: np.ndarray) -> Comparison:
    """`seeds_and_sentences_t` on a seeds × examples matrix of differences whose mean is the difference tested:
    correctness for accuracy, jackknife pseudo-values for macro-F1 (`macro_f1_differences`)."""
    seeds, examples = differences.shape
    delta = float(differences.mean())
    seed_term = float(differences.mean(axis=1).var(ddof=1)) / seeds if seeds > 1 else 0.0
    example_term = float(differences.mean(axis=0).var(ddof=1)) / examples
    variance = seed_term + example_term
    terms = [(term, dof) for term, dof in ((seed_term, seeds - 1), (example_term, examples - 1)) if term > 0]
    df = variance ** 2 / sum(term ** 2 / dof for term, dof in terms) if terms else math.nan
    p_value = _two_sided_t(delta, math.sqrt(variance), df)
    if seeds > 1:
        p_value = max(p_value, _two_sided_t(delta, math.sqrt(seed_term), seeds - 1))
    return Comparison(SEEDS_AND_SENTENCES, seeds, delta, math.sqrt(variance), df, p_value)


def compare_seed_pairs(pairs: Sequence[tuple[str, str]], config_seeds: int, baseline_seeds: int) -> Comparison:
    """The test a row gets: over seeds and sentences with two or more seed pairs; exact McNemar when each side
    has a single seed (one training run each: only the example noise is measurable, and the reader must know);
    otherwise "too few seeds" — one shared seed out of several would ignore the seeds that exist."""
    if len(pairs) >= MIN_SEED_PAIRS:
        return seeds_and_sentences_t(pairs)
    if len(pairs) == 1 and config_seeds == baseline_seeds == 1:
        (mine, theirs), = pairs
        delta = float(_differences(pairs).mean())
        return Comparison(MCNEMAR, 1, delta, math.nan, math.nan, mcnemar_exact(mine, theirs))
    return Comparison(TOO_FEW_SEEDS, len(pairs), math.nan, math.nan, math.nan, math.nan)


# The tests of macro-F1 (`compare_f1_seed_pairs`), for studies that choose by it (`--select-by f1`).
F1_SEEDS_AND_SENTENCES = "jackknife t over seeds and sentences (macro-F1)"
F1_ONE_SEED = "jackknife t over sentences (macro-F1), one seed"
LABELS_UNKNOWN = "labels not recorded"


def _class_f1(true_positives: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """2·TP / (predicted + actual) per class; 0 for a class that is neither predicted nor present, which the
    macro average then leaves out, as `core.metrics` does."""
    return np.where(denominator > 0, 2 * true_positives / np.maximum(denominator, 1), 0.0)


def macro_f1_pseudo_values(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> tuple[float, np.ndarray]:
    """Macro-F1 of one run and its jackknife pseudo-values over the examples, n·F − (n − 1)·F₋ᵢ with F₋ᵢ the
    macro-F1 without example i (Quenouille–Tukey). Macro-F1 is no mean over examples, but its pseudo-values act as
    one: their mean is F up to an O(1/n) bias correction, and their variance / n is the jackknife variance of F.
    Leaving out one example changes only its true class and its predicted class, so all n come in one pass."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    n, hit = len(labels), labels == predictions
    true_positives = np.bincount(labels[hit], minlength=num_labels).astype(float)
    denominator = (np.bincount(predictions, minlength=num_labels)
                   + np.bincount(labels, minlength=num_labels)).astype(float)
    per_class = _class_f1(true_positives, denominator)
    classes = max(int((denominator > 0).sum()), 1)  # those the macro average counts (`core.metrics`)
    f1 = float(per_class.sum() / classes)
    own = _class_f1(true_positives[labels] - hit, denominator[labels] - 1 - hit)  # its class, without it
    other = _class_f1(true_positives[predictions], denominator[predictions] - 1)  # the class it was taken for
    change = own - per_class[labels] + np.where(hit, 0.0, other - per_class[predictions])
    # A class held or predicted by this example alone leaves the average with it.
    gone = (denominator[labels] - 1 - hit == 0).astype(int) + (~hit & (denominator[predictions] - 1 == 0))
    without = (per_class.sum() + change) / np.maximum(classes - gone, 1)
    return f1, n * f1 - (n - 1) * without


def macro_f1_differences(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], labels: Sequence[int],
                         num_labels: int) -> np.ndarray:
    """Seeds × examples matrix of configuration minus baseline macro-F1 pseudo-values, each seed's row shifted so
    that its mean is that seed pair's macro-F1 difference (not the jackknife's bias-corrected one): the test over
    seeds is then the paired t on the per-seed F1 differences, and the spread over examples is unchanged."""
    rows = []
    for mine, theirs in pairs:
        if len(mine) != len(labels) or len(theirs) != len(labels):
            raise ValueError(f"predictions ({len(mine)}, {len(theirs)}) and labels ({len(labels)}) differ in "
                             "length: the runs were not evaluated on the same validation set")
        (f1_mine, mine_values), (f1_theirs, theirs_values) = (
            macro_f1_pseudo_values(labels, predictions, num_labels) for predictions in (mine, theirs))
        row = mine_values - theirs_values
        rows.append(row + (f1_mine - f1_theirs) - row.mean())
    return np.stack(rows)


def compare_f1_seed_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], labels: Sequence[int] | None,
                          num_labels: int, config_seeds: int, baseline_seeds: int) -> Comparison:
    """`compare_seed_pairs` for macro-F1, on the runs' validation predictions: the same t over seeds and sentences
    (`crossed_t`) on jackknife pseudo-values; with one seed on each side its sentence part alone (n − 1 degrees
    of freedom), where accuracy has McNemar. Without the true labels (multi-class records from before
    `validation_labels` existed) there is no test."""
    if len(pairs) < MIN_SEED_PAIRS and not (len(pairs) == 1 and config_seeds == baseline_seeds == 1):
        return Comparison(TOO_FEW_SEEDS, len(pairs), math.nan, math.nan, math.nan, math.nan)
    if labels is None:
        return Comparison(LABELS_UNKNOWN, len(pairs), math.nan, math.nan, math.nan, math.nan)
    result = crossed_t(macro_f1_differences(pairs, labels, num_labels))
    return replace(result, test=F1_SEEDS_AND_SENTENCES if len(pairs) > 1 else F1_ONE_SEED)


def f1_interval(f1s: Sequence[float], labels: Sequence[int] | None = None, predictions: Sequence[int] | None = None,
                num_labels: int = 2, confidence: float = CONFIDENCE) -> Interval:
    """Macro-F1 over seeds: Student t over seeds when there are several, as accuracy; for one seed a t interval
    from the jackknife standard error over the validation examples (n − 1 degrees of freedom), where accuracy
    has Wilson; no interval without the labels."""
    if len(f1s) >= 2:
        return t_interval(f1s, confidence)
    if labels is None or predictions is None or len(labels) < 2:
        return Interval(float(f1s[0]), math.nan, math.nan, "none")
    f1 = float(f1s[0])  # the record's own (`evaluate`'s), which the pseudo-values' F equals on the same labels
    values = macro_f1_pseudo_values(labels, predictions, num_labels)[1]
    spread = float(values.std(ddof=1)) / math.sqrt(len(values))
    if spread == 0:
        return Interval(f1, f1, f1, "jackknife")
    low, high = stats.t.interval(confidence, len(values) - 1, loc=f1, scale=spread)
    return Interval(f1, max(0.0, float(low)), min(1.0, float(high)), "jackknife")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment over one family of tests (scipy.stats controls only the false discovery rate).

    Sorted ascending, p_(k) becomes max over j ≤ k of min(1, (m − j + 1) · p_(j)), with m the number of tests;
    a nan (a row without a test) stays nan and is not counted in m."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


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
