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
