"""The two-objective search: it extends one study, replays a seed, reuses stored runs, prunes dominated trials,
keeps failures, writes a front with no dominated point, and refuses bad input in one line."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import fresh_postgres_database, quick_config, run_command, save_tiny
from optuna.trial import TrialState

from ablations.cells import run_cells
from ablations.optuna_search import main, open_search_study
from ablations.pareto import SEARCHED, run_rows, write_outputs
from ablations.space import Grid, SearchSpace
from ablations.ledger import Ledger
from ablations.storage import open_storage
from ablations.trials import Search
from core import UsageError, run

ROOT = Path(__file__).resolve().parents[1]
SMALL = SearchSpace(freeze_depth=(0, 2), epochs=(1, 2), learning_rate=(1e-3, 5e-3))


def fake_train(config, on_epoch=None, calls: list | None = None) -> dict:
    """A stand-in for core.run with known numbers: freezing deeper is faster and a little less accurate."""
    if calls is not None:
        calls.append(config)
    history, stopped = [], None
    for epoch in range(1, config.epochs + 1):
        accuracy = 0.9 - 0.1 * config.freeze_depth + 0.02 * epoch + config.learning_rate + config.warmup_ratio / 100
        history.append({"epoch": epoch, "accuracy": round(accuracy, 6), "train_seconds": 3.0 - config.freeze_depth})
        if on_epoch is not None and (stopped := on_epoch(history[-1])):
            break
    return {"run_id": config.run_id, "config": config.to_dict(), "accuracy": max(e["accuracy"] for e in history),
            "train_seconds": sum(e["train_seconds"] for e in history), "trainable_params": 100 - config.freeze_depth,
            "stopped_early": stopped, "history": history, "device": "fake"}


def searcher(tmp_path, name="search", space=SMALL, train=fake_train, objective="pareto", base=None,
             **settings) -> Search:
    storage = open_storage(f"sqlite:///{tmp_path}/search.db", heartbeat_seconds=1)
    base = base or quick_config(str(tmp_path / "model"), str(tmp_path / "data"))
    study = open_search_study(storage, name, objective, space, base)
    return Search(study, Ledger(storage), base, space, train, poll_seconds=0.2, **settings)


def run_cli(monkeypatch, *arguments: str) -> int:
    """`python -m ablations.optuna_search ARGS` in this process: the exit code, output left to capsys."""
    return run_command(monkeypatch, main, "python -m ablations.optuna_search", *arguments)


def test_print_space_prints_the_space_resolved_against_the_model(monkeypatch, capsys, tiny_bert):
    assert run_cli(monkeypatch, "--model", tiny_bert, "--epochs-range", "1-2", "--print-space") == 0
    space = SearchSpace.from_dict(__import__("json").loads(capsys.readouterr().out))
    assert space == SearchSpace(freeze_depth=(0, 2), epochs=(1, 2))  # 0 to the tiny BERT's 2 layers


@pytest.mark.parametrize("arguments, message", [
    (["--sampler", "bogus"], "argument --sampler: invalid choice: 'bogus'"),
    (["--trials", "0"], "--trials 0 is invalid"),
    (["--freeze-depths", "0-5"], "search space freeze_depth [0, 5] is invalid: use a range within 0 to 2"),
    # A reversed range was refused with no word of what was wrong with it.
    (["--freeze-depths", "2-1"], "search space freeze_depth [2, 1] is invalid: use a range within 0 to the model's "
                                 "layer count, low first"),
    (["--lr-range", "1e-3,1e-5"], "search space learning_rate [0.001, 1e-05] is invalid: use positive bounds, low "
                                  "first"),
    (["--lr-range", "fast"], "--lr-range 'fast' is invalid"),
    # An empty value (an unset shell variable) searched the whole range without a word.
    (["--freeze-depths", ""], "--freeze-depths '' is invalid"),
    (["--schedulers", ""], "--schedulers is empty"),
    (["--objective", "loss"], "argument --objective: invalid choice: 'loss'"),
    (["--max-parallel-runs", "0"], "--max-parallel-runs '0' is invalid: use auto or a whole number of at least 1"),
])
def test_bad_input_is_one_line_and_exit_code_2(monkeypatch, capsys, tmp_path, tiny_bert, toy_data, arguments,
                                                 message):
    assert run_cli(monkeypatch, "--model", tiny_bert, "--dataset", toy_data, "--output-dir", str(tmp_path),
                   *arguments) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "ablations.db").exists()  # refused before the ledger is opened: no study is made


@pytest.mark.parametrize("output_dir", [None, "new/out"])
def test_a_search_refused_after_its_folder_is_checked_leaves_no_new_folder(monkeypatch, capsys, tmp_path, tiny_bert,
                                                                           toy_data, output_dir):
    """--max-length beyond the model's position table is refused by the pre-flight, after the output folder was
    checked (and so made): it left an empty runs/search/ (or --output-dir) behind."""
    monkeypatch.chdir(tmp_path)
    where = ["--output-dir", output_dir] if output_dir else []
    assert run_cli(monkeypatch, "--model", tiny_bert, "--dataset", toy_data, "--max-length", "999", *where) == 2
    error = capsys.readouterr().err
    assert "--max-length 999" in error and error.count("\n") == 1, error
    assert list(tmp_path.iterdir()) == []


def test_n_trials_then_n_more_extend_one_study(tiny_bert, toy_data, tmp_path):
    command = [sys.executable, "-m", "ablations.optuna_search", "--model", tiny_bert, "--dataset", toy_data,
               "--freeze-depths", "0-2", "--epochs-range", "1-2", "--lr-range", "1e-3,5e-3", "--max-length", "32",
               "--precision", "fp32", "--trials", "2", "--output-dir", str(tmp_path), "--no-progress", "--no-report"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    storage = f"sqlite:///{tmp_path}/ablations.db"
    contended = []
    for _ in range(2):
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        timings = [t.user_attrs["record"]["timing"] for t in optuna.load_study(study_name="search", storage=storage)
                   .get_trials() if "record" in t.user_attrs]
        contended.append(any(t["contended"] for t in timings))
    trials = optuna.load_study(study_name="search", storage=storage).get_trials()
    assert len(trials) == 4 and all(set(t.params) == set(SEARCHED) for t in trials)
    # The first invocation timed all 3 depths of the space in one sitting; the second found them timed. A sitting
    # taken under load (a busy test machine) is not kept, by design: the second invocation then times all 3 again.
    timings = [t.user_attrs["record"]["timing"] for t in trials if "record" in t.user_attrs]
    assert timings and {t["sitting"] for t in timings} == {3}
    assert len({t["measured_at"] for t in timings}) == (2 if contended[0] else 1)
    assert "search 'search': 2 trial(s) added, 4 in the study now" in done.stdout  # not "2 trial(s) now"
    assert "4 trials in study `search`" in (tmp_path / "search_summary.md").read_text()
    assert (tmp_path / "pareto.csv").exists()


def test_the_same_seed_proposes_the_same_configs_on_a_fresh_study(tmp_path):
    proposed = {}
    for folder, name, seed in [("a", "search", 7), ("b", "search", 7), ("c", "search", 8), ("d", "other", 7)]:
        (tmp_path / folder).mkdir()
        search = searcher(tmp_path / folder, name, seed=seed)
        search.run(3, progress=False)
        proposed[folder] = [t.params for t in search.study.get_trials()]
    assert proposed["a"] == proposed["b"]  # the same command on a fresh storage
    assert proposed["c"] != proposed["a"] and proposed["d"] != proposed["a"]  # another seed, another study


def test_trials_asked_together_train_as_groups_of_one_work_shape_each_with_its_own_record(tmp_path):
    """--max-parallel-runs 4: four trials asked at once; those of one freeze depth go to train_group together (a
    lone one to train), each trial still completes with its own record, and a run that fails fails its trial alone."""
    groups, alone, failing = [], [], set()

    def train_group(configs, stoppers):
        groups.append([c.learning_rate for c in configs])
        assert len(stoppers) == len(configs) and len({c.freeze_depth for c in configs}) == 1
        failing.add(configs[-1].run_id)
        return [fake_train(c, stop) for c, stop in zip(configs[:-1], stoppers)] + [RuntimeError("loss became nan")]

    search = searcher(tmp_path, space=SearchSpace(freeze_depth=(0, 1), epochs=(1, 2), learning_rate=(1e-3, 5e-3)),
                      train=lambda c, on_epoch: alone.append(c.learning_rate) or fake_train(c, on_epoch),
                      prune=False, train_group=train_group, max_parallel=4)
    search.run(10, progress=False)  # batches of 4, 4 and 2 trials
    trials = search.study.get_trials()
    assert len(trials) == 10 and sum(search.counts.values()) == 10
    expected = [same for batch in (trials[0:4], trials[4:8], trials[8:10]) for depth in (0, 1)
                if (same := [t.params["learning_rate"] for t in batch if t.params["freeze_depth"] == depth])]
    assert sorted(groups + [[rate] for rate in alone]) == sorted(expected)  # per batch, one call per depth
    assert any(len(g) > 1 for g in groups), "no two trials of a batch shared a depth: the test proves nothing"
    for trial in trials:
        if trial.user_attrs["run_id"] in failing:
            assert trial.state == TrialState.FAIL and "loss became nan" in trial.user_attrs["fail_reason"]
        else:
            assert trial.state == TrialState.COMPLETE
            assert trial.user_attrs["record"]["config"]["learning_rate"] == trial.params["learning_rate"]
    assert search.counts["failed"] == len(groups) == len(failing)


def test_a_batched_search_proposes_and_records_what_one_trial_at_a_time_does(tmp_path, monkeypatch, toy_data):
    """Through the command on a tiny dropout-free model: --max-parallel-runs 3 asks 3 trials at once and trains
    them as one stacked group (one freeze depth in the space); the sampler proposes the same configs as one at a
    time (its first trials are seeded draws) and every record equals the one-at-a-time record."""
    model = str(save_tiny(tmp_path / "model", "bert", layers=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0))
    records = {}
    for parallel in ("1", "3"):
        out = tmp_path / parallel
        assert run_cli(monkeypatch, "--model", model, "--dataset", toy_data, "--freeze-depths", "1-1",
                       "--epochs-range", "1-2", "--lr-range", "1e-3,5e-3", "--max-length", "32", "--precision",
                       "fp32", "--trials", "3", "--no-prune", "--timing-repeats", "0", "--max-parallel-runs",
                       parallel, "--output-dir", str(out), "--no-progress", "--no-report") == 0
        trials = optuna.load_study(study_name="search", storage=f"sqlite:///{out}/ablations.db").get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
        records[parallel] = [t.user_attrs["record"] for t in trials]
    for alone, together in zip(records["1"], records["3"]):
        assert together["config"] == alone["config"]
        assert alone["engine"] == "eager" and together["engine"] == "stacked (3 runs)"
        assert together["validation_predictions"] == alone["validation_predictions"]
        assert (together["accuracy"], together["best_epoch"]) == (alone["accuracy"], alone["best_epoch"])
        assert together["loss"] == pytest.approx(alone["loss"], rel=1e-4)


def test_kill_9_mid_batch_leaves_every_asked_trial_stale_and_the_next_search_fails_them(tiny_bert, tmp_path):
    """A worker killed while a batch of 3 trials trains as one group: the next invocation of the same command
    fails all 3 as stale (none is left RUNNING to skew the sampler and the report) and trains a batch of its own."""
    import collections
    import signal
    import time

    from ablations.storage import fail_kind
    from conftest import write_toy_dataset
    data = str(write_toy_dataset(tmp_path / "data", train=3000, validation=64))  # a group slow enough to interrupt
    url = f"sqlite:///{tmp_path}/search.db"
    command = [sys.executable, "-m", "ablations.optuna_search", "--model", tiny_bert, "--dataset", data,
               "--freeze-depths", "1-1", "--epochs-range", "2-2", "--max-length", "32", "--precision", "fp32",
               "--max-parallel-runs", "3", "--no-prune", "--timing-repeats", "0", "--heartbeat", "1",
               "--storage", url, "--output-dir", str(tmp_path), "--no-progress", "--no-report"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([*command, "--trials", "6"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline, states = time.time() + 240, collections.Counter()
    while time.time() < deadline and states["RUNNING"] < 3:
        time.sleep(0.5)
        try:
            states = collections.Counter(t.state.name for t in optuna.load_study(study_name="search",
                                                                              storage=url).get_trials())
        except KeyError:
            continue
    assert states == {"RUNNING": 3}, states
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = subprocess.run([*command, "--trials", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = optuna.load_study(study_name="search", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE] * 3
    assert [fail_kind(t) for t in trials[:3]] == ["stale"] * 3
    assert {t.user_attrs["record"]["engine"] for t in trials[3:]} == {"stacked (3 runs)"}


def test_a_config_the_grid_ran_is_answered_from_its_record_without_training(tiny_bert, toy_data, tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/search.db", heartbeat_seconds=1)
    base = quick_config(tiny_bert, toy_data)
    grid = optuna.create_study(storage=storage, study_name="grid", directions=["maximize", "minimize"])
    run_cells(Grid((1,), ("linear",), (1,), (0,)).configs(base), grid, Ledger(storage),
              lambda c, _: run(c, progress=False).to_dict(), progress=False)
    only = SearchSpace(freeze_depth=(1, 1), schedulers=("linear",), epochs=(1, 1), learning_rate=(1e-3, 1e-3),
                       warmup_ratio=(0.0, 0.0))  # one point: the grid's cell
    calls: list = []
    search = Search(open_search_study(storage, "search", "pareto", only, base), Ledger(storage), base, only,
                    lambda config, on_epoch: fake_train(config, on_epoch, calls))
    search.run(2, progress=False)
    assert calls == [] and search.counts["reused"] == 2
    stored = grid.get_trials()[0]
    for trial in search.study.get_trials():
        assert trial.state == TrialState.COMPLETE and trial.user_attrs["reused_from"] == "grid#0"
        assert trial.values == stored.values and trial.user_attrs["run_id"] == stored.user_attrs["run_id"]


def test_a_trial_dominated_by_the_front_is_pruned_with_its_reason(tiny_bert, toy_data, tmp_path):
    space = SearchSpace(freeze_depth=(0, 0), epochs=(2, 2))
    search = searcher(tmp_path, space=space,
                      train=lambda c, on_epoch: run(c, progress=False, on_epoch=on_epoch).to_dict(),
                      base=quick_config(tiny_bert, toy_data))
    search.study.add_trial(optuna.trial.create_trial(values=[1.0, 1e-6]))  # perfect and instant: dominates all
    search.run(1, progress=False)
    trial = search.study.get_trials()[-1]
    assert trial.state == TrialState.PRUNED and search.counts["pruned"] == 1
    assert trial.user_attrs["fail_reason"].startswith("dominated after epoch 1: best accuracy")
    assert "search#0 (1.0000 in 0.00 s)" in trial.user_attrs["fail_reason"]
    record = trial.user_attrs["record"]
    assert record["stopped_early"] == trial.user_attrs["fail_reason"] and len(record["history"]) == 1
    assert trial.user_attrs["run_id"] not in search.ledger.scan()  # a pruned run is not done: it may train again


def test_the_stored_runs_a_trial_is_pruned_against_are_read_once_each(tmp_path, monkeypatch):
    """Each trial asks for the storage's other runs; only those completed since the last time are read again."""
    from ablations.pareto import fixed_fields, storage_points

    grid_space = SearchSpace(freeze_depth=(0, 2), schedulers=("linear",), epochs=(1, 1))
    grid = searcher(tmp_path, "grid", space=grid_space, sampler="random", prune=False)
    grid.run(4, progress=False)
    search = searcher(tmp_path, space=grid_space)
    fixed = fixed_fields(search.base.to_dict())
    read = []
    storage = search.ledger.storage
    for name in ("get_trial", "get_all_trials"):
        def counted(*args, real=getattr(storage, name), **kwargs):
            trials = real(*args, **kwargs)
            read.extend(trials if isinstance(trials, list) else [trials])
            return trials
        monkeypatch.setattr(storage, name, counted)

    def points() -> list:
        return storage_points(search.ledger, "search", fixed, "fake")

    first = points()
    assert len(read) == 4 and {p.where for p in first} == {f"grid#{n}" for n in range(4)}
    assert points() == first and len(read) == 4   # nothing new: nothing read
    grid.run(1, progress=False)
    assert points() == storage_points(Ledger(open_storage(f"sqlite:///{tmp_path}/search.db")), "search", fixed,
                                      "fake") and len(read) == 5   # the one new run, read alone


def test_without_pruning_or_at_the_last_epoch_nothing_is_pruned(tmp_path):
    search = searcher(tmp_path, space=SearchSpace(freeze_depth=(0, 2), epochs=(1, 1)), prune=True)
    search.study.add_trial(optuna.trial.create_trial(values=[1.0, 1e-6]))
    search.run(2, progress=False)  # one-epoch runs: the only epoch is the last
    unpruned = searcher(tmp_path, "unpruned", space=SearchSpace(freeze_depth=(0, 2), epochs=(3, 3)), prune=False)
    unpruned.study.add_trial(optuna.trial.create_trial(values=[1.0, 1e-6]))
    unpruned.run(2, progress=False)
    for study in (search.study, unpruned.study):
        assert [t.state for t in study.get_trials()[1:]] == [TrialState.COMPLETE] * 2


def test_pareto_csv_holds_exactly_the_non_dominated_runs(tmp_path):
    search = searcher(tmp_path, sampler="random", prune=False)
    search.run(12, progress=False)
    write_outputs(search.study, search.ledger, search.base, "", tmp_path, report=False)
    front = pd.read_csv(tmp_path / "pareto.csv")
    runs = run_rows("search", search.study.get_trials())

    def dominated(row, table) -> bool:
        return any(o.accuracy >= row.accuracy and o.train_seconds <= row.train_seconds and
                   (o.accuracy > row.accuracy or o.train_seconds < row.train_seconds) for o in table.itertuples())

    assert not any(dominated(row, front) for row in front.itertuples())
    assert set(front.run_id) == {row.run_id for row in runs.itertuples() if not dominated(row, runs)}
    assert list(front.columns[:5]) == list(SEARCHED)
    summary = (tmp_path / "search_summary.md").read_text()
    assert "**Knee point**" in summary and "**Full fine-tune baseline**" in summary
    assert (tmp_path / "importance.png").exists()


def test_a_failing_run_is_recorded_as_fail_with_its_reason_and_the_search_goes_on(tmp_path):
    calls: list = []

    def flaky(config, on_epoch):
        if not calls:
            calls.append(config)
            raise FloatingPointError("training loss became nan in epoch 1")
        return fake_train(config, on_epoch, calls)

    search = searcher(tmp_path, train=flaky)
    search.run(3, progress=False)
    states = [t.state for t in search.study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    failed = search.study.get_trials()[0]
    assert failed.user_attrs["fail_reason"] == "FloatingPointError: training loss became nan in epoch 1"
    assert failed.user_attrs["fail_kind"] == "error"


def test_a_study_refuses_another_space_or_other_fixed_settings(tmp_path):
    search = searcher(tmp_path)
    search.run(1, progress=False)  # settings are pinned once a trial completed
    open_search_study(search.ledger.storage, "search", "pareto", SMALL, search.base)  # the same: extends
    with pytest.raises(UsageError, match="was created with the search space"):
        open_search_study(search.ledger.storage, "search", "pareto", SearchSpace(), search.base)
    with pytest.raises(UsageError, match="was created with batch_size=16, not 32"):
        open_search_study(search.ledger.storage, "search", "pareto", SMALL, search.base.replace(batch_size=32))
    with pytest.raises(UsageError, match="other objectives"):
        open_search_study(search.ledger.storage, "search", "accuracy", SMALL, search.base)


def test_a_study_takes_a_copy_of_its_data_folder_and_refuses_other_data(tmp_path, toy_data):
    """The run id hashes the data's rows, so a copied or moved data folder trains the same runs; the search refused
    it as other fixed settings (the grid takes it)."""
    import shutil

    from conftest import write_toy_dataset
    base = quick_config(str(tmp_path / "model"), toy_data)
    search = searcher(tmp_path, base=base)
    search.run(1, progress=False)
    copy = shutil.copytree(toy_data, tmp_path / "copy")
    open_search_study(search.ledger.storage, "search", "pareto", SMALL, base.replace(dataset=str(copy)))
    other = write_toy_dataset(tmp_path / "other", train=80)
    with pytest.raises(UsageError, match=f"was created with dataset='{toy_data}', not '{other}'"):
        open_search_study(search.ledger.storage, "search", "pareto", SMALL, base.replace(dataset=str(other)))


def test_a_study_takes_a_copy_of_its_model_folder_and_refuses_another_model(tmp_path, toy_data, tiny_bert):
    """As the run id hashes the model's files, a copied model folder is the same model; a model of other weights
    is not."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification
    base = quick_config(tiny_bert, toy_data)
    search = searcher(tmp_path, base=base)
    search.run(1, progress=False)
    copy = shutil.copytree(tiny_bert, tmp_path / "copied-model")
    open_search_study(search.ledger.storage, "search", "pareto", SMALL, base.replace(model=str(copy)))
    other = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(tmp_path / "other-model")
    for name in ("vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (Path(tiny_bert) / name).exists():
            shutil.copy(Path(tiny_bert) / name, tmp_path / "other-model" / name)
    with pytest.raises(UsageError, match=f"was created with model='{tiny_bert}', not '{tmp_path / 'other-model'}'"):
        open_search_study(search.ledger.storage, "search", "pareto", SMALL,
                          base.replace(model=str(tmp_path / "other-model")))


def test_a_search_on_copied_data_is_pruned_against_the_runs_stored_on_the_original(tmp_path, toy_data, tiny_bert):
    """Pruning compares a trial with the storage's other runs of the same fixed settings: a grid stored on the
    original data folder holds the same runs as a search on a copy of it (or of the model), and was left out when
    the settings were compared as path strings. Runs on other data stay out."""
    import shutil

    from ablations.pareto import fixed_fields, storage_points
    from conftest import write_toy_dataset
    grid = searcher(tmp_path, "grid", base=quick_config(tiny_bert, toy_data), prune=False)
    grid.run(2, progress=False)
    other = searcher(tmp_path, "other", base=quick_config(tiny_bert, str(write_toy_dataset(tmp_path / "o", 80))),
                     prune=False)
    other.run(1, progress=False)
    data = shutil.copytree(toy_data, tmp_path / "copied-data")
    model = shutil.copytree(tiny_bert, tmp_path / "copied-model")
    search = searcher(tmp_path, base=quick_config(str(model), str(data)))
    points = storage_points(search.ledger, "search", fixed_fields(search.base.to_dict()), "fake")
    assert sorted(p.where for p in points) == ["grid#0", "grid#1"]


def test_the_accuracy_objective_has_its_own_study_and_optunas_median_pruner(tmp_path):
    search = searcher(tmp_path, "search-accuracy", objective="accuracy")
    search.study.pruner = optuna.pruners.MedianPruner()
    for index in range(5):  # five good runs set the median, then a deep freeze falls below it
        search.study.enqueue_trial({"freeze_depth": 0, "scheduler": "linear", "epochs": 2,
                                    "learning_rate": 1e-3 + index * 1e-4, "warmup_ratio": 0.0})
    search.study.enqueue_trial({"freeze_depth": 2, "scheduler": "linear", "epochs": 2, "learning_rate": 1e-3,
                                "warmup_ratio": 0.0})
    search.run(6, progress=False)
    trials = search.study.get_trials()
    assert [d.name for d in search.study.directions] == ["MAXIMIZE"] and len(trials[0].values) == 1
    assert trials[0].intermediate_values == {1: 0.921, 2: 0.941}
    assert trials[-1].state == TrialState.PRUNED
    assert trials[-1].user_attrs["fail_reason"].startswith("pruned by MedianPruner after epoch 1")


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/search.db"
        return
    with fresh_postgres_database("search") as url:
        yield url


def test_two_workers_proposing_one_config_train_it_once(tmp_path, storage_url, monkeypatch):
    from ablations.storage import storage_url as resolve
    url = resolve(storage_url, tmp_path)
    only = SearchSpace(freeze_depth=(1, 1), schedulers=("linear",), epochs=(1, 1), learning_rate=(1e-3, 1e-3),
                       warmup_ratio=(0.0, 0.0))
    base, calls, started = quick_config("model", "data"), [], threading.Barrier(2)

    def slow_train(config, on_epoch):
        threading.Event().wait(1.5)  # long enough for the other worker to find the claim and wait on it
        return fake_train(config, on_epoch, calls)

    def worker(name: str) -> None:
        storage = open_storage(url, heartbeat_seconds=1)
        search = Search(open_search_study(storage, name, "pareto", only, base), Ledger(storage), base, only,
                        slow_train, poll_seconds=0.2)
        started.wait()
        search.run(1, progress=False)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(calls) == 1
    reused = [t.user_attrs.get("reused_from") for name in ("left", "right")
              for t in optuna.load_study(study_name=name, storage=url).get_trials()]
    assert sorted(map(bool, reused)) == [False, True]


def test_the_search_trains_through_the_captured_engine_as_it_would_eagerly(toy_data, tmp_path, monkeypatch,
                                                                            capsys):
    """--engine captured where capture works (the probe says yes; GraphOnTheCpu stands in for the CUDA graph):
    each trial is a captured group of one run, its per-epoch callback (pruning) still called, its record that
    of the same config trained eagerly."""
    import core.captured
    from conftest import GraphOnTheCpu, save_tiny

    from core import group
    # Without dropout: a stacked run draws its own dropout masks, equal to a solo run's only in distribution.
    model = str(save_tiny(tmp_path / "model", "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    monkeypatch.setattr(group, "probe_capture", lambda *args: (True, ""))
    monkeypatch.setattr(core.captured, "CapturedStep", GraphOnTheCpu)
    assert run_cli(monkeypatch, "--model", model, "--dataset", toy_data, "--freeze-depths", "0-1",
                   "--epochs-range", "1-2", "--lr-range", "3e-3,3e-3", "--max-length", "32", "--precision", "fp32",
                   "--trials", "2", "--engine", "captured", "--output-dir", str(tmp_path), "--no-progress",
                   "--no-report", "--timing-repeats", "0") == 0
    capsys.readouterr()
    trials = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path}/ablations.db").get_trials()
    records = [t.user_attrs["record"] for t in trials if t.state == TrialState.COMPLETE]
    assert records and all(r["engine"] == "captured (1 run)" for r in records)
    for record in records:
        from core.config import RunConfig
        alone = run(RunConfig.from_dict(record["config"]), progress=False).to_dict()
        assert record["validation_predictions"] == alone["validation_predictions"]
        assert record["history"][-1]["train_loss"] == pytest.approx(alone["history"][-1]["train_loss"], rel=1e-4)


def test_ctrl_c_while_a_batch_is_asked_fails_the_trials_asked_before_it(tmp_path):
    """A KeyboardInterrupt on the third ask of a batch of 4: the two trials asked already were left RUNNING (until a
    later search failed them as stale); they are failed as interrupted at once, and nothing was trained."""
    trained = []
    search = searcher(tmp_path, train=lambda c, on_epoch: trained.append(c) or fake_train(c, on_epoch),
                      train_group=lambda configs, stoppers: trained.extend(configs), max_parallel=4)
    ask, calls = search._ask, []

    def interrupted_third_ask():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ask()
    search._ask = interrupted_third_ask
    with pytest.raises(KeyboardInterrupt):
        search.run(4, progress=False)
    trials = search.study.get_trials()
    assert len(trials) == 2 and trained == []
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert {t.user_attrs["fail_reason"] for t in trials} == {"interrupted by the user"}


def test_the_search_says_it_chooses_on_validation_without_a_dev_split(monkeypatch, capsys, tiny_bert, toy_data,
                                                                      tmp_path):
    assert run_cli(monkeypatch, "--model", tiny_bert, "--dataset", toy_data, "--freeze-depths", "1-1",
                   "--epochs-range", "1-1", "--max-length", "32", "--trials", "1", "--dev-size", "0",
                   "--timing-repeats", "0", "--output-dir", str(tmp_path), "--no-progress", "--no-report") == 0
    printed = capsys.readouterr().out
    assert "objective pareto on validation accuracy," in printed and "dev accuracy" not in printed


def test_a_study_whose_trials_all_failed_refuses_other_schedulers_in_one_line(tmp_path):
    def failing(config, on_epoch):
        raise FloatingPointError("training loss became nan in epoch 1")

    search = searcher(tmp_path, train=failing)
    search.run(1, progress=False)
    wider = SearchSpace(freeze_depth=(0, 1), epochs=(1, 2), learning_rate=(1e-3, 5e-3))
    open_search_study(search.ledger.storage, "search", "pareto", wider, search.base)  # no trial completed: taken
    linear = SearchSpace(freeze_depth=(0, 2), schedulers=("linear",), epochs=(1, 2), learning_rate=(1e-3, 5e-3))
    with pytest.raises(UsageError, match="holds trials over the schedulers linear,cosine"):
        open_search_study(search.ledger.storage, "search", "pareto", linear, search.base)


def test_pruning_reads_each_run_time_from_the_study_stored_sitting_as_the_front_does(tmp_path):
    """A search continued after a new sitting (another machine, a lost timings file) reports every run's time from
    it: the points a trial is pruned against must be on that axis too, not the times the trials were told."""
    from ablations.pareto import fixed_fields, storage_points, study_points
    from ablations.stored_sitting import SITTING, sitting_key

    def timed_train(config, on_epoch=None):
        record = fake_train(config, on_epoch)
        return {**record, "train_samples": 64, "timing": {"steps": 8 * config.epochs, "measured_at": "then"}}

    space = SearchSpace(freeze_depth=(0, 0), schedulers=("linear",), epochs=(1, 1))
    grid = searcher(tmp_path, "grid", space=space, train=timed_train, prune=False)
    grid.run(1, progress=False)
    search = searcher(tmp_path, space=space, train=timed_train, prune=False)
    search.run(1, progress=False)
    key = sitting_key(search.base.to_dict(), "fake", 64)
    search.study.set_user_attr(SITTING, {"measured_at": "now", "rounds": 5, "evidence": "", "shapes": {key: {
        "per_step": 0.5, "per_step_low": 0.4, "per_step_high": 0.6, "prefix_seconds": 0.0, "repeat_seconds": []}}})
    front = run_rows("search", search.study.get_trials(), search.study.user_attrs)
    assert front["train_seconds"].tolist() == [4.0]  # 8 steps at 0.5 s, where the trial was told 3.0 s
    assert [p.seconds for p in study_points(search.study, "fake")] == [4.0]
    elsewhere = storage_points(search.ledger, "search", fixed_fields(search.base.to_dict()), "fake",
                               search.study.user_attrs[SITTING])
    assert [(p.where, p.seconds) for p in elsewhere] == [("grid#0", 4.0)]


@pytest.mark.parametrize("max_parallel", [1, 3])  # 3: the repeats wait in one batch on the trial that holds the run
def test_a_run_pruned_before_and_proposed_again_is_pruned_from_its_record_not_retrained(tmp_path, max_parallel):
    calls: list = []
    search = searcher(tmp_path, train=lambda config, on_epoch: fake_train(config, on_epoch, calls),
                      space=SearchSpace(freeze_depth=(0, 2), epochs=(2, 2), learning_rate=(1e-3, 5e-3)),
                      max_parallel=max_parallel, train_group=lambda configs, stoppers: [])
    search.study.add_trial(optuna.trial.create_trial(values=[2.0, 0.1]))  # dominates every run after one epoch
    for _ in range(3):  # a sampler repeating itself, as in a narrowed space
        search.study.enqueue_trial({"freeze_depth": 1, "scheduler": "linear", "epochs": 2, "learning_rate": 1e-3,
                                    "warmup_ratio": 0.0})
    search.run(3, progress=False)
    trials = search.study.get_trials()[1:]
    assert len(calls) == 1 and search.counts["pruned"] == 3 and search.train_seconds == 2.0
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    assert all("not trained again" in t.user_attrs["fail_reason"] for t in trials[1:])
    assert [len(t.user_attrs["record"]["history"]) for t in trials] == [1, 1, 1]
