"""`core.timer.Timer`: every timing is taken holding the machine's exclusive lease (the project's other workers
paused), and the machine's timing file is never left half-written."""
from __future__ import annotations

import fcntl
from pathlib import Path

import pytest
from conftest import disk_fills_halfway

from core.lease import Lease
from core.timer import Timer

QUIET = dict(repeats=2, steps=3, warmup=1, threshold=1e9)  # no reading counts as foreign load: timings are saved


def held_exclusively(folder: Path) -> bool:
    """Whether the lease's work lock is held exclusively now: a worker (another open file) could not share it."""
    with open(folder / "work.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@pytest.mark.parametrize("how", ["step_timing", "solo", "interleaved"])
def test_every_timing_is_taken_holding_the_exclusive_lease(tmp_path, how):
    held = []

    def step(batch):
        held.append(held_exclusively(tmp_path))

    timer = Timer(lease=Lease(tmp_path), **QUIET)
    if how == "step_timing":
        timer.step_timing("shape", step, list(range(10)))
    elif how == "solo":  # a frozen-prefix build
        timer.solo(lambda: step(None))
    else:
        timer.interleaved({"a": step, "b": step}, {"a": [0, 1], "b": [0, 1]}, save=True)
    assert held and all(held)
    assert not held_exclusively(tmp_path)  # and let go afterwards


def test_a_timing_write_cut_short_leaves_the_saved_timings_whole(tmp_path, monkeypatch):
    def step(batch):
        pass

    saved = Timer(lease=Lease(tmp_path), **QUIET).step_timing("shape-a", step, list(range(10)))
    disk_fills_halfway(monkeypatch)
    with pytest.raises(OSError):
        Timer(lease=Lease(tmp_path), **QUIET).step_timing("shape-b", step, list(range(10)))
    monkeypatch.undo()
    assert Timer(lease=Lease(tmp_path), **QUIET).known("shape-a") == saved  # another worker still reads it
    assert not list(tmp_path.glob("*.tmp"))  # no scratch file left in the lease folder
