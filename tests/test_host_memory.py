"""Host memory on the CPU: a large tensor freed and allocated again is reused, not page-faulted in again."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from core.host_memory import reuse_freed_memory

PROBE = """
import json, resource, sys, torch
from core.host_memory import reuse_freed_memory
tuned = reuse_freed_memory()
for _ in range(8):  # 64 MB, above glibc's largest mmap threshold; the heap settles within ~7 under load
    torch.ones(16 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20).sum()  # what a training step does with its embedding gradient
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(**env) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not reuse_freed_memory(), reason="glibc only")
def test_large_tensors_are_reused_instead_of_faulted_in_every_step():
    default, tuned = probe(ABLATIONS_KEEP_GLIBC_MALLOC="1"), probe()
    assert (default["tuned"], tuned["tuned"]) == (False, True)
    block = 64 * 2**20 // 4096  # pages of one 64 MB allocation (16,384 of 4 KB)
    assert default["faults"] > 8 * block  # the default faults in (nearly) every one of the ten allocations anew
    # The freed block is reused: at most three of the ten allocations are faulted in again (the heap may still be
    # settling: under load it took up to seven allocations here, CI once saw two late ones), where the default
    # faults in every one.
    assert tuned["faults"] <= 3 * block + 64


AFTER_A_RUN = """
import json, resource, sys
import torch
from conftest import quick_config
import core.train
core.train.run(quick_config(sys.argv[1], sys.argv[2], epochs=1), device="cpu", progress=False)
for _ in range(5):
    torch.ones(16 * 2**20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20).sum()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not reuse_freed_memory(), reason="glibc only")
def test_a_cpu_run_leaves_large_blocks_reused(tiny_bert, toy_data):
    """After a CPU run the process reuses freed large blocks (the run applied the setting), unless turned off."""
    tests = os.path.dirname(__file__)

    def faults(**env) -> int:
        done = subprocess.run([sys.executable, "-c", AFTER_A_RUN, tiny_bert, toy_data], capture_output=True,
                              text=True, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]), **env})
        return json.loads(done.stdout.strip().splitlines()[-1])["faults"]

    block = 64 * 2**20 // 4096
    assert faults() <= 3 * block + 64  # at most three of ten allocations faulted in anew (see above)
    assert faults(ABLATIONS_KEEP_GLIBC_MALLOC="1") > 8 * block


@pytest.mark.skipif(not sys.platform.startswith("linux") or not reuse_freed_memory(), reason="glibc only")
def test_cpu_settings_counts_faults_with_and_without_the_setting_and_times_three_adamw_updates(
        tiny_bert, tmp_path, monkeypatch, capsys):
    """`python -m ablations.benchmark --cpu-settings`: each setting in a process of its own (the setting cannot be
    undone in a process), alternating; AdamW fused, per-tensor and foreach on the model's every parameter."""
    from ablations import benchmark
    out = tmp_path / "cpu_settings.json"
    monkeypatch.setattr(sys, "argv", ["benchmark", "--cpu-settings", "--model", tiny_bert, "--batch-size", "2",
                                      "--length", "8", "--steps", "2", "--rounds", "1", "--output", str(out)])
    assert benchmark.main() == 0
    result = json.loads(out.read_text())
    faults, adamw = result["page_faults"], result["adamw"]
    assert faults["applied"] == {"default": [False], "reuse": [True]}  # one process each, the setting as asked
    assert [len(faults["minor_faults_rounds"][name]) for name in ("default", "reuse")] == [1, 1]
    assert faults["reuse_vs_default_ms_per_step"]["median"] > 0
    assert set(adamw["ms_per_step"]) == {"fused", "per-tensor", "foreach"}
    assert set(adamw["vs_fused"]) == set(adamw["cpu_vs_fused"]) == {"per-tensor", "foreach"}
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    assert adamw["parameters"] == sum(p.numel() for p in model.parameters())
    printed = capsys.readouterr().out
    assert "minor page faults a step" in printed and "per-tensor:" in printed


def test_cpu_settings_refuses_bad_sizes_and_a_missing_model_in_one_line(tmp_path, monkeypatch):
    from ablations import benchmark
    from core.errors import UsageError
    monkeypatch.setattr(sys, "argv", ["benchmark", "--cpu-settings", "--model", str(tmp_path), "--steps", "0"])
    with pytest.raises(UsageError, match="--steps 0 is too small"):
        benchmark.main()
    monkeypatch.setattr(sys, "argv", ["benchmark", "--cpu-settings", "--model", str(tmp_path / "none")])
    with pytest.raises(UsageError):
        benchmark.main()
