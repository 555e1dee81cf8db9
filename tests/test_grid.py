"""The grid trains every cell exactly once: on re-runs, after kill -9, with several workers, after failures."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import fresh_postgres_database, quick_config, run_command, write_toy_dataset

from ablations.cells import run_cells
from ablations.space import Grid
from ablations.ledger import Ledger, open_study
from ablations.storage import fail_kind, open_storage
from core import run

ROOT = Path(__file__).resolve().parents[1]


def grid_command(model, data, out, url=None, *extra, heartbeat=1):
    command = [sys.executable, "-m", "ablations.grid", "--model", model, "--dataset", data,
               "--freeze-depths", "0-2", "--schedulers", "linear,cosine", "--epochs", "1", "--learning-rate", "3e-3",
               "--precision", "fp32", "--max-length", "32", "--output-dir", str(out), "--no-progress", "--no-report",
               "--heartbeat", str(heartbeat), *extra]
    return command + (["--storage", url] if url else [])


def start(command) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout=300) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-2000:]
    return out


def trained_per_run(url: str, study: str = "grid") -> collections.Counter:
    """How many times each run id was actually trained (COMPLETE and not answered from another run)."""
    trials = optuna.load_study(study_name=study, storage=url).get_trials()
    return collections.Counter(t.user_attrs["run_id"] for t in trials
                               if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("reused_from"))


def test_grid_runs_every_cell_once_and_a_rerun_trains_nothing(tiny_bert, toy_data, tmp_path):
    url = f"sqlite:///{tmp_path}/grid.db"
    first = finish(start(grid_command(tiny_bert, toy_data, tmp_path, url)))
    assert "6 trained now" in first
    counts = trained_per_run(url)
    assert len(counts) == 6 and set(counts.values()) == {1}
    study = optuna.load_study(study_name="grid", storage=url)
    trial = study.best_trials[0]
    assert set(trial.params) >= {"freeze_depth", "scheduler", "epochs", "seed", "learning_rate"}
    assert trial.values[0] == trial.user_attrs["record"]["dev_accuracy"]  # choices are made on dev
    assert trial.values[1] == trial.user_attrs["record"]["train_seconds"]
    assert "for the 6 of 6 runs not stored yet" in first
    # The 3 work shapes (depths) were timed together in one sitting before the first run (core.sitting).
    timings = [t.user_attrs["record"]["timing"] for t in study.trials]
    assert {t["sitting"] for t in timings} == {3} and len({t["measured_at"] for t in timings}) == 1
    assert len({t["shape"] for t in timings}) == 3 and "timing 3 work shape(s) together" in first
    assert "estimate from the timing of its 3 work shape(s)" in first
    second = finish(start(grid_command(tiny_bert, toy_data, tmp_path, url)))
    assert "0 trained now" in second and "all 6 runs are stored: nothing to train" in second
    assert trained_per_run(url) == counts
    assert_dashboard_opens(url, "grid", trials=6)


def assert_dashboard_opens(url: str, study_name: str, trials: int) -> None:
    """optuna-dashboard serves the study: its API lists the study and returns every trial."""
    import json
    from wsgiref.util import setup_testing_defaults
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    app = optuna_dashboard.wsgi(url)

    def get(path: str) -> dict:
        environ, status = {"PATH_INFO": path}, []
        setup_testing_defaults(environ)
        body = b"".join(app(environ, lambda code, headers, *rest: status.append(code)))
        assert status[0].startswith("200"), (path, status)
        return json.loads(body)

    study = next(s for s in get("/api/studies")["study_summaries"] if s["study_name"] == study_name)
    detail = get(f"/api/studies/{study['study_id']}")
    assert len(detail["trials"]) == trials


def test_the_duration_estimate_is_the_pending_steps_times_the_probed_step(tiny_bert, toy_data, monkeypatch):
    """The grid's estimate takes its step time from core.timing's probe, once, and only when runs are pending; its
    steps are those of the training rows left after the dev split (they were counted with the dev rows)."""
    import math

    import core.timing
    from ablations.grid import duration_estimate

    probed = []
    monkeypatch.setattr(core.timing, "seconds_per_training_step",
                        lambda config, session, device: probed.append(config) or (0.5, 100))
    base = quick_config(tiny_bert, toy_data)
    pending = [base.replace(epochs=2, max_train_samples=40), base, base.replace(dev_size=0), base.replace(dev_size=20)]
    # 100 train rows: the default dev split takes 10 (10 %), --dev-size 0 none, --dev-size 20 twenty
    steps = 2 * math.ceil(40 / 16) + math.ceil(90 / 16) + math.ceil(100 / 16) + math.ceil(80 / 16)
    assert duration_estimate([], 3, base, "cpu", None) == "all 3 runs are stored: nothing to train" and not probed
    assert f"({steps} steps x 0.500 s" in duration_estimate(pending, 3, base, "cpu", None) and probed == [base]


def test_the_estimate_after_the_sitting_is_each_runs_steps_times_its_shapes_time(tiny_bert, toy_data, monkeypatch):
    """After the sitting, the grid's second estimate counts each run at its own shape's per-step time (the first
    counted every step at depth 0's) plus the prefix build the sitting made for it, or else the one its timing
    kept; a shape without a timing gives no estimate."""
    import math
    import types

    from ablations.grid import timed_estimate
    from core.session import Session
    from core.prepare import split_rows
    from core.train import planned_shape

    session = Session()
    shallow, deep = quick_config(tiny_bert, toy_data, epochs=2), quick_config(tiny_bert, toy_data, freeze_depth=2)
    keys = {planned_shape(c, session, "cpu"): per_step for c, per_step in ((shallow, 0.5), (deep, 0.125))}
    kept: dict[str, float] = {}  # builds kept with a timing (StepTiming.prefix_seconds)
    monkeypatch.setattr(session.timer, "known", lambda key: types.SimpleNamespace(
        per_step=keys[key], prefix_seconds=kept.get(key)) if key in keys else None)
    data = session.text_data(toy_data, session.tokenizer(tiny_bert), None, None, shallow.max_length)
    steps = math.ceil(len(split_rows(shallow, data)[0]) / shallow.batch_size)  # its dev rows carved out first
    assert steps > 1
    deep_key = planned_shape(deep, session, "cpu")
    line = timed_estimate([shallow, deep, deep.replace(seed=7)], session, "cpu", prefix_seconds={deep_key: 2.0})
    expected = 2 * steps * 0.5 + 2 * (steps * 0.125 + 2.0)
    assert f"{expected:.0f} s of training for the 3 runs" in line and "its 2 work shape(s)" in line
    assert "(evaluation is extra)" in line
    assert "frozen-prefix builds and evaluation are extra" in timed_estimate([deep], session, "cpu")
    kept[deep_key] = 3.0  # no sitting built it now, but its timing kept a build: what the run will be charged
    line = timed_estimate([deep], session, "cpu")
    assert f"{steps * 0.125 + 3.0:.0f} s of training for the 1 runs" in line and "(evaluation is extra)" in line
    keys.pop(deep_key)
    assert timed_estimate([shallow, deep], session, "cpu") is None


def test_lr_by_depth_trains_each_depth_at_its_own_rate_inline_or_from_lr_choice(tiny_bert, toy_data, tmp_path):
    url = f"sqlite:///{tmp_path}/grid.db"
    inline = ["--freeze-depths", "0,2", "--schedulers", "linear", "--lr-by-depth", "0=3e-3,2=1e-2,5=0.5"]
    output = finish(start(grid_command(tiny_bert, toy_data, tmp_path, url, *inline)))
    assert "2 trained now" in output
    assert "--lr-by-depth: depth(s) 5 beyond the model's 2 layers: their rates are not used" in output  # was silent
    study = optuna.load_study(study_name="grid", storage=url)
    rates = {t.params["freeze_depth"]: t.params["learning_rate"] for t in study.get_trials()}
    assert rates == {0: 3e-3, 2: 1e-2}
    assert study.user_attrs["grid"]["lr_by_depth"] == {"0": 3e-3, "2": 1e-2}
    # The file `python -m ablations.lr_choice` prints names the same runs: nothing is trained again.
    (tmp_path / "lr.txt").write_text("# depth learning_rate mean_validation_accuracy runs\n0 0.003 0.7 1\n"
                                     "2 0.01 0.8 1\n")
    from_file = ["--freeze-depths", "0,2", "--schedulers", "linear", "--lr-by-depth", str(tmp_path / "lr.txt")]
    assert "0 trained now" in finish(start(grid_command(tiny_bert, toy_data, tmp_path, url, *from_file)))


@pytest.mark.parametrize("extra, expected", [
    (["--lr-by-depth", "0=3e-3"], "--lr-by-depth gives no learning rate for freeze depth 1: add 1=RATE"),
    (["--lr-by-depth", "0=3e-3,1=fast"], "--lr-by-depth '0=3e-3,1=fast' is invalid: use DEPTH=RATE pairs"),
    (["--lr-by-depth", "0=3e-3,1=2"], "is invalid: give at least one depth (0 or more) with a rate in (0, 1)"),
    (["--lr-by-depth", "lr.txt"], "--lr-by-depth 'lr.txt' is neither a file nor DEPTH=RATE pairs"),
    # These three ended in a traceback: FileExistsError, torch's "not compiled with CUDA", SQLAlchemy's parse error.
    (["--output-dir", "{file}"], "--output-dir '{file}' is a file: give a folder"),
    (["--device", "cuda:99"], "--device 'cuda:99': "),
    (["--storage", "ledger.db"], "--storage 'ledger.db' is not a storage URL: for a SQLite file give "
                                 "sqlite:///ledger.db"),
    (["--seeds", "0"], "--seeds 0 is invalid: use a whole number of at least 1"),
    (["--epochs", "0,1"], "--epochs '0,1' is out of range: use values of at least 1"),  # was "from at least 1"
])
def test_bad_input_ends_the_grid_with_one_line(extra, expected, tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    from ablations.grid import main
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    extra, expected = [e.format(file=file) for e in extra], expected.format(file=file)
    argv = grid_command(tiny_bert, toy_data, tmp_path, None, "--freeze-depths", "0,1", *extra)
    code = run_command(monkeypatch, main, "python -m ablations.grid", *argv[3:])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "ablations.db").exists()   # checked before any storage is opened


@pytest.mark.parametrize("extra, expected", [
    (["--freeze-depths", "0-5"], "--freeze-depths '0-5' is out of range"),
    (["--freeze-depths", "0,1", "--lr-by-depth", "0=3e-3"], "gives no learning rate for freeze depth 1"),
])
@pytest.mark.parametrize("output_dir", [None, "new/out"])
def test_a_grid_refused_after_the_model_loads_leaves_no_new_folder(extra, expected, output_dir, tiny_bert, toy_data,
                                                                   tmp_path, monkeypatch, capsys):
    """Refusals that need the model's layer count come after the output folder is checked (and so made): they left
    an empty runs/grid/ (or --output-dir) behind."""
    from ablations.grid import main
    monkeypatch.chdir(tmp_path)
    where = ["--output-dir", output_dir] if output_dir else []
    code = run_command(monkeypatch, main, "python -m ablations.grid", "--model", tiny_bert, "--dataset", toy_data,
                       "--no-progress", *where, *extra)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs").mkdir()  # a folder that was there before is kept
    assert run_command(monkeypatch, main, "python -m ablations.grid", "--model", tiny_bert, "--dataset", toy_data,
                       "--no-progress", *extra) == 2
    assert [p.name for p in tmp_path.rglob("*")] == ["runs"]


def test_a_sitting_of_one_round_says_round(tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    """--timing-repeats 1 printed "(1 rounds of ... steps each)"."""
    from ablations.grid import main
    argv = grid_command(tiny_bert, toy_data, tmp_path, None, "--freeze-depths", "0,1", "--schedulers", "linear",
                        "--timing-repeats", "1")
    assert run_command(monkeypatch, main, "python -m ablations.grid", *argv[3:]) == 0
    out = capsys.readouterr().out
    assert "timing 2 work shape(s) together" in out and "(1 round of " in out and "1 rounds" not in out, out


def test_a_failed_cell_is_recorded_the_grid_goes_on_and_a_rerun_retries_it(tiny_bert, toy_data, tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/grid.db", heartbeat_seconds=1)
    study, ledger = open_study(storage, "grid"), Ledger(storage)
    configs = Grid((0, 1), ("linear",), (1,), (0,)).configs(quick_config(tiny_bert, toy_data))
    broken = configs[0].run_id

    def flaky(config, siblings):
        if config.run_id == broken:
            raise FloatingPointError("training loss became nan in epoch 1")
        return run(config, progress=False).to_dict()

    outcome = run_cells(configs, study, ledger, flaky, retries=1, progress=False)
    assert list(outcome.failed) == [broken] and len(outcome.trained) == 1
    failed = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
    assert [t.user_attrs["fail_reason"] for t in failed] == ["FloatingPointError: training loss became nan in epoch 1"]

    outcome = run_cells(configs, study, ledger, flaky, retries=1, progress=False)   # retry 1 of 1: fails again
    assert list(outcome.failed) == [broken] and outcome.trained == []
    outcome = run_cells(configs, study, ledger, flaky, retries=1, progress=False)   # out of retries: given up
    assert outcome.given_up == [broken] and outcome.failed == {}
    outcome = run_cells(configs, study, ledger, lambda c, _: run(c, progress=False).to_dict(), retries=3,
                        progress=False)
    assert outcome.trained == [broken]
    assert trained_per_run(storage.url if hasattr(storage, "url") else f"sqlite:///{tmp_path}/grid.db")[broken] == 1


def test_a_grid_whose_every_run_failed_writes_runs_csv_and_exits_1(tiny_bert, toy_data, tmp_path, monkeypatch,
                                                                    capsys):
    """README: a failed run is recorded with its reason, and the grid writes runs.csv and the report. With no run
    complete it ended on the report's "error: no completed runs to report", exit code 2, as if the flags were
    wrong; a grid with some runs failed exits 1."""
    import ablations.grid

    def nan(config, siblings=None):
        raise FloatingPointError("training loss became nan in epoch 1")
    monkeypatch.setattr(ablations.grid, "make_trainers", lambda *args: (nan, None))
    argv = grid_command(tiny_bert, toy_data, tmp_path, None, "--freeze-depths", "1", "--schedulers", "linear",
                        "--timing-repeats", "0")
    code = run_command(monkeypatch, ablations.grid.main, "python -m ablations.grid",
                       *[a for a in argv[3:] if a != "--no-report"])
    out = capsys.readouterr().out
    assert code == 1 and "training loss became nan" in out
    assert "trade-off tables skipped: no completed runs to report" in out and (tmp_path / "runs.csv").exists()


@pytest.mark.parametrize("parallel", [1, 2])  # 2: the linear and cosine cells of a depth train as one stacked group
def test_kill_9_mid_grid_then_the_same_command_finishes_every_cell_once(tiny_bert, tmp_path, parallel):
    data = str(write_toy_dataset(tmp_path / "data", train=3000, validation=64))  # cells slow enough to interrupt
    url = f"sqlite:///{tmp_path}/grid.db"
    command = grid_command(tiny_bert, data, tmp_path, url, "--max-parallel-runs", str(parallel))
    process = start(command)
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name="grid", storage=url).get_trials()
        except KeyError:
            continue
        states = collections.Counter(t.state.name for t in trials)
        if states["COMPLETE"] >= 1 and states["RUNNING"] >= 1:
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 1 <= len(trained_per_run(url)) < 6
    finish(start(command))
    counts = trained_per_run(url)
    assert len(counts) == 6 and set(counts.values()) == {1}
    killed = [t for t in optuna.load_study(study_name="grid", storage=url).get_trials()
              if t.state == optuna.trial.TrialState.FAIL]
    # every run of the group it was training (fewer where the kill fell between two claims of a group: ms apart)
    assert 1 <= len(killed) <= parallel and {fail_kind(t) for t in killed} == {"stale"}
    engines = {t.user_attrs["record"]["engine"] for t in optuna.load_study(study_name="grid", storage=url).get_trials()
               if t.state == optuna.trial.TrialState.COMPLETE}
    assert engines == {"eager" if parallel == 1 else f"stacked ({parallel} runs)"}


def run_workers(model, data, tmp_path, url, workers: int) -> None:
    # A heartbeat slow enough that a worker starved of CPU on a loaded test machine is not taken for dead.
    processes = [start(grid_command(model, data, tmp_path / f"w{i}", url, heartbeat=3)) for i in range(workers)]
    outputs = [finish(p) for p in processes]
    counts = trained_per_run(url)
    assert len(counts) == 6 and set(counts.values()) == {1}, outputs
    trained_now = sum(int(o.split(" trained now")[0].rsplit(" ", 1)[-1]) for o in outputs)
    assert trained_now == 6


def test_two_processes_on_sqlite_split_the_cells(tiny_bert, toy_data, tmp_path):
    run_workers(tiny_bert, toy_data, tmp_path, f"sqlite:///{tmp_path}/grid.db", workers=2)


@pytest.fixture
def postgres_url():
    with fresh_postgres_database("grid") as url:
        yield url


@pytest.mark.postgres
def test_three_workers_on_postgresql_train_every_cell_exactly_once(tiny_bert, toy_data, tmp_path, postgres_url):
    run_workers(tiny_bert, toy_data, tmp_path, postgres_url, workers=3)


def test_workers_with_their_own_sqlite_files_merge_into_one_storage(tiny_bert, toy_data, tmp_path):
    """Workers that cannot share a database each write a file; merged, the grid is complete and a rerun on the
    merged storage trains nothing; merging again copies nothing."""
    workers = [start(grid_command(tiny_bert, toy_data, tmp_path, f"sqlite:///{tmp_path}/w{depth}.db",
                                  "--freeze-depths", str(depth))) for depth in (0, 1, 2)]
    for worker in workers:
        assert "2 trained now" in finish(worker)
    merged = tmp_path / "merged.db"
    command = [sys.executable, "-m", "ablations.merge", *(str(tmp_path / f"w{d}.db") for d in (0, 1, 2)),
               "--into", str(merged)]
    assert "6 run(s) copied into study 'grid'" in finish(start(command))
    assert "0 run(s) copied" in finish(start(command))
    counts = trained_per_run(f"sqlite:///{merged}")
    assert len(counts) == 6 and set(counts.values()) == {1}
    assert "0 trained now" in finish(start(grid_command(tiny_bert, toy_data, tmp_path, f"sqlite:///{merged}")))
    missing = subprocess.run([*command[:3], str(tmp_path / "nope.db"), "--into", str(merged)], cwd=ROOT,
                             capture_output=True, text=True)
    expected = f"error: storage file '{tmp_path}/nope.db' does not exist"
    assert missing.returncode == 2 and missing.stderr.strip() == expected


def test_a_grid_into_a_search_study_is_refused_and_leaves_the_search_able_to_go_on(tiny_bert, toy_data, tmp_path,
                                                                                  monkeypatch, capsys):
    """The search refuses a grid's study in one line; the grid took a search's study, trained into it and marked it
    a grid, after which the search refused its own study ('holds a grid, not a search'). Now the grid refuses it,
    exit 2, nothing trained, the study as it was."""
    from ablations.grid import main
    url = f"sqlite:///{tmp_path}/x.db"
    study = optuna.create_study(study_name="search", storage=url, directions=["maximize", "minimize"])
    study.set_user_attr("search", {"space": {}, "fixed": {}})
    code = run_command(monkeypatch, main, "python -m ablations.grid", "--model", tiny_bert, "--dataset", toy_data,
                       "--freeze-depths", "1", "--schedulers", "linear", "--epochs", "1", "--storage", url,
                       "--study-name", "search", "--output-dir", str(tmp_path / "out"), "--no-progress")
    said = capsys.readouterr()
    assert code == 2 and "study 'search' holds a search, not a grid" in said.err + said.out
    assert "Traceback" not in said.err
    study = optuna.load_study(study_name="search", storage=url)
    assert "grid" not in study.user_attrs and not study.trials


def test_a_study_of_one_dataset_refuses_a_grid_of_another_but_takes_a_copy_of_its_own(tiny_bert, toy_data, tmp_path,
                                                                                        monkeypatch, capsys):
    """The default --study-name is the same for every dataset: a grid on other data trained into the study of the
    first, and its report put both datasets' accuracies on one Pareto front."""
    import shutil

    from ablations.grid import main
    copy = shutil.copytree(toy_data, tmp_path / "copy")  # another folder, the same rows: the same runs
    other = write_toy_dataset(tmp_path / "other", train=80)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"

    def grid(data: str) -> int:
        argv = grid_command(tiny_bert, str(data), tmp_path / "out", url, "--freeze-depths", "1",
                            "--schedulers", "linear", "--timing-repeats", "1")
        return run_command(monkeypatch, main, "python -m ablations.grid", *argv[3:])

    assert grid(toy_data) == 0 and grid(copy) == 0
    capsys.readouterr()
    assert grid(other) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"study 'grid' holds runs of other data ('{toy_data}'" in err, err
    trials = optuna.load_study(study_name="grid", storage=url).get_trials()
    assert len(trials) == 1 and trials[0].user_attrs["record"]["config"]["dataset"] == toy_data
