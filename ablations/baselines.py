"""Each row of the trade-off table against its baseline: which baseline (nuisance settings tuned away on dev), the
speed-up, the difference on the reported metric and its test over seeds and sentences, Holm-adjusted over rows.

The reported metric is validation accuracy, or validation macro-F1 where every run chose by it (`--select-by f1`:
`compared_on`); what chose a rate, an epoch or a configuration is also what the report compares and tests.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from ablations.stats import compare_f1_seed_pairs, compare_seed_pairs, correctness, f1_interval, holm, pareto_front
from ablations.tuning import choose_configuration, metrics_of
from core.config import DATA_FIELDS

NUISANCE = ("learning_rate", "warmup_ratio", "weight_decay")
COLUMN = {"accuracy": "accuracy", "macro-F1": "f1"}  # compared_on -> the table's column prefix


def compared_on(records: list[dict]) -> str:
    """'macro-F1' where every record chose by it (a user who asks for F1 does so because accuracy hides a class
    the model never predicts: the report's Δ, test and front would hide it again), else 'accuracy'. A study that
    mixes both keeps accuracy: the two do not compare."""
    return "macro-F1" if metrics_of(records) == ("f1",) else "accuracy"


def validation_labels(records: list[dict]) -> np.ndarray | None:
    """The validation labels of these records' runs (one validation set): stored since `validation_labels`
    existed; for older binary records they follow from prediction and correctness; otherwise unknown (None)."""
    for record in records:
        if record.get("validation_labels") is not None:
            return np.asarray(record["validation_labels"])
    for record in records:
        predictions, correct = record.get("validation_predictions"), record.get("validation_correct")
        if record.get("num_labels") == 2 and predictions and correct and len(predictions) == len(correct):
            return np.where(correctness(correct) == 1, predictions, 1 - np.asarray(predictions))
    return None


def f1_summary(records: list[dict]) -> dict[str, Any]:
    """Macro-F1 over seeds with its 95 % interval (`ablations.stats.f1_interval`): nan where records lack it."""
    f1s = [r.get("f1") for r in records]
    if not f1s or None in f1s:
        return {"f1_mean": math.nan, "f1_low": math.nan, "f1_high": math.nan, "f1_interval": None}
    labels = validation_labels(records)
    predictions = records[0].get("validation_predictions")
    usable = labels is not None and predictions is not None and len(predictions) == len(labels)
    interval = f1_interval(f1s, labels if usable else None, predictions if usable else None,
                           records[0].get("num_labels") or 2)
    return {"f1_mean": sum(f1s) / len(f1s), "f1_low": interval.low, "f1_high": interval.high,
            "f1_interval": interval.method}


def tune_baselines(table: pd.DataFrame, groups: dict, overrides: dict) -> None:
    """Point each row at its baseline with nuisance settings tuned away: among the configurations (rows) that match
    the row on everything but the overridden and nuisance fields (learning rate, warmup, weight decay), the one
    `ablations.tuning` ranks first on the dev split, never the one most accurate on the reported validation set.
    A study that picked the learning rate per depth then still compares depth with depth."""
    ignored = [n for n in NUISANCE if n not in overrides]

    def scientific(key: str) -> str:
        return json.dumps({k: v for k, v in json.loads(key).items() if k not in ignored}, sort_keys=True)

    candidates: dict[str, list[str]] = {}
    for key in table["config_key"]:
        if all(groups[key][0].get(k) == v for k, v in overrides.items()):
            candidates.setdefault(scientific(key), []).append(key)
    chosen = [choose_configuration({k: groups[k][1] for k in candidates[scientific(target)]})
              if scientific(target) in candidates else target for target in table["baseline_key"]]
    table["baseline_key"] = chosen
    table["baseline"] = table["baseline_key"] == table["config_key"]


def speedup_interval(base, row) -> dict[str, float]:
    """Baseline time / configuration time, with bounds from the two 95 % time intervals (slowest baseline
    over fastest configuration and the reverse: conservative, wider than a joint 95 % interval). A time interval
    whose lower end is 0 (a noisy timing's t interval, cut at zero) leaves the speed-up unbounded above: inf. Two
    rows that read one timing (the same work shape and steps: a schedule against another) are exactly 1."""
    def ratio(time: float, other: float) -> float:
        return (math.nan if math.isnan(time) else math.inf) if other == 0 else time / other

    times = ("train_seconds", "train_seconds_lo", "train_seconds_hi")
    if all(base[key] == getattr(row, key) for key in times):  # one timing (a work shape's, the same steps): the
        return {"speedup": 1.0, "speedup_lo": 1.0, "speedup_hi": 1.0}  # ratio is exactly 1, not its own noise

    return {"speedup": ratio(base["train_seconds"], row.train_seconds),
            "speedup_lo": ratio(base["train_seconds_lo"], row.train_seconds_hi),
            "speedup_hi": ratio(base["train_seconds_hi"], row.train_seconds_lo)}


def _by_seed(records: list[dict], key: str) -> dict[int, Any]:
    return {record["config"]["seed"]: record.get(key) or "" for record in records}


def _test(mine: list[dict], theirs: list[dict], metric: str):
    """The row's test against its baseline on seed-matched runs: on correctness for accuracy
    (`ablations.stats.compare_seed_pairs`), on predictions and labels for macro-F1 (`compare_f1_seed_pairs`)."""
    key = "validation_correct" if metric == "accuracy" else "validation_predictions"
    ours, others = _by_seed(mine, key), _by_seed(theirs, key)
    pairs = [(ours[s], others[s]) for s in sorted(ours.keys() & others.keys())
             if ours[s] and len(ours[s]) == len(others[s])]
    if metric == "accuracy":
        return compare_seed_pairs(pairs, len(ours), len(theirs))
    labels = validation_labels(mine + theirs)
    if labels is not None and any(len(predictions) != len(labels) for predictions, _ in pairs):
        labels = None  # not the validation set these runs were scored on
    return compare_f1_seed_pairs(pairs, labels, mine[0].get("num_labels") or 2, len(ours), len(theirs))


def data_groups(table: pd.DataFrame) -> list[pd.DataFrame]:
    """The table's rows of each dataset apart (a report of several studies can hold several): accuracies on other
    sentences do not compare, so each dataset has its own Pareto front."""
    data = [field for field in DATA_FIELDS if field in table.columns]
    return [rows for _, rows in table.groupby(data, dropna=False, sort=False)] if data else [table]


def pareto_flags(table: pd.DataFrame, metric: str = "accuracy") -> list[bool]:
    """The Pareto front (`ablations.stats.pareto_front`) of each dataset's rows (`data_groups`)."""
    flags = pd.Series(False, index=table.index)
    for rows in data_groups(table):
        flags[rows.index] = pareto_front(rows[f"{COLUMN[metric]}_mean"].tolist(), rows["train_seconds"].tolist(),
                                         rows["train_seconds_lo"].tolist(), rows["train_seconds_hi"].tolist())
    return flags.tolist()


def compare_with_baselines(table: pd.DataFrame, groups: dict[str, tuple[dict, list[dict]]],
                           metric: str = "accuracy") -> pd.DataFrame:
    """Speed-up, accuracy and macro-F1 differences, and a test of `metric` (`compared_on`) for each row against its
    baseline on seed-matched runs (over seeds and sentences; one seed each: exact McNemar for accuracy, the
    sentences' jackknife t for macro-F1; or "too few seeds"), Holm-adjusted over the rows of this report:
    `p_value` adjusted, `p_value_raw` not. `tested_delta` is the difference the test is about, over the seed pairs
    alone: where some seeds have no partner it differs from the difference of the rows' means over all seeds."""
    by_key = table.set_index("config_key")
    compared = []
    for row in table.itertuples(index=False):
        result: dict[str, Any] = {"speedup": math.nan, "speedup_lo": math.nan, "speedup_hi": math.nan,
                                  "accuracy_delta": math.nan, "f1_delta": math.nan, "compared_on": metric,
                                  "seed_pairs": None, "test": None, "tested_delta": math.nan, "p_value_raw": math.nan}
        if row.baseline_key in by_key.index:
            base = by_key.loc[row.baseline_key]
            result.update(speedup_interval(base, row))
            result["accuracy_delta"] = row.accuracy_mean - base["accuracy_mean"]
            result["f1_delta"] = row.f1_mean - base["f1_mean"]
            if not row.baseline:
                test = _test(groups[row.config_key][1], groups[row.baseline_key][1], COLUMN[metric])
                result.update(seed_pairs=test.seed_pairs, test=test.test, tested_delta=test.delta,
                              p_value_raw=test.p_value)
        compared.append(result)
    compared = pd.DataFrame(compared, index=table.index)
    compared["seed_pairs"] = compared["seed_pairs"].astype("Int64")  # whole numbers, blank where there is no test
    compared["p_value"] = holm(compared["p_value_raw"].tolist())
    return pd.concat([table, compared], axis=1)
