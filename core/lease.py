"""The machine's timing lease and the foreign-load probe: a timing is taken alone, or it says it was not.

Lease. Every project process on a machine that trains holds a shared lock (`working()`) and passes
`pause_point()` once per step; a process that times takes the gate, then the exclusive lock. Holding the gate
makes every other worker's next `pause_point()` drop its shared lock and wait, so the exclusive lock comes as
soon as each worker finishes its current step, and the timer is never starved by workers that keep starting
steps. Locks are `fcntl.flock` on two files in one folder per machine and user (`ABLATIONS_TIMING_DIR`
moves it): the kernel drops them when a process dies, so a killed worker never leaves the lease held.

Probe. While a timing runs, /proc/stat says how many cores the machine kept busy and /proc/<pid>/stat how
many of those were this process and the project's (paused) workers; the rest is foreign load. Above
`FOREIGN_CORES` on average the timing is contended, and the evidence says by how much. On CUDA, other
processes on the GPU (nvidia-smi) make it contended too.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

FOREIGN_CORES = 0.25  # average cores kept busy by others during a timing above which it is contended


def lease_dir() -> Path:
    """One folder per machine and user: timings are a property of the hardware, not of a storage."""
    root = os.environ.get("ABLATIONS_TIMING_DIR") or Path(tempfile.gettempdir()) / f"freeze-ablations-{os.getuid()}"
    path = Path(root)
    (path / "workers").mkdir(parents=True, exist_ok=True)
    return path


class Lease:
    """Shared by training, exclusive for timing; one object per process (reentrant within it)."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else lease_dir()
        (self.directory / "workers").mkdir(parents=True, exist_ok=True)
        self._gate = open(self.directory / "gate.lock", "a+")
        self._work = open(self.directory / "work.lock", "a+")
        self._shared = 0      # nesting depth of working()
        self._exclusive = 0   # nesting depth of exclusive()
        self._marker = self.directory / "workers" / str(os.getpid())

    @contextlib.contextmanager
    def working(self):
        """Hold the shared lock around training (and evaluation): a timer elsewhere waits for our next
        `pause_point()`. Registers this process as a project worker, so the probe does not count it as foreign."""
        if self._shared == 0:
            self._marker.write_text(process_start(os.getpid()))
            self._take_shared()
        self._shared += 1
        try:
            yield self
        finally:
            self._shared -= 1
            if self._shared == 0:
                if not self._exclusive:
                    fcntl.flock(self._work, fcntl.LOCK_UN)
                self._marker.unlink(missing_ok=True)

    def pause_point(self) -> None:
        """Once per step: if a timer holds the gate, let go of the shared lock until it is done. One
        non-blocking flock call when nobody times."""
        if self._shared == 0 or self._exclusive:
            return
        try:
            fcntl.flock(self._gate, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        except BlockingIOError:
            fcntl.flock(self._work, fcntl.LOCK_UN)
            self._take_shared()

    @contextlib.contextmanager
    def exclusive(self):
        """The machine to ourselves (among project processes): gate first, then the exclusive lock."""
        if self._exclusive:
            self._exclusive += 1
            try:
                yield self
            finally:
                self._exclusive -= 1
            return
        if self._shared:
            fcntl.flock(self._work, fcntl.LOCK_UN)  # our own shared hold would block our exclusive request
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        fcntl.flock(self._work, fcntl.LOCK_EX)
        self._exclusive = 1
        try:
            yield self
        finally:
            self._exclusive = 0
            fcntl.flock(self._work, fcntl.LOCK_SH if self._shared else fcntl.LOCK_UN)
            fcntl.flock(self._gate, fcntl.LOCK_UN)

    def worker_pids(self) -> list[int]:
        """Project processes holding (or waiting for) the shared lock on this machine, still alive. A worker killed
        with -9 leaves its marker behind; the process that later gets its PID is not the worker (its start time
        differs from the one the marker holds) and counts as foreign."""
        pids = []
        for marker in (self.directory / "workers").iterdir():
            if not marker.name.isdigit():
                continue
            try:
                started = marker.read_text()
            except OSError:  # its worker just finished
                continue
            if Path(f"/proc/{marker.name}").exists() and started in ("", process_start(int(marker.name))):
                pids.append(int(marker.name))
        return pids

    def _take_shared(self) -> None:
        # Through the gate, so a waiting timer is not overtaken by a worker that comes back from its pause.
        fcntl.flock(self._gate, fcntl.LOCK_SH)
        fcntl.flock(self._work, fcntl.LOCK_SH)
        fcntl.flock(self._gate, fcntl.LOCK_UN)

    def close(self) -> None:
        self._marker.unlink(missing_ok=True)
        self._gate.close()
        self._work.close()


def read_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values + [0] * (8 - len(values))
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def process_start(pid: int) -> str:
    """When the process started, in clock ticks since boot (field 22 of proc(5)): with its PID, it names one
    process; '' once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_ticks(pid: int) -> int:
    """User + system clock ticks of one process (all its threads); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)


@dataclass(frozen=True)
class Contention:
    contended: bool
    foreign_cores: float     # average cores other processes kept busy while the timing ran
    project_cores: float     # average cores of this process and the project's workers
    cores: int
    gpu_processes: int       # other processes on the GPU (CUDA only; 0 elsewhere)
    evidence: str            # one sentence for the record and the report
    paused_cores: float = 0.0  # the project's *other* workers, which the lease pauses: ≈ 0 when it held


def judge(busy: int, total: int, project: int, cores: int, gpu_processes: int = 0,
          threshold: float = FOREIGN_CORES, others: int = 0) -> Contention:
    """Contended or not from tick deltas: machine busy, machine total (all cores), and the project's own
    (`others`: the part of it used by the project's other workers, which a timing under the lease pauses)."""
    share = cores / total if total > 0 else 0.0
    foreign = max(0.0, (busy - project) * share)
    project_cores = project * share
    reasons = []
    if foreign > threshold:
        reasons.append(f"other processes kept {foreign:.2f} of {cores} cores busy (threshold {threshold:g})")
    if gpu_processes:
        reasons.append(f"{gpu_processes} other process(es) on the GPU")
    evidence = "; ".join(reasons) if reasons else (f"quiet: other processes kept {foreign:.2f} of {cores} cores "
                                                   f"busy (threshold {threshold:g}), the GPU was not shared")
    paused = others * share
    evidence += f"; the project's other workers kept {paused:.2f} cores busy"
    return Contention(bool(reasons), round(foreign, 3), round(project_cores, 3), cores, gpu_processes, evidence,
                      round(paused, 3))


def gpu_process_pids() -> list[int] | None:
    """PIDs of compute processes on the visible GPUs, from nvidia-smi; None where it cannot be asked."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [int(line) for line in out.split() if line.strip().isdigit()]


def foreign_gpu_processes(listed: list[int] | None, project: Iterable[int]) -> int:
    """Listed GPU processes that are not the project's. In a container nvidia-smi shows host PIDs, none of
    which match ours: then every listed process beyond the project's count is taken as foreign."""
    if not listed:
        return 0
    project = set(project)
    if project & set(listed):
        return len(set(listed) - project)
    return max(0, len(listed) - len(project))


class LoadProbe:
    """Measure foreign load between `start()` and `stop()`; readings injectable for tests."""

    def __init__(self, project_pids: Callable[[], Iterable[int]], cuda: bool = False,
                 read_stat: Callable[[], tuple[int, int]] = read_cpu, read_ticks: Callable[[int], int] = process_ticks,
                 list_gpu: Callable[[], list[int] | None] = gpu_process_pids, cores: int | None = None,
                 threshold: float = FOREIGN_CORES):
        self.project_pids, self.cuda, self.threshold = project_pids, cuda, threshold
        self.read_stat, self.read_ticks, self.list_gpu = read_stat, read_ticks, list_gpu
        self.cores = cores or os.cpu_count() or 1
        self._start: tuple[tuple[int, int], dict[int, int]] | None = None

    def start(self) -> None:
        pids = set(self.project_pids()) | {os.getpid()}
        self._start = (self.read_stat(), {pid: self.read_ticks(pid) for pid in pids})

    def stop(self) -> Contention:
        (busy0, total0), ticks0 = self._start
        busy1, total1 = self.read_stat()
        # A worker that registered after start() has no start reading: its ticks since then are unknown, so
        # they count as foreign (it can only make a timing look contended, never quiet).
        used = {pid: max(0, self.read_ticks(pid) - before) for pid, before in ticks0.items()}
        project = sum(used.values())
        pids = set(ticks0) | set(self.project_pids())
        gpu = foreign_gpu_processes(self.list_gpu(), pids) if self.cuda else 0
        return judge(busy1 - busy0, total1 - total0, project, self.cores, gpu, self.threshold,
                     others=project - used.get(os.getpid(), 0))
