"""Every cell tuned alike: one list of rates per cell, the choice on dev by the tie rule, seeds at the chosen rate
only, the tuning run reused as the first seed, nothing retrained on a rerun, and the report built on the choice."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import quick_config

from ablations import plots
from ablations.cells import run_tuned
from ablations.report import run_table, tradeoff_table, write_report
from ablations.space import Grid
from ablations.ledger import Ledger, open_study
from ablations.storage import load_runs, open_storage
from ablations.tuning import TIE_RULE, parse_rates, rank
from core import UsageError

ROOT = Path(__file__).resolve().parents[1]
RATES = (1e-4, 1e-3, 1e-2)
# (depth, rate) -> (dev accuracy, dev loss). Depth 0 is best at 1e-3 on dev; depth 2 ties 1e-4 with 1e-2 on dev
# accuracy and loss, so the smaller rate wins. Validation disagrees with dev everywhere (see `fake_train`).
DEV = {(0, 1e-4): (0.70, 0.5), (0, 1e-3): (0.80, 0.4), (0, 1e-2): (0.60, 0.6),
       (2, 1e-4): (0.75, 0.5), (2, 1e-3): (0.70, 0.3), (2, 1e-2): (0.75, 0.5)}
CHOSEN = {0: 1e-3, 2: 1e-4}


def record(config, dev: float, dev_loss: float, accuracy: float) -> dict:
    hits = round(100 * accuracy)
    return {"run_id": config.run_id, "config": config.to_dict(), "accuracy": accuracy, "loss": 0.5, "f1": accuracy,
            "dev_accuracy": dev, "dev_loss": dev_loss, "dev_f1": dev, "selected_on": "dev", "best_epoch": 1,
            "history": [{"epoch": 1, "accuracy": accuracy, "dev_accuracy": dev, "train_seconds": 1.0}],
            "train_seconds": 10.0 - 3 * config.freeze_depth, "train_samples": 80, "validation_samples": 100,
            "device": "cpu", "trainable_params": 1000 - 100 * config.freeze_depth,
            "validation_correct": "1" * hits + "0" * (100 - hits)}


def fake_train(trained: list):
    def train(config, siblings):
        trained.append(config)
        dev, dev_loss = DEV[(config.freeze_depth, config.learning_rate)]
        return record(config, dev, dev_loss, accuracy=round(1.5 - dev, 2))  # validation prefers the worst dev rate
    return train


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_bert, toy_data):
    url = f"sqlite:///{tmp_path_factory.mktemp('tuned')}/grid.db"
    ledger = Ledger(open_storage(url))
    study = open_study(ledger.storage, "grid")
    base = quick_config(tiny_bert, toy_data, seed=42)
    configs = Grid((0, 2), ("linear",), (1,), (42, 43, 44)).configs(base)
    trained: list = []
    outcome = run_tuned(configs, RATES, study, ledger, fake_train(trained), retries=0, progress=False)
    return url, ledger, study, configs, trained, outcome


def test_each_cell_tries_every_rate_once_on_its_first_seed_and_trains_its_seeds_only_at_the_chosen_rate(tuned):
    _, _, study, _, trained, outcome = tuned
    at = collections.Counter((c.freeze_depth, c.learning_rate, c.seed) for c in trained)
    assert set(at.values()) == {1} and len(outcome.trained) == len(trained) == 2 * 3 + 2 * 2
    for depth in (0, 2):  # the baseline (depth 0) gets exactly the rates and runs any other depth gets
        assert {rate for d, rate, seed in at if d == depth and seed == 42} == set(RATES)
        assert {(rate, seed) for d, rate, seed in at if d == depth and seed != 42} == \
            {(CHOSEN[depth], 43), (CHOSEN[depth], 44)}
    # The tuning run at the chosen rate is seed 42's run: trained once, never again for the seeds phase.
    assert at[(0, 1e-3, 42)] == 1 and at[(2, 1e-4, 42)] == 1
    stored = study.user_attrs["lr_tuning"]
    assert stored["rates"] == list(RATES) and stored["rule"] == TIE_RULE
    assert {c["freeze_depth"]: c["learning_rate"] for c in stored["cells"]} == CHOSEN
    assert all(c["selected_on"] == "dev" for c in stored["cells"])


def test_a_rerun_trains_nothing(tuned):
    _, ledger, study, configs, _, _ = tuned
    again: list = []
    outcome = run_tuned(configs, RATES, study, ledger, fake_train(again), retries=0, progress=False)
    assert again == [] and outcome.trained == []


def test_tie_rule_dev_accuracy_then_dev_loss_then_the_smaller_rate():
    def candidate(rate, dev, dev_loss, accuracy=0.5):
        return {"config": {"learning_rate": rate}, "dev_accuracy": dev, "dev_loss": dev_loss, "accuracy": accuracy,
                "loss": 0.1}

    def best(*candidates):
        return min(candidates, key=rank)["config"]["learning_rate"]

    assert best(candidate(1e-3, 0.8, 0.9, accuracy=0.1), candidate(1e-4, 0.7, 0.1, accuracy=0.99)) == 1e-3
    assert best(candidate(1e-3, 0.8, 0.4), candidate(1e-4, 0.8, 0.5)) == 1e-3
    assert best(candidate(1e-3, 0.8, 0.4), candidate(1e-4, 0.8, 0.4)) == 1e-4
    # Without a dev split (old records) validation accuracy and loss stand in.
    old = [{"config": {"learning_rate": r}, "accuracy": a, "loss": 0.3} for r, a in [(1e-3, 0.9), (1e-4, 0.8)]]
    assert best(*old) == 1e-3


@pytest.mark.parametrize("text", ["3e-5", "1e-5,abc", "1e-5,2", "0,1e-4"])
def test_bad_learning_rates_name_the_flag(text):
    with pytest.raises(UsageError, match="--learning-rates"):
        parse_rates(text)


def test_report_rows_are_the_chosen_rates_with_dev_beside_validation_and_a_curve_per_depth(tuned, tmp_path,
                                                                                           monkeypatch):
    url = tuned[0]
    runs = load_runs(url, ["grid"])
    table = tradeoff_table(runs)
    assert {(r.freeze_depth, r.learning_rate) for r in table.itertuples()} == set(CHOSEN.items())
    assert set(table["learning_rate_choice"]) == {"dev, of 3 rates"}
    # The baseline is depth 0 at the rate dev chose, not 1e-2, which is the best full fine-tune on validation.
    baseline = table[table["baseline"]]
    assert list(baseline["learning_rate"]) == [1e-3] and list(baseline["seeds"]) == [3]
    assert list(table["dev_accuracy_mean"]) == pytest.approx([DEV[(d, r)][0] for d, r in sorted(CHOSEN.items())])
    ledger = run_table(runs)
    ledger = ledger[ledger["state"] == "COMPLETE"]  # withdrawn claims are listed too
    assert len(ledger) == 10 and ledger["dev_accuracy"].notna().all()

    drawn = {}

    def keep(figure, path):
        drawn[path.name] = figure
        return path

    monkeypatch.setattr(plots, "_save", keep)
    paths = write_report(runs, tmp_path / "report")
    assert "lr_curves_png" in paths
    assert "Learning rate chosen" in (tmp_path / "report" / "tradeoff.md").read_text()
    axes = [ax for ax in drawn["lr_curves.png"].axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["schedule: linear"] and axes[0].get_xscale() == "log"
    curves = [line for line in axes[0].get_lines() if len(line.get_xdata()) == len(RATES)]
    assert all(list(line.get_xdata()) == list(RATES) for line in curves)
    drawn_curves = sorted(tuple(round(float(y), 6) for y in line.get_ydata()) for line in curves)
    expected = sorted(tuple(round(100 * DEV[(d, r)][0], 6) for r in RATES) for d in (0, 2))
    assert drawn_curves == expected
    rings = axes[0].collections[-1].get_offsets().tolist()
    assert sorted(map(tuple, rings)) == sorted((r, 100 * DEV[(d, r)][0]) for d, r in CHOSEN.items())


def test_grid_command_tunes_every_cell_then_a_rerun_trains_nothing(tiny_bert, toy_data, tmp_path):
    url = f"sqlite:///{tmp_path}/grid.db"
    command = [sys.executable, "-m", "ablations.grid", "--model", tiny_bert, "--dataset", toy_data,
               "--freeze-depths", "0,1", "--schedulers", "linear", "--epochs", "1", "--seeds", "2",
               "--learning-rates", "1e-3,3e-3", "--precision", "fp32", "--max-length", "32", "--no-progress",
               "--output-dir", str(tmp_path), "--storage", url]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "6 trained now" in first.stdout  # 2 cells x 2 rates, then each cell's second seed
    # The plan counts the tuning runs and the estimate covers all six (it said "4 runs": the seeds alone).
    assert "= 4 runs, plus 2 tuning runs" in first.stdout and "for the 6 of 6 runs not stored yet" in first.stdout
    assert (tmp_path / "lr_curves.png").is_file()
    study = optuna.load_study(study_name="grid", storage=url)
    chosen = {c["freeze_depth"]: c["learning_rate"] for c in study.user_attrs["lr_tuning"]["cells"]}
    seeds = {(t.params["freeze_depth"], t.params["learning_rate"]) for t in study.get_trials()
             if t.params["seed"] == 43}
    assert seeds == set(chosen.items())
    again = subprocess.run(command + ["--no-report"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "0 trained now" in again.stdout
    assert "all 6 runs are stored: nothing to train" in again.stdout  # and no training step timed to say so


def test_curves_draw_the_reports_rows_only_not_the_rates_tuned_away(tuned, tmp_path, monkeypatch):
    # curves.png is the table's rows per epoch: a tuning run at a rate its cell did not choose is in runs.csv and
    # lr_curves.png, not among the table's curves (nor averaged into a row's line).
    runs = load_runs(tuned[0], ["grid"])
    table = tradeoff_table(runs)
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.setdefault(path.name, figure) and path)
    write_report(runs, tmp_path / "report")
    lines = {line.get_gid(): list(line.get_ydata()) for line in drawn["curves.png"].axes[0].lines if line.get_gid()}
    assert lines == {row.label: [pytest.approx(100 * row.accuracy_mean)] for row in table.itertuples()}
