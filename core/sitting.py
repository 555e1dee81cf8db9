"""One timing sitting: every work shape of a study timed together, round-robin, before (or after) it trains.

A timing pass per shape, taken when the shape's first run starts, spreads a study's time axis over hours; a
shared machine's cores drift by ±15 % over such spans (results/README §9), so a speed-up could divide a time
taken at 02:00 by one taken at 05:00. Timed in one sitting, round-robin (`core.timing.interleaved_steps`), the
drift reaches every shape alike. `sitting` is what the grid and the search call before their first run (through
`ablations.stored_sitting.time_study`, which adds the shapes a growing study already holds): the shapes about to
train that this machine has no timing of are prepared (data, model, frozen prefix built alone, as a run does),
timed together and saved as their timings, so every run reads its time from one sitting. `prepared_shapes` is
the part `python -m ablations.timing_passes --interleave` shares.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from core import timing
from core.config import RunConfig
from core.device import make_optimizer, make_schedule
from core.session import Session


@dataclass
class Shape:
    """One work shape made ready to time: a run of it prepared, its step, the batches its timing samples."""
    config: RunConfig
    key: str                       # `core.train.timing_shape`: the timing file's key
    step: Callable[[Any], Any]
    batches: list
    steps: int                     # training steps of a run of this shape (all epochs)
    rows: int                      # training rows of a run of this shape
    prefix_seconds: float          # the train split's frozen-prefix build (0 when not cached)
    quiet_prefix: float | None     # that build where made now, alone and quiet (`core.train.quiet_prefix_build`)
    device: torch.device
    device_label: str
    prefix_evidence: str | None = None  # where that build (or one it reused or came from) met foreign load


def prepared_shapes(chosen: dict[Any, RunConfig], session: Session, device, views: contextlib.ExitStack,
                    compile: bool = False) -> dict[Any, Shape]:
    """A prepared run of each config of `chosen` (one per work shape, under any name), its frozen view entered
    on `views` (each shape has its own model), with its own optimizer and schedule: nothing a stored run uses."""
    from core.model import device_name
    from core.prepare import prepare
    from core.train import _train_mode, quiet_prefix_build, timing_batches, timing_shape, train_step

    shapes = {}
    for name, config in chosen.items():
        with session.timer.working():  # preparing takes a core: another worker's timing waits for it (core.lease)
            p = prepare(config, session, device, False, True)  # a frozen prefix is built alone, as in a run
        views.enter_context(p.frozen_view())
        forward = torch.compile(p.model, dynamic=True) if compile else p.model
        steps_per_epoch = math.ceil(len(p.train) / config.batch_size)
        optimizer = make_optimizer(p.model, config, p.device)
        scheduler = make_schedule(optimizer, config, steps_per_epoch * config.epochs)
        epoch, cost = timing_batches(p)
        _train_mode(p)
        shapes[name] = Shape(config, timing_shape(p, compile),
                             lambda indices, p=p, f=forward, o=optimizer, s=scheduler: train_step(p, f, indices, o, s),
                             timing.sample_batches(epoch, session.timer.steps, cost), steps_per_epoch * config.epochs,
                             len(p.train),
                             p.prefix["seconds"].get("train", 0.0) if p.cached else 0.0, quiet_prefix_build(p),
                             p.device, device_name(p.device), p.prefix.get("contended"))
    return shapes


@dataclass
class Timed:
    """One shape's timing from a sitting, with what a report needs to apply it to the runs of that shape."""
    key: str                       # the timing file's key
    config: RunConfig              # the run prepared for it
    rows: int                      # its training rows
    device_label: str
    prefix_seconds: float          # the frozen-prefix build made for the sitting (0 when not cached)
    timing: timing.StepTiming
    prefix_evidence: str | None = None  # where that build met foreign load (`Shape.prefix_evidence`)


def sitting(configs: Iterable[RunConfig], session: Session, device=None, compile: bool = False,
            together: bool = False, progress: Callable[[str], None] | None = print,
            force: bool = False) -> list[Timed]:
    """Time the work shapes of `configs` that this machine has no timing of, together in one sitting, and save the
    timings (`core.timer.Timer.interleaved`); a run of such a shape then reads its timing instead of taking one.
    `together`: if any shape needs a timing, time every shape of `configs` in that sitting, those timed before
    included (their saved timings are replaced), so all of them share one time axis. Returns what was timed
    (or read after another worker timed it meanwhile); nothing when no shape needed timing, unless `force` (the
    shapes' saved timings come from different passes: every shape is timed together again). Nothing a run
    computes changes: the steps run on models of their own, and the random state is put back."""
    configs = list(configs)
    if not configs or not session.timing_repeats:
        return []
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with contextlib.ExitStack() as views:
            from core.train import planned_shape
            first_of: dict[str, RunConfig] = {}
            for config in configs:  # configs of equal cost-carrying fields share their work shape
                first_of.setdefault(timing.work_shape(config), config)
            chosen = {planned_shape(c, session, device, compile): c for c in first_of.values()}  # timing keys
            needed = [key for key in chosen if session.timer.known(key) is None]
            if not needed and not force:
                return []  # asked before anything is prepared: a resumed study prepares nothing to time
            todo = prepared_shapes(chosen if together or force else {k: chosen[k] for k in needed}, session, device,
                                   views, compile)
            first = next(iter(todo.values()))
            if progress:
                rounds, steps = session.timer.repeats, session.timer.steps
                progress(f"timing {len(todo)} work shape(s) together, round-robin, alone on the machine "
                         f"({rounds} round{'s' if rounds != 1 else ''} of {steps} step{'s' if steps != 1 else ''} "
                         "each)")
            taken = session.timer.interleaved({k: s.step for k, s in todo.items()},
                                              {k: s.batches for k, s in todo.items()}, first.device,
                                              device_label=first.device_label, save=True, replace=together or force,
                                              prefix_seconds={k: s.quiet_prefix for k, s in todo.items()})
            return [Timed(k, s.config, s.rows, s.device_label, s.prefix_seconds, taken[k], s.prefix_evidence)
                    for k, s in todo.items()]
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
