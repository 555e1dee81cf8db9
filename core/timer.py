"""The step timings of one session (`Timer`): per work shape in memory, in the machine's timing file beside the
lease (`core.lease`), else measured now by `core.timing` alone on the machine, with the foreign-load probe.
Another worker of the machine reads a timing this one saved; a contended timing is kept in memory only.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import torch

from core.lease import Contention, Lease, LoadProbe
from core.record import write_atomically
from core.timing import REPEATS, STEPS, WARMUP, StepTiming, interleaved_steps, measure_steps, sample_batches


class Timer:
    """Step timings per work shape for one session: in memory, in the machine's timing file, else measured
    under the exclusive lease. `repeats=1` is the quick look (no interval)."""

    def __init__(self, repeats: int = REPEATS, steps: int = STEPS, warmup: int = WARMUP,
                 lease: Lease | None = None, threshold: float | None = None):
        self.repeats, self.steps, self.warmup = repeats, steps, warmup
        self.lease = lease or Lease()
        self.threshold = threshold
        self.path = self.lease.directory / "timings.json"
        self.memory: dict[str, StepTiming] = {}

    def working(self):
        return self.lease.working()

    def pause_point(self) -> None:
        self.lease.pause_point()

    def _key(self, shape: str) -> str:
        return f"{shape}:r{self.repeats}:k{self.steps}"  # a quick look does not stand in for a full timing

    def known(self, shape: str) -> StepTiming | None:
        """The shape's timing if this session or another worker of the machine has taken it, else None: a caller
        that would set up steps to time (batches, a snapshot of the run's state) asks first."""
        key = self._key(shape)
        if key not in self.memory and (found := self._read().get(key)) is not None:
            self.memory[key] = StepTiming.from_dict(found)
        return self.memory.get(key)

    def step_timing(self, shape: str, step_fn: Callable[[Any], None], batches: Sequence,
                    device: torch.device | str = "cpu", device_label: str = "",
                    cost: Sequence[float] | None = None, prefix_seconds: float | None = None) -> StepTiming:
        """The shape's timing: remembered, or read from the file, or measured now (alone on the machine), kept
        with `prefix_seconds` (`StepTiming.prefix_seconds`)."""
        if (known := self.known(shape)) is not None:
            return known
        key = self._key(shape)
        with self.lease.exclusive():
            if (found := self._read().get(key)) is not None:  # another worker timed it while we waited
                self.memory[key] = timing = StepTiming.from_dict(found)
                return timing
            device = torch.device(device)
            probe = self._probe(device)
            timing = measure_steps(step_fn, sample_batches(batches, self.steps, cost), device, self.warmup,
                                   self.repeats, probe, shape, device_label)
            timing = dataclasses.replace(timing, prefix_seconds=prefix_seconds)
            self.memory[key] = timing
            if not timing.contended:
                self._write(key, timing)
        return timing

    def solo(self, fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float, Contention]:
        """Run `fn` once alone on the machine (a frozen-prefix build, say): (its result, seconds, contention)."""
        device = torch.device(device)
        with self.lease.exclusive():
            probe = self._probe(device)
            probe.start()
            started = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            return result, seconds, probe.stop()

    def interleaved(self, step_fns: dict[Any, Callable[[Any], None]], batches: dict[Any, Sequence],
                    device: torch.device | str = "cpu", rounds: int | None = None, device_label: str = "",
                    save: bool = False, replace: bool = False,
                    prefix_seconds: dict[Any, float | None] | None = None) -> dict[Any, StepTiming]:
        """`interleaved_steps` alone on the machine (the lease pauses the project's other workers), with the
        foreign-load probe. `save`: the names are work shapes (`work_shape`) and their timings are this
        session's and the machine's, like `step_timing`'s (shapes another worker timed meanwhile are read, not
        timed again, unless `replace`: then every shape is timed together and its saved timing replaced, except
        where another worker, waited for here, has just timed them all in one sitting), each with its
        `prefix_seconds` (by name); else nothing is kept: a check of the saved timings, not one of them."""
        device = torch.device(device)
        with self.lease.exclusive():
            found = {}
            if save:
                saved = self._read()
                found = {name: StepTiming.from_dict(saved[self._key(name)]) for name in step_fns
                         if self._key(name) in saved}
                if replace and (len(found) < len(step_fns) or len({t.measured_at for t in found.values()}) > 1):
                    found = {}  # not one sitting of them all: time every shape together
                step_fns = {name: fn for name, fn in step_fns.items() if name not in found}
            timings = interleaved_steps(step_fns, batches, device, self.warmup, rounds or self.repeats,
                                        self._probe(device), device_label) if step_fns else {}
            if save:
                timings = {name: dataclasses.replace(timing, prefix_seconds=(prefix_seconds or {}).get(name))
                           for name, timing in timings.items()}
                for name, timing in timings.items():
                    self.memory[self._key(name)] = timing
                    if not timing.contended:
                        self._write(self._key(name), timing)
                for name, timing in found.items():
                    self.memory[self._key(name)] = timing
            return timings | found

    def _probe(self, device: torch.device) -> LoadProbe:
        extra = {} if self.threshold is None else {"threshold": self.threshold}
        return LoadProbe(self.lease.worker_pids, cuda=device.type == "cuda", **extra)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _write(self, key: str, timing: StepTiming) -> None:
        # Under the exclusive lease: no other writer.
        write_atomically(self.path, json.dumps(self._read() | {key: asdict(timing)}, indent=1, sort_keys=True))

