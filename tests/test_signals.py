"""SIGTERM (`kill`, `timeout`, a batch scheduler's cancel, `docker stop`) ends a command as Ctrl-C does: one line,
the claimed runs recorded as interrupted, and the same command run again at once finishes every cell once."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from conftest import write_toy_dataset

from ablations.storage import fail_kind

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def test_sigterm_ends_a_command_with_one_line_and_exit_code_143():
    # A command's main that is terminated while it works: the default action killed it without a word (exit -15).
    program = ("import os, signal, time\nfrom core.cli import main_guard\n"
               "def main():\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\nmain_guard(main)\n")
    done = subprocess.run([sys.executable, "-c", program], env=ENV, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr, done.stdout) == (128 + signal.SIGTERM, "terminated\n", "")


def test_the_line_saying_why_a_command_stopped_is_last_and_not_glued_to_a_progress_bar(capsys):
    # It was printed after the bar's last frame on the same line ("…seed 42]interrupted"), and the bar was drawn
    # again after it when it was closed.
    import pytest
    from tqdm.auto import tqdm

    from core.cli import main_guard

    def main():  # the search's bar of trials, and a run's bar of steps below it
        bars = [tqdm(total=2, unit="trial", desc="search search"),
                tqdm(total=10, unit="step", desc="freeze 0 · linear · seed 42", leave=False)]
        for bar in bars:
            bar.update(1)
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_:
        main_guard(main)
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and err.endswith("interrupted\n"), repr(err[-300:])
    # What the terminal's last line held when it was written: nothing (a bar cleared, or a fresh line), and the
    # cursor not moved back up onto the search's bar ("\x1b[A").
    before = err[: -len("interrupted\n")].rsplit("\n", 1)[-1]
    assert before.rsplit("\r", 1)[-1] == "" and "\x1b[A" not in before, repr(err[-300:])


def grid(model: str, data: str, url: str, out: Path) -> list[str]:
    # A heartbeat of 60 s: a claim left RUNNING by a dead worker would hold its cell for 3 minutes.
    return [sys.executable, "-m", "ablations.grid", "--model", model, "--dataset", data, "--freeze-depths", "0-2",
            "--schedulers", "linear", "--epochs", "1", "--learning-rate", "3e-3", "--precision", "fp32",
            "--max-length", "32", "--output-dir", str(out), "--no-progress", "--no-report", "--heartbeat", "60",
            "--timing-repeats", "1", "--storage", url]


def trials(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="grid", storage=url).get_trials()
    except KeyError:  # the study is not created yet
        return []


def test_sigterm_mid_grid_records_the_run_interrupted_and_the_same_command_finishes_every_cell_once(tiny_bert,
                                                                                                   tmp_path):
    data = str(write_toy_dataset(tmp_path / "data", train=3000, validation=64))  # cells slow enough to interrupt
    url = f"sqlite:///{tmp_path}/grid.db"
    command = grid(tiny_bert, data, url, tmp_path)
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not any(t.state.name == "RUNNING" for t in trials(url)):
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and err.splitlines()[-1] == "terminated", err[-2000:]
    stopped = [t for t in trials(url) if t.state.name != "COMPLETE"]
    assert [(t.state.name, fail_kind(t)) for t in stopped] == [("FAIL", "interrupted")]  # not left RUNNING

    started = time.time()  # at once: the interrupted cell is not held until its heartbeats go stale
    again = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert time.time() - started < 180
    completed = collections.Counter(t.user_attrs["run_id"] for t in trials(url) if t.state.name == "COMPLETE")
    assert len(completed) == 3 and set(completed.values()) == {1}
