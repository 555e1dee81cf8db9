"""search_summary.md and tradeoff.md of one search state one speed-up for the knee: the summary reads its baseline
from the report's table instead of picking the best depth-0 run anywhere on the storage."""
from __future__ import annotations

import re

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
