"""The README's bash blocks run as written, in the order a reader meets them (a tiny model and toy data as
$MODEL/$DATA, one working folder), and each leaves behind what the README says it does."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from conftest import save_tiny, write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.replace("\\\n", " ").strip() for block in blocks]


def flag(command: str, name: str) -> str | None:
    found = re.search(rf"{name}[ =](\S+)", command)
    return found.group(1) if found else None


def check(command: str, out: str, work: Path) -> None:
    """What the README promises of each kind of command, read back from what it wrote."""
    if command.startswith("python -m core"):
        record = json.loads((work / flag(command, "--output")).read_text())
        config = record["config"]
        assert (config["freeze_depth"], config["scheduler"], config["epochs"]) == (
            int(flag(command, "--freeze-depth")), flag(command, "--scheduler"), int(flag(command, "--epochs")))
        assert {"accuracy", "dev_accuracy", "train_seconds", "train_seconds_lo", "contended"} <= record.keys()
    elif command.startswith("python -m ablations.grid"):
        depths = len(flag(command, "--freeze-depths").split(","))
        schedulers = len(flag(command, "--schedulers").split(","))
        seeds = int(flag(command, "--seeds") or 1)
        rates = len((flag(command, "--learning-rates") or "x").split(","))
        # tuning trains each cell's first seed at every rate, then the other seeds at the chosen rate
        runs = depths * schedulers * (rates + seeds - 1)
        counts = re.search(r"(\d+) trained now .*?, (\d+) reused from other studies, 0 failed now", out)
        assert counts and int(counts.group(1)) + int(counts.group(2)) == runs, out[-2000:]  # reused: the ledger
        if "--no-report" not in command:
            folder = work / (flag(command, "--output-dir") or f"runs/{flag(command, '--study-name') or 'grid'}")
            import pandas as pd
            assert len(pd.read_csv(folder / "tradeoff.csv")) == depths * schedulers  # one row per configuration
            assert (folder / "lr_curves.png").exists() == ("--learning-rates" in command)
    elif command.startswith("python -m ablations.optuna_search"):
        summary = (work / "runs/search/search_summary.md").read_text()
        assert f"{flag(command, '--trials')} trials in study `search`" in summary
    elif command.startswith("python -m ablations.report"):
        table = (work / flag(command, "--output-dir") / "tradeoff.md").read_text()
        assert "| freeze depth |" in table and "Holm" in table


def test_the_readme_has_runnable_commands():
    commands = readme_commands()
    assert any(c.startswith("python -m core") for c in commands)
    assert any(c.startswith("python -m ablations.grid") for c in commands)
    assert any(c.startswith("python -m ablations.optuna_search") for c in commands)
    assert any(c.startswith("python -m ablations.report") for c in commands)


def test_readme_commands_run_in_order_and_leave_what_they_say(tmp_path):
    # Six layers, like DistilBERT and MiniLM, so the README's depths (0, 3, 6) are valid; enough toy rows for
    # the default dev split to leave training rows.
    model = str(save_tiny(tmp_path / "six-layer-bert", "bert", layers=6))
    data = str(write_toy_dataset(tmp_path / "data", train=160, validation=48))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "MODEL": model, "DATA": data, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "ABLATIONS_TIMING_DIR": str(tmp_path / "timing")}
    for command in readme_commands():
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        check(command, done.stdout, work)
