"""The report and merge commands as a user meets them after the first run (README: Reading the results, Many GPUs
or machines): a mistake is one line, exit code 2, nothing written; what is not a mistake is not refused; what the
tables say matches the records."""
from __future__ import annotations

import math
import sys
import warnings

import optuna
import pandas as pd
import pytest

from conftest import run_command
from test_report import make_run, markdown, report_context, row, run_cli, stored, timed, tradeoff_table


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_a_report_of_a_study_without_a_full_fine_tune_is_written_without_a_baseline(monkeypatch, capsys, tmp_path):
    """`python -m ablations.report` with no --baseline reads as the grid's own report: a grid of depths 3-6 (or a
    search that never drew depth 0) gets its tables with no speed-up. It stopped at "--baseline freeze_depth=0
    matches no completed configuration", a flag the user never gave; one given must still match."""
    url = f"sqlite:///{tmp_path}/ablations.db"
    stored(url, "grid", [make_run(4, "linear", 2, seed, 0.85, 20.0, number=seed) for seed in (0, 1)])
    out = tmp_path / "out"
    assert run_cli(monkeypatch, "--storage", url, "--output-dir", str(out)) == 0
    table = pd.read_csv(out / "tradeoff.csv")
    assert list(table["freeze_depth"]) == [4] and not table["baseline"].any() and table["speedup"].isna().all()
    capsys.readouterr()
    assert run_cli(monkeypatch, "--storage", url, "--output-dir", str(out), "--baseline", "freeze_depth=0") == 2
    assert "--baseline freeze_depth=0 matches no completed configuration" in one_line_error(capsys)


def test_a_report_folder_that_cannot_be_made_is_one_line_and_nothing_is_written(monkeypatch, capsys, tmp_path):
    """An --output-dir under a file ended in FileExistsError's traceback from mkdir."""
    url = f"sqlite:///{tmp_path}/ablations.db"
    stored(url, "grid", [make_run(0, "linear", 2, 0, 0.85, 20.0)])
    (tmp_path / "a-file").write_text("not a folder")
    assert run_cli(monkeypatch, "--storage", url, "--output-dir", str(tmp_path / "a-file" / "out")) == 2
    assert "--output-dir" in one_line_error(capsys) and (tmp_path / "a-file").read_text() == "not a folder"


def test_a_misspelt_study_leaves_no_report_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/ablations.db"
    stored(url, "grid", [make_run(0, "linear", 2, 0, 0.85, 20.0)])
    assert run_cli(monkeypatch, "--storage", url, "--study-name", "gird") == 2
    assert "study 'gird' is not in" in one_line_error(capsys) and not (tmp_path / "runs").exists()


def test_an_empty_study_is_reported_as_holding_no_trials(monkeypatch, capsys, tmp_path):
    """The line said "the storage holds only failed, pruned or running trials" of a study that holds none."""
    url = f"sqlite:///{tmp_path}/ablations.db"
    optuna.create_study(study_name="fresh", storage=url, directions=["maximize", "minimize"])
    assert run_cli(monkeypatch, "--storage", url, "--study-name", "fresh", "--output-dir", str(tmp_path / "o")) == 2
    assert one_line_error(capsys).endswith("no completed runs to report: the studies read hold no trials yet\n")


def test_a_time_interval_reaching_zero_leaves_the_speed_up_unbounded_above_without_a_warning():
    """A timing taken under heavy load can have a t interval cut at 0 s: dividing by it printed numpy's
    "RuntimeWarning: divide by zero" on every report, and the table showed "inf"."""
    rows = [timed(make_run(0, "linear", 2, s, a, 40.0, number=s), 30.0, 50.0) for s, a in ((0, 0.9), (1, 0.88))]
    rows += [timed(make_run(4, "linear", 2, s, a, 3.0, number=2 + s), 0.0, 6.3) for s, a in ((0, 0.85), (1, 0.86))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = tradeoff_table(rows)
    frozen = row(table, freeze_depth=4)
    assert frozen["speedup_lo"] == pytest.approx(30.0 / 6.3) and math.isinf(frozen["speedup_hi"])
    assert f"| {40 / 3:.2f}× [{30 / 6.3:.2f}, ∞] |" in markdown(table, report_context(rows, table))


def test_a_row_contended_only_by_its_prefix_build_names_that_evidence_not_the_quiet_step_timing():
    """A grid reusing a quiet saved step timing while the frozen-prefix build ran beside load: the row was ⚠ with
    `contention` "quiet: other processes kept 0.02 of 2 cores busy" (seen: MiniLM, depth 3, SST-2 200 rows)."""
    build = "other processes kept 1.34 of 2 cores busy (threshold 0.25)"
    rows = [timed(make_run(3, "linear", 2, s, 0.85, 2.1, number=s), 1.9, 2.3) for s in (0, 1)]
    for run in rows:
        run["record"].update(contended=True)
        run["record"]["timing"].update(evidence="quiet: other processes kept 0.02 of 2 cores busy", contended=False,
                                       prefix_evidence=build)
    frozen = row(tradeoff_table(rows), freeze_depth=3)
    assert bool(frozen["contended"]) and frozen["contention"] == f"frozen-prefix build: {build}"


def run_merge(monkeypatch, *arguments: str) -> int:
    from ablations.merge import main
    return run_command(monkeypatch, main, "python -m ablations.merge", *arguments)


def test_merging_a_storage_into_itself_is_one_line(monkeypatch, capsys, tmp_path):
    """`merge runs/ablations.db --into sqlite:///…/runs/ablations.db` said "0 run(s) copied" and exit 0: the
    user meant another worker's file."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/worker1.db"
    stored(url, "grid", [make_run(0, "linear", 2, 0, 0.85, 20.0)])
    assert run_merge(monkeypatch, "worker1.db", "--into", url) == 2
    assert "SOURCE 'worker1.db' is the --into storage itself" in one_line_error(capsys)
    assert len(optuna.load_study(study_name="grid", storage=url).trials) == 1
    # --as gathers a storage's studies into one of its own: a real copy, not refused.
    assert run_merge(monkeypatch, "worker1.db", "--into", url, "--as", "all") == 0
    assert len(optuna.load_study(study_name="all", storage=url).trials) == 1


def test_a_merge_target_that_cannot_be_made_is_one_line(monkeypatch, capsys, tmp_path):
    """A target under a file ended in FileExistsError's traceback from mkdir."""
    url = f"sqlite:///{tmp_path}/worker1.db"
    stored(url, "grid", [make_run(0, "linear", 2, 0, 0.85, 20.0)])
    (tmp_path / "a-file").write_text("not a folder")
    assert run_merge(monkeypatch, url, "--into", str(tmp_path / "a-file" / "merged.db")) == 2
    assert "--into" in one_line_error(capsys) and (tmp_path / "a-file").read_text() == "not a folder"


@pytest.mark.parametrize("command, arguments", [
    ("ablations.lr_choice", ["--storage", "sqlite:///{missing}", "--study-name", "lr-sweep"]),
    ("ablations.timing_passes", ["--storage", "sqlite:///{missing}", "--study-name", "grid"]),
    ("ablations.merge", ["sqlite:///{missing}", "--into", "{target}"]),
])
def test_a_sqlite_file_that_does_not_exist_is_one_line_and_is_not_created(command, arguments, monkeypatch, capsys,
                                                                          tmp_path):
    """Opening a missing SQLite file creates it empty: lr_choice and timing_passes answered "it holds no studies"
    and left the file behind; merge copied nothing, printed nothing and exited 0 (a mistyped worker file)."""
    import importlib

    from core.cli import main_guard
    missing, target = tmp_path / "worker1.db", tmp_path / "merged.db"
    monkeypatch.setattr(sys, "argv", [command] + [a.format(missing=missing, target=target) for a in arguments])
    with pytest.raises(SystemExit) as exit_:
        main_guard(importlib.import_module(command).main)
    assert exit_.value.code == 2
    assert f"sqlite:///{missing} is invalid: the SQLite file does not exist" in one_line_error(capsys)
    assert not missing.exists() and not target.exists()
