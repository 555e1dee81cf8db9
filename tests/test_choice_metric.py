"""What chooses across runs follows --select-by: dev macro-F1 for runs selected by F1, dev accuracy otherwise.

The data: three classes, where the learning rate (or depth) with the higher dev accuracy never predicts the small
class, so its dev macro-F1 is the lower one. A study selected by F1 must choose the other, and say macro-F1 wherever
it names what chose; a study selected by accuracy chooses and reads as before."""
from __future__ import annotations

import sys

import pandas as pd
import pytest
from conftest import quick_config
from test_search import searcher

import ablations.storage
from ablations import plots, tuning_plots
from ablations.cells import run_tuned
from ablations.ledger import Ledger, open_study
from ablations.lr_choice import best_rates, main as lr_choice_main
from ablations.pareto import PARETO_COLUMNS, Point, importance_plot, prune_reason, write_outputs
from ablations.pareto import study_points as pareto_points
from ablations.report import tradeoff_table, write_report
from ablations.space import Grid, SearchSpace
from ablations.storage import load_runs, open_storage
from ablations.tuning import TIE_RULE
from core import UsageError

RATES = (1e-4, 1e-3)
# rate -> (dev accuracy, dev macro-F1): 1e-4 is more accurate on dev and misses a class; 1e-3 is the better F1.
DEV = {1e-4: (0.70, 0.45), 1e-3: (0.66, 0.62)}
CHOSEN = {"accuracy": 1e-4, "loss": 1e-4, "f1": 1e-3}


def record(config, dev_accuracy: float, dev_f1: float, seconds: float = 2.0) -> dict:
    entry = {"epoch": 1, "accuracy": dev_accuracy - 0.01, "f1": dev_f1 - 0.01, "loss": 0.5,
             "dev_accuracy": dev_accuracy, "dev_f1": dev_f1, "dev_loss": 0.5, "train_seconds": seconds}
    hits = round(100 * entry["accuracy"])
    return {"run_id": config.run_id, "config": config.to_dict(), "accuracy": entry["accuracy"], "f1": entry["f1"],
            "loss": 0.5, "dev_accuracy": dev_accuracy, "dev_f1": dev_f1, "dev_loss": 0.5, "selected_on": "dev",
            "selected_by": config.select_by, "best_epoch": 1, "history": [entry], "train_seconds": seconds,
            "train_samples": 80, "validation_samples": 100, "num_labels": 3, "device": "cpu",
            "trainable_params": 1000 - 100 * config.freeze_depth, "validation_correct": "1" * hits + "0" * (100 - hits)}


def tune(url: str, base, capsys) -> tuple[dict, str]:
    """One grid invocation with --learning-rates: the stored choice and what it printed."""
    ledger = Ledger(open_storage(url))
    study = open_study(ledger.storage, "grid")
    configs = Grid((0,), ("linear",), (1,), (42, 43)).configs(base)
    run_tuned(configs, RATES, study, ledger, lambda config, siblings: record(config, *DEV[config.learning_rate]),
              retries=0, progress=False)
    return study.user_attrs["lr_tuning"], capsys.readouterr().out


def drawn_report(runs, folder, monkeypatch) -> tuple[str, dict]:
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.setdefault(path.name, figure) and path)
    write_report(runs, folder)
    return (folder / "tradeoff.md").read_text(), drawn


@pytest.mark.parametrize("select_by", ["accuracy", "loss", "f1"])
def test_the_grid_and_the_report_choose_the_rate_by_macro_f1_only_under_select_by_f1(
        tiny_bert, toy_data, tmp_path, capsys, monkeypatch, select_by):
    base = quick_config(tiny_bert, toy_data, seed=42, select_by=select_by)
    tuning, printed = tune(f"sqlite:///{tmp_path}/grid.db", base, capsys)
    f1 = select_by == "f1"
    assert [cell["learning_rate"] for cell in tuning["cells"]] == [CHOSEN[select_by]]
    assert tuning["rule"] == ("the higher dev macro-F1, then the lower dev loss, then the smaller learning rate"
                              if f1 else TIE_RULE)
    values = {f"{rate:g}": DEV[rate][1 if f1 else 0] for rate in RATES}
    assert tuning["cells"][0][f"dev_{'f1' if f1 else 'accuracy'}"] == values
    assert f"chosen on dev{' macro-F1' if f1 else ''} ({values})" in printed

    runs = load_runs(f"sqlite:///{tmp_path}/grid.db", ["grid"])
    table = tradeoff_table(runs)
    assert list(table["learning_rate"]) == [CHOSEN[select_by]]
    assert list(table["learning_rate_choice"]) == [f"dev{' macro-F1' if f1 else ''}, of 2 rates"]
    text, drawn = drawn_report(runs, tmp_path / "report", monkeypatch)
    named = "dev macro-F1" if f1 else "dev accuracy"
    assert f"by the higher {named}, then the lower dev loss" in text and f"used (higher {named}, then" in text
    assert ("dev accuracy" in text) == (not f1)  # no sentence of an F1 study says accuracy chose
    axes = [ax for ax in drawn["lr_curves.png"].axes if ax.get_title()]
    assert [ax.get_ylabel() for ax in axes] == [f"{named} (%)"]
    assert drawn["lr_curves.png"]._suptitle.get_text().startswith(f"D{named[1:]} vs learning rate")
    rings = axes[0].collections[-1].get_offsets().tolist()
    assert rings == [[CHOSEN[select_by], 100 * DEV[CHOSEN[select_by]][1 if f1 else 0]]]


def test_a_study_fed_by_grids_of_both_metrics_chooses_each_cell_by_its_own_and_names_both(
        tiny_bert, toy_data, tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path}/grid.db"
    for select_by in ("accuracy", "f1"):  # two invocations into one study
        tune(url, quick_config(tiny_bert, toy_data, seed=42, select_by=select_by), capsys)
    runs = load_runs(url, ["grid"])
    table = tradeoff_table(runs)
    assert dict(zip(table["select_by"], table["learning_rate"])) == {"accuracy": 1e-4, "f1": 1e-3}
    assert set(table["learning_rate_choice"]) == {"dev, of 2 rates", "dev macro-F1, of 2 rates"}
    text, drawn = drawn_report(runs, tmp_path / "report", monkeypatch)
    assert "the higher dev accuracy (dev macro-F1 for runs that chose their epoch by it, --select-by f1)" in text
    axes = [ax for ax in drawn["lr_curves.png"].axes if ax.get_title()]
    assert [(ax.get_title(), ax.get_ylabel()) for ax in axes] == [
        ("schedule: linear, by dev accuracy", "dev accuracy (%)"), ("schedule: linear, by dev macro-F1",
                                                                   "dev macro-F1 (%)")]
    with pytest.raises(UsageError, match="both dev accuracy and dev macro-F1"):
        best_rates(runs)  # a mean over both would average two different scores


def sweep_run(rate: float, select_by: str) -> dict:
    config = {"freeze_depth": 0, "learning_rate": rate, "select_by": select_by}
    dev_accuracy, dev_f1 = DEV[rate]
    return {"state": "COMPLETE", "record": {"config": config, "accuracy": 0.5, "f1": 0.5,
                                            "dev_accuracy": dev_accuracy, "dev_f1": dev_f1}}


@pytest.mark.parametrize("select_by", ["accuracy", "f1"])
def test_lr_choice_averages_the_score_that_chose_and_names_it(monkeypatch, capsys, select_by):
    runs = [sweep_run(rate, select_by) for rate in RATES]
    column = 1 if select_by == "f1" else 0
    assert best_rates(runs) == {0: (CHOSEN[select_by], DEV[CHOSEN[select_by]][column], 1)}
    monkeypatch.setattr(ablations.storage, "load_runs", lambda storage, studies: runs)
    monkeypatch.setattr(sys, "argv", ["lr_choice", "--storage", "sqlite://"])
    assert lr_choice_main() == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == f"# depth learning_rate mean_dev_{'macro-F1' if select_by == 'f1' else 'accuracy'} runs"
    for run in runs:  # a sweep without a dev split (--dev-size 0) chose on validation, and says so
        run["record"].pop("dev_accuracy"), run["record"].pop("dev_f1")
    assert lr_choice_main() == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == f"# depth learning_rate mean_validation_{'macro-F1' if select_by == 'f1' else 'accuracy'} runs"


def search_train(config, on_epoch=None) -> dict:
    """Depth 0 is the more accurate on dev but misses a class; depth 1 the better F1; both take 2 s."""
    result = record(config, *{0: DEV[1e-4], 1: DEV[1e-3]}[config.freeze_depth])
    if on_epoch is not None:
        on_epoch(result["history"][0])
    return result | {"stopped_early": None}


@pytest.mark.parametrize("select_by", ["accuracy", "f1"])
def test_the_search_tells_optuna_and_draws_its_front_by_the_score_that_chose(tmp_path, select_by):
    base = quick_config(str(tmp_path / "model"), str(tmp_path / "data"), select_by=select_by)
    space = SearchSpace(freeze_depth=(0, 1), schedulers=("linear",), epochs=(1, 1), learning_rate=(1e-3, 1e-3),
                        warmup_ratio=(0.0, 0.0))
    search = searcher(tmp_path, space=space, train=search_train, base=base, sampler="random", prune=False)
    for depth in (0, 1):
        search.study.enqueue_trial({"freeze_depth": depth})
    search.run(2, progress=False)
    f1 = select_by == "f1"
    done = [t for t in search.study.trials if t.values]
    assert {t.params["freeze_depth"] for t in done} == {0, 1}
    assert all(t.values[0] == t.user_attrs["record"]["dev_f1" if f1 else "dev_accuracy"] for t in done)
    write_outputs(search.study, search.ledger, base, "", tmp_path, report=True)
    front = pd.read_csv(tmp_path / "pareto.csv")
    assert list(front["freeze_depth"]) == [1 if f1 else 0]  # same time: the better score dominates
    assert list(front.columns) == (PARETO_COLUMNS[:5] + ["dev_f1", "f1"] + PARETO_COLUMNS[5:] if f1
                                   else PARETO_COLUMNS)
    summary = (tmp_path / "search_summary.md").read_text()
    if f1:
        assert "## Pareto front (dev macro-F1 vs training seconds; validation macro-F1 and accuracy reported)" \
            in summary and "| dev macro-F1 | val. macro-F1 | val. accuracy |" in summary
        assert "macro-F1 0.6100 (dev 0.6200), accuracy 0.6500" in summary and "highest dev macro-F1 end" in summary
        assert "dev accuracy" not in summary
    else:
        assert "## Pareto front (dev accuracy vs training seconds; validation accuracy reported)" in summary
        assert "accuracy 0.6900 (dev 0.7000)" in summary and "macro-F1" not in summary
        assert "its highest dev accuracy end, with dev accuracy and time" in summary  # the knee's score: dev's


def test_a_run_merged_in_from_a_search_of_the_other_metric_is_left_out_of_the_front_and_said(tmp_path):
    """`ablations.merge` copies runs into a same-named study without checking its pinned --select-by: a run that
    chose by accuracy is neither on an F1 search's front nor a point its pruning compares with."""
    import optuna

    base = quick_config(str(tmp_path / "model"), str(tmp_path / "data"), select_by="f1")
    space = SearchSpace(freeze_depth=(1, 1), schedulers=("linear",), epochs=(1, 1), warmup_ratio=(0.0, 0.0))
    search = searcher(tmp_path, space=space, train=search_train, base=base, prune=False)
    search.run(1, progress=False)
    merged = record(base.replace(select_by="accuracy", freeze_depth=0), 0.99, 0.99, seconds=1.0)
    search.study.add_trial(optuna.trial.create_trial(
        params={"freeze_depth": 0}, distributions={"freeze_depth": optuna.distributions.IntDistribution(0, 1)},
        values=[0.99, 1.0], user_attrs={"run_id": merged["run_id"], "record": merged}))
    assert [p.where for p in pareto_points(search.study, metric="f1")] == ["search#0"]
    summary = write_outputs(search.study, search.ledger, base, "", tmp_path, report=False)
    assert list(pd.read_csv(tmp_path / "pareto.csv")["freeze_depth"]) == [1]
    assert "2 distinct complete runs" in summary
    assert "1 complete run(s) of this study chose by dev accuracy, not this search's dev macro-F1" in summary


def test_pruning_reads_the_score_that_chooses(tmp_path):
    history = [{"epoch": 1, "dev_accuracy": 0.90, "dev_f1": 0.40, "train_seconds": 2.0}]
    finished = [Point(0.60, 1.0, "search#0")]  # beats this trial's F1 + margin, not its accuracy, and is faster
    assert prune_reason(finished, history, 0.01, "accuracy") is None
    assert prune_reason(finished, history, 0.01, "f1").startswith("dominated after epoch 1: best macro-F1 0.4000")
    # The one-objective study (--objective accuracy) reports the same score to Optuna's pruner.
    base = quick_config(str(tmp_path / "model"), str(tmp_path / "data"), select_by="f1")
    search = searcher(tmp_path, name="one", space=SearchSpace(freeze_depth=(1, 1), schedulers=("linear",),
                      epochs=(1, 1)), train=search_train, base=base, objective="accuracy")
    search.run(1, progress=False)
    trial = search.study.trials[0]
    assert trial.intermediate_values == {1: DEV[1e-3][1]} and trial.values == [DEV[1e-3][1]]


def test_importance_names_the_score_that_chose(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(tuning_plots, "importance", lambda panels, varying, runs, path: drawn.update(panels))
    rows = pd.DataFrame({"freeze_depth": [0, 1, 2, 3], "scheduler": ["linear"] * 4, "epochs": [1] * 4,
                         "learning_rate": [1e-3] * 4, "warmup_ratio": [0.0] * 4, "choice": [0.4, 0.5, 0.6, 0.7],
                         "train_seconds": [4.0, 3.0, 2.0, 1.0], "dev_accuracy": [0.5] * 4})  # run_rows' columns
    importance_plot(rows, tmp_path / "importance.png", "f1")
    assert list(drawn) == ["dev macro-F1", "training seconds"]
