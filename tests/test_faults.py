"""Faults end in one line before anything is recorded: broken model folders, unwritable output paths, bad data
files, a full disk. Each test names a fault a fault-injection run found ending in a traceback or a silent run."""
from __future__ import annotations

import os

import optuna
import pytest
from conftest import run_command, save_tiny, write_toy_dataset

from core import Session, UsageError
from core import model as core_model
from core.cli import main_guard
from core.model import model_config


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model"), "bert", layers=2)


def copy_of(tiny_folder, tmp_path):
    import shutil
    return shutil.copytree(tiny_folder, tmp_path / "model")


# Model folders

def test_a_folder_without_weights_is_one_line(tiny_folder, tmp_path):
    folder = copy_of(tiny_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="has no weights"):
        model_config(str(folder))


@pytest.mark.parametrize("damage", ["zero-byte", "truncated", "random"])
def test_a_damaged_safetensors_file_is_one_line(tiny_folder, tmp_path, damage):
    folder = copy_of(tiny_folder, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"zero-byte": b"", "truncated": data[:len(data) // 2], "random": os.urandom(4096)}[damage])
    with pytest.raises(UsageError, match="is not a usable safetensors file"):
        model_config(str(folder))


@pytest.mark.parametrize("kind", ["vit", "whisper"])
def test_a_vision_or_speech_model_is_one_line(tiny_folder, tmp_path, kind):
    from transformers import ViTConfig, WhisperConfig
    folder = copy_of(tiny_folder, tmp_path)
    config = ViTConfig(num_hidden_layers=1) if kind == "vit" else WhisperConfig(encoder_layers=1, decoder_layers=1)
    config.save_pretrained(folder)
    with pytest.raises(UsageError, match=f"is a '{kind}' model, not a text encoder"):
        model_config(str(folder))


def test_a_folder_without_tokenizer_files_is_refused_not_run_with_five_tokens(tiny_folder, tmp_path):
    folder = copy_of(tiny_folder, tmp_path)
    for name in ("vocab.txt", "tokenizer.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(UsageError, match="has no tokenizer files"):
        model_config(str(folder))


def test_non_finite_weights_name_the_checkpoint_not_the_learning_rate(tmp_path):
    import torch
    from conftest import quick_config
    from transformers import AutoModelForSequenceClassification
    folder = save_tiny(tmp_path / "model", "bert", layers=2)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    data = write_toy_dataset(tmp_path / "data")
    with pytest.raises(UsageError, match=f"the checkpoint in '{folder}' holds NaN or infinite weights "
                                         r"\(bert.encoder.layer.0.attention.self.query.weight\)"):
        core_model.preflight(quick_config(str(folder), str(data)), Session())


# Output paths: checked before training, nothing trained

@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_core_output_is_checked_before_training(monkeypatch, capsys, tmp_path, tiny_bert, toy_data, where):
    import core.__main__ as command
    import core.train
    monkeypatch.setattr(core.train, "run", lambda *a, **k: pytest.fail("trained before checking --output"))
    (tmp_path / "file").write_text("x")
    output = str(tmp_path / "file" / "run.json") if where == "under a file" else str(tmp_path)
    assert run_command(monkeypatch, command.main, command.__name__, "--model", tiny_bert, "--dataset", toy_data,
                       "--output", output) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--output" in error


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_core_output_in_a_read_only_folder_is_checked_before_training(monkeypatch, capsys, tmp_path, tiny_bert,
                                                                      toy_data):
    import core.__main__ as command
    import core.train
    monkeypatch.setattr(core.train, "run", lambda *a, **k: pytest.fail("trained before checking --output"))
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o500)
    arguments = ("--model", tiny_bert, "--dataset", toy_data, "--output", str(tmp_path / "locked" / "run.json"))
    assert run_command(monkeypatch, command.main, command.__name__, *arguments) == 2
    assert "cannot be written" in capsys.readouterr().err


@pytest.mark.parametrize("module_name", ["ablations.grid", "ablations.optuna_search"])
def test_an_output_dir_under_a_file_stops_the_command_before_any_trial(monkeypatch, capsys, tmp_path, tiny_bert,
                                                                       toy_data, module_name):
    import importlib
    module = importlib.import_module(module_name)
    (tmp_path / "file").write_text("x")
    storage = f"sqlite:///{tmp_path}/ledger.db"
    code = run_command(monkeypatch, module.main, module.__name__, "--model", tiny_bert, "--dataset", toy_data,
                       "--storage", storage, "--output-dir", str(tmp_path / "file" / "out"), "--no-progress")
    assert code == 2 and "is under the file" in capsys.readouterr().err
    assert not (tmp_path / "ledger.db").exists()


# Retries spent on a data error: a bad file is stopped before any trial, so fixing it leaves nothing given up

def test_a_bad_data_file_records_no_trial_and_the_fixed_file_trains(monkeypatch, capsys, tmp_path, tiny_bert):
    import ablations.grid as grid
    data = write_toy_dataset(tmp_path / "data")
    good = (data / "train.tsv").read_text()
    (data / "train.tsv").write_text(good.replace("\tlabel\n", "\tlabel\tnote\n", 1).replace("\t1\n", "\t1\tx\t\n"))
    storage = f"sqlite:///{tmp_path}/ledger.db"
    arguments = ("--model", tiny_bert, "--dataset", str(data), "--storage", storage, "--output-dir",
                 str(tmp_path / "out"), "--freeze-depths", "0", "--schedulers", "linear", "--epochs", "1",
                 "--retries", "0", "--max-length", "32", "--precision", "fp32", "--no-progress", "--no-report")
    for _ in range(3):
        assert run_command(monkeypatch, grid.main, grid.__name__, *arguments) == 2
    assert not (tmp_path / "ledger.db").exists()  # nothing recorded, so nothing to count against the cell
    (data / "train.tsv").write_text(good)
    assert run_command(monkeypatch, grid.main, grid.__name__, *arguments) == 0
    assert "1 trained now" in capsys.readouterr().out


# A full disk: one line, exit 1, no traceback

def test_a_full_disk_while_writing_a_file_is_one_line(capsys):
    def write_record():
        with open("/dev/full", "w") as file:
            file.write("{}" * 10000)
    with pytest.raises(SystemExit) as exit_:
        main_guard(write_record)
    error = capsys.readouterr().err
    assert exit_.value.code == 1 and error.startswith("error: disk full:") and error.count("\n") == 1


def test_a_record_write_cut_short_leaves_the_record_that_was_there_whole(tmp_path, monkeypatch):
    # `python -m core` wrote run.json in place: a full disk (or Ctrl-C) mid-write left the earlier run's record
    # truncated to half a JSON document, and the new one nowhere.
    import json

    from conftest import disk_fills_halfway
    from core.record import write_record
    path = tmp_path / "run.json"
    path.write_text('{"run_id": "the run before"}\n')
    disk_fills_halfway(monkeypatch)
    with pytest.raises(OSError):
        write_record({"run_id": "this run", "history": list(range(100))}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"run_id": "the run before"}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no scratch file left beside it


def test_a_full_disk_while_saving_a_png_is_one_line(capsys):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save_plot():
        figure, axis = plt.subplots()
        axis.plot([0, 1], [0, 1])
        figure.savefig("/dev/full", format="png")
    with pytest.raises(SystemExit) as exit_:
        main_guard(save_plot)
    assert exit_.value.code == 1 and capsys.readouterr().err.startswith("error: disk full:")


def test_a_full_sqlite_ledger_is_one_line_whatever_optuna_calls_it(tmp_path, capsys):
    import sqlalchemy
    from optuna.storages import RDBStorage
    storage = RDBStorage(f"sqlite:///{tmp_path}/full.db")
    sqlalchemy.event.listen(storage.engine, "connect",
                            lambda connection, _: connection.execute("PRAGMA max_page_count = 40"))
    storage.engine.dispose()
    study = optuna.create_study(storage=storage, study_name="full")

    def fill():
        for _ in range(10000):
            trial = study.ask()
            trial.set_user_attr("record", "x" * 2000)
    with pytest.raises(SystemExit) as exit_:
        main_guard(fill)
    error = capsys.readouterr().err
    assert exit_.value.code == 1 and error.startswith("error: disk full:") and error.count("\n") == 1
