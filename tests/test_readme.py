"""Every command in the README's bash blocks runs as written (with a tiny model and toy data as $MODEL/$DATA)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import save_tiny

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.replace("\\\n", " ").strip() for block in blocks]


def test_the_readme_has_runnable_commands():
    commands = readme_commands()
    assert any(c.startswith("python -m core") for c in commands)
    assert any(c.startswith("python -m ablations.grid") for c in commands)
    assert any(c.startswith("python -m ablations.optuna_search") for c in commands)


@pytest.fixture(scope="module")
def six_layer_bert(tmp_path_factory) -> str:
    """Six layers, like DistilBERT and MiniLM, so the README's depths (0, 3, 6) are valid."""
    return str(save_tiny(tmp_path_factory.mktemp("six-layer-bert"), "bert", layers=6))


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: " ".join(c.split()[:3]))
def test_readme_command_runs(command, six_layer_bert, toy_data, tmp_path_factory):
    workdir = tmp_path_factory.getbasetemp() / "readme"  # shared: the report reads what the grid stored
    workdir.mkdir(exist_ok=True)
    env = {**os.environ, "MODEL": six_layer_bert, "DATA": toy_data, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
