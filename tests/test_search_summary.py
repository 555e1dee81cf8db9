"""search_summary.md and tradeoff.md of one search state one speed-up for the knee: the summary reads its baseline
from the report's table instead of picking the best depth-0 run anywhere on the storage."""
from __future__ import annotations

import re

import optuna
import pandas as pd
from test_search import fake_train, searcher

from ablations.cells import run_cells
from ablations.pareto import front_table, knee_index, run_rows, write_outputs
from ablations.space import SearchSpace
from ablations.ledger import open_study


def test_the_summary_and_the_report_state_one_speed_up_for_the_knee(tmp_path):
    space = SearchSpace(freeze_depth=(0, 2), schedulers=("linear",), epochs=(1, 1), learning_rate=(1e-3, 5e-3))
    search = searcher(tmp_path, space=space, sampler="random", prune=False)
    search.run(9, progress=False)
    # A grid on the same storage holds a more accurate full fine-tune, timed under load (60 s, not 3 s).
    loaded = search.base.replace(freeze_depth=0, scheduler="linear", epochs=1, learning_rate=0.01)
    grid = open_study(search.ledger.storage, "grid")
    run_cells([loaded], grid, search.ledger, lambda config, siblings: fake_train(config) | {"train_seconds": 60.0},
              progress=False)
    write_outputs(search.study, search.ledger, search.base, "", tmp_path, report=True)

    front = front_table(run_rows("search", search.study.get_trials()))
    knee = front.iloc[knee_index(front)]
    table = pd.read_csv(tmp_path / "tradeoff.csv")
    row = table[(table["freeze_depth"] == knee.freeze_depth) & (table["learning_rate"] == knee.learning_rate)
                & (table["warmup_ratio"] == knee.warmup_ratio)]
    assert len(row) == 1 and row.iloc[0]["speedup"] > 0  # the search ran a depth-0 baseline for the knee
    summary = (tmp_path / "search_summary.md").read_text()
    stated = re.search(r"is ([0-9.]+)× as fast, ([+−-][0-9.]+) pp", summary)
    assert stated, summary
    assert stated.group(1) == f"{row.iloc[0]['speedup']:.2f}"
    assert float(stated.group(2).replace("−", "-")) == round(100 * row.iloc[0]["accuracy_delta"], 1)
    assert f"{row.iloc[0]['speedup']:.2f}×" in (tmp_path / "tradeoff.md").read_text()
    # The front's columns say which accuracy is which, as tradeoff.md's do: the search chose on dev, and the
    # column beside it ("accuracy") is validation's.
    lines = [line for line in summary.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    assert [c["val. accuracy"] for c in cells] == [f"{a:.4f}" for a in front["accuracy"]]


def test_the_search_end_loads_its_runs_once_and_builds_one_trade_off_table(tmp_path, monkeypatch):
    """search_summary.md and the trade-off report read one load of the stored runs and one table built from it."""
    import ablations.storage
    import ablations.tradeoff

    search = searcher(tmp_path, space=SearchSpace(freeze_depth=(0, 2), schedulers=("linear",), epochs=(1, 1)),
                      sampler="random", prune=False)
    search.run(4, progress=False)
    calls = {"load_runs": 0, "tradeoff_table": 0}

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    counted(ablations.storage, "load_runs")
    counted(ablations.tradeoff, "tradeoff_table")
    write_outputs(search.study, search.ledger, search.base, "", tmp_path, report=True)
    assert calls == {"load_runs": 1, "tradeoff_table": 1}
    assert {"runs.csv", "tradeoff.csv", "tradeoff.md", "search_summary.md", "pareto.csv"} <= \
        {path.name for path in tmp_path.iterdir()}


def test_pareto_csv_and_the_report_time_a_search_with_its_stored_sitting_alike(tmp_path):
    """A search whose shapes were timed again in a stored sitting (timing_passes --interleave --store): pareto.csv,
    the summary's front and the trade-off table all take each run's time from the sitting, not from the trial."""

    from ablations.stored_sitting import sitting_key, store_sitting

    def timed_train(config, on_epoch=None):
        return fake_train(config, on_epoch) | {"timing": {"steps": 10, "measured_at": "2026-01-01T10:00:00Z"}}
    space = SearchSpace(freeze_depth=(0, 2), schedulers=("linear",), epochs=(1, 1), learning_rate=(1e-3, 5e-3))
    search = searcher(tmp_path, space=space, train=timed_train, sampler="random", prune=False)
    search.run(6, progress=False)
    records = {t.user_attrs["record"]["config"]["freeze_depth"]: t.user_attrs["record"]
               for t in search.study.get_trials() if "record" in t.user_attrs}
    assert len(records) >= 2  # depths the sampler chose
    per_step = {d: p for d, p in {0: 0.5, 1: 0.2, 2: 0.1}.items() if d in records}  # 10 steps: 5, 2, 1 s (not 3, 2, 1)
    store_sitting(search.ledger.storage.url, "search", [
        {"shape": sitting_key(records[d]["config"], records[d].get("device"), records[d].get("train_samples")),
         "measured_at": "2026-01-02T09:00:00Z", "per_step": p,
         "per_step_low": p, "per_step_high": p, "prefix_seconds": 0.0, "repeat_seconds": [p] * 5,
         "contended": False, "evidence": "quiet", "rounds": 5} for d, p in per_step.items()])
    study = optuna.load_study(study_name="search", storage=search.ledger.storage)  # with the stored sitting
    write_outputs(study, search.ledger, search.base, search.ledger.storage.url, tmp_path, report=True)
    pareto = pd.read_csv(tmp_path / "pareto.csv")
    assert set(pareto["train_seconds"]) <= {10 * p for p in per_step.values()}
    assert 10 * min(per_step.values()) in set(pareto["train_seconds"])  # the fastest depth is on the front
    table = pd.read_csv(tmp_path / "tradeoff.csv")
    for depth, p in per_step.items():
        assert set(table.loc[table.freeze_depth == depth, "train_seconds"]) == {10 * p}


def test_a_search_without_a_dev_split_names_validation_as_what_chose(tmp_path, monkeypatch):
    # fake_train records no dev split (--dev-size 0): the front, knee and importance were chosen on validation.
    space = SearchSpace(freeze_depth=(0, 2), schedulers=("linear",), epochs=(1, 1), learning_rate=(1e-3, 5e-3))
    search = searcher(tmp_path, space=space, sampler="random", prune=False)
    search.run(5, progress=False)
    from ablations import tuning_plots
    panels = {}
    monkeypatch.setattr(tuning_plots, "importance", lambda found, *args: panels.update(found))
    write_outputs(search.study, search.ledger, search.base, "", tmp_path, report=True)
    summary = (tmp_path / "search_summary.md").read_text()
    assert "## Pareto front (validation accuracy vs training seconds: no dev split, validation chose)" in summary
    body = summary.split("## ")[1].replace("no dev split", "")
    assert "dev " not in body  # no empty "dev accuracy" column, no baseline "most accurate" on dev
    assert "with the knee's schedule and epochs and the highest validation accuracy" in summary
    assert "its highest validation accuracy end, with validation accuracy and time" in summary
    assert list(panels) == ["validation accuracy", "training seconds"]


def test_the_front_marks_a_time_taken_under_load_as_the_report_does(tmp_path):
    space = SearchSpace(freeze_depth=(0, 2), schedulers=("linear",), epochs=(1, 1), learning_rate=(1e-3, 5e-3))
    def loaded(config, on_epoch=None) -> dict:  # depth 1 timed while other processes loaded the machine
        return fake_train(config, on_epoch) | {"contended": config.freeze_depth == 1}

    search = searcher(tmp_path, space=space, sampler="random", prune=False, train=loaded)
    search.run(6, progress=False)
    write_outputs(search.study, search.ledger, search.base, "", tmp_path, report=True)
    rows = [line for line in (tmp_path / "search_summary.md").read_text().splitlines() if line.startswith("| 1 |")]
    table = (tmp_path / "tradeoff.md").read_text()
    assert rows and all(" ⚠ |" in line for line in rows) and "⚠" in table  # was a plain time beside tradeoff.md's ⚠
    others = [line for line in (tmp_path / "search_summary.md").read_text().splitlines()
              if line.startswith("| 0 |")]
    assert others and all("⚠" not in line for line in others)


def test_the_front_is_drawn_on_the_dev_score_that_chose_not_on_validation():
    # On validation c would dominate both others; on dev, what the search chose on, a is the accurate end.
    rows = pd.DataFrame([{"run_id": "a", "choice": 0.90, "dev_accuracy": 0.90, "accuracy": 0.70, "train_seconds": 10.0},
                         {"run_id": "b", "choice": 0.80, "dev_accuracy": 0.80, "accuracy": 0.95, "train_seconds": 10.0},
                         {"run_id": "c", "choice": 0.60, "dev_accuracy": 0.60, "accuracy": 0.99, "train_seconds": 5.0}])
    assert list(front_table(rows)["run_id"]) == ["c", "a"]
