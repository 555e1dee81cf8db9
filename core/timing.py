"""Training time as a property of the config: what its steps cost alone on this hardware with this engine.

What determines a step's cost is the *work shape* (model, data, rows, freeze depth and whether the prefix is
cached, batch size, max length, precision, device, compile); seed, schedule, learning rate, warmup and weight
decay do not, and epochs only multiply the steps. So a timing pass runs once per work shape: `warmup` steps
(CUDA context, allocator growth, compilation, first batches; timed and reported apart), then `repeats`
repeats of `steps` real training steps on batches chosen to span the run's batch lengths, each repeat timed
(CUDA events on a GPU, perf_counter elsewhere; process CPU time beside it), under the machine's exclusive
lease (`core.lease`) with a foreign-load probe. A config's `train_seconds` is its step count times the mean
per-step time, with a 95 % Student-t interval over the repeats. Timings are kept per work shape in memory
and in a JSON file in the lease folder (`core.timer.Timer`), so the other workers of the machine reuse them; a
contended timing is kept in memory only, so the next process times that shape again.

The steps run on the run's real state before training and `preserved()` puts it back (weights, AdamW state,
schedule, RNG), so timing changes nothing the run computes. The grid's duration estimate before it starts
(`seconds_per_training_step`, a quick look kept nowhere) takes its steps through the same `measure_steps`.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import stats

from core.config import COST_FREE
from core.lease import Contention, LoadProbe

REPEATS, STEPS, WARMUP = 5, 10, 3
CONFIDENCE = 0.95


def work_shape(config, **runtime) -> str:
    """Equal for two configs (and runtime settings: device name, precision, cached prefix, compile, rows)
    whose training steps cost the same. The torch version is part of it: another engine, another cost."""
    fields = {k: v for k, v in config.to_dict().items() if k not in COST_FREE}
    text = json.dumps([fields, {k: str(v) for k, v in sorted(runtime.items())}, torch.__version__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sample_batches(batches: Sequence, k: int, cost: Sequence[float] | None = None) -> list:
    """k batches at evenly spaced quantiles of `cost` (e.g. padded tokens per batch): a sample whose mean
    step is the epoch's mean step, not the first k batches' (length grouping makes those unrepresentative)."""
    if k >= len(batches):
        return list(batches)
    order = sorted(range(len(batches)), key=lambda i: cost[i]) if cost is not None else list(range(len(batches)))
    return [batches[order[int((j + 0.5) * len(batches) / k)]] for j in range(k)]


@dataclass(frozen=True)
class StepTiming:
    """One timing pass of one work shape."""
    shape: str
    per_step: float                 # mean seconds per training step over the repeats
    per_step_low: float             # 95 % Student-t interval over the repeats (nan with one repeat)
    per_step_high: float
    repeat_seconds: list[float]     # per-step seconds of each repeat
    steps_per_repeat: int
    warmup_steps: int
    warmup_seconds: float           # the warm-up steps together, excluded from per_step
    cpu_per_step: float             # process CPU seconds per step (all threads), beside the wall clock
    clock: str                      # "cuda events" or "perf_counter"
    device: str
    contended: bool
    evidence: str
    foreign_cores: float
    paused_cores: float = math.nan  # the project's other workers while this ran (the lease pauses them: ≈ 0)
    sitting: int = 1                # work shapes timed together, round-robin, in this pass (1: this one alone)
    measured_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    # The train split's frozen-prefix build of a run of this shape, timed alone and quiet just before this pass (the
    # sitting's build, or the run's that took the pass): a later run of the shape is charged this, not its own
    # build under whatever load it meets, so steps and build come from one moment. None: not cached, or unknown.
    prefix_seconds: float | None = None

    def seconds(self, steps: int, extra: float = 0.0) -> tuple[float, float, float]:
        """(mean, low, high) seconds of `steps` steps plus `extra` (e.g. the frozen-prefix build, no interval)."""
        return (steps * self.per_step + extra, steps * self.per_step_low + extra,
                steps * self.per_step_high + extra)

    def record(self, steps: int, extra: float = 0.0, extra_contention: str | None = None) -> dict[str, Any]:
        """The record's timing fields: `train_seconds` (+ `_low`/`_high`), `contended` and the details.
        `extra_contention`: the evidence where the `extra` work (a prefix build) ran beside foreign load."""
        mean, low, high = self.seconds(steps, extra)
        details = {**asdict(self), "steps": steps, "extra_seconds": round(extra, 3)}
        if extra_contention:
            details["prefix_evidence"] = extra_contention
        return {"train_seconds": round(mean, 3),
                "train_seconds_lo": None if math.isnan(low) else round(low, 3),
                "train_seconds_hi": None if math.isnan(high) else round(high, 3),
                "contended": self.contended or bool(extra_contention),
                "timing": details}

    @classmethod
    def from_dict(cls, values: dict) -> "StepTiming":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in names})


def per_step_interval(repeat_seconds: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean per-step seconds with a Student-t interval over the repeats (nan bounds with one repeat)."""
    n = len(repeat_seconds)
    mean = sum(repeat_seconds) / n
    if n < 2:
        return mean, math.nan, math.nan
    spread = stats.sem(repeat_seconds)
    if spread == 0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=spread)
    return mean, max(0.0, float(low)), float(high)


def _timed_pass(step_fn: Callable[[Any], None], batches: Sequence, device: torch.device) -> float:
    """`step_fn` over every batch once; seconds per step (CUDA events on a GPU, perf_counter on a CPU)."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for batch in batches:
            step_fn(batch)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000 / len(batches)
    begin = time.perf_counter()
    for batch in batches:
        step_fn(batch)
    return (time.perf_counter() - begin) / len(batches)


def measure_steps(step_fn: Callable[[Any], None], batches: Sequence, device: torch.device | str = "cpu",
                  warmup: int = WARMUP, repeats: int = REPEATS, probe: LoadProbe | None = None,
                  shape: str = "", device_label: str = "") -> StepTiming:
    """`warmup` untimed-for-the-mean steps (round-robin over `batches`), then `repeats` passes of
    `step_fn(batch)` (one full optimizer step) over `batches`, each pass timed as a whole: a sitting of one."""
    return interleaved_steps({shape: step_fn}, {shape: batches}, device, warmup, repeats, probe, device_label)[shape]


def seconds_per_training_step(config, session, device=None, steps: int = 3) -> tuple[float, int]:
    """The basis of a grid's duration estimate: the median of `steps` training steps of the whole model (depth 0:
    the slowest kind) on `batch_size` random train rows, timed by `measure_steps` after one warm-up step, alone on
    the machine (a quick look: no load probe, kept nowhere); and the number of train rows."""
    from core.batches import subsample
    from core.device import autocast_for, precision_for, resolve_device
    device = resolve_device(device)
    precision = precision_for(config.precision, device)
    data = session.text_data(config.dataset, session.tokenizer(config.model), config.text_column,
                             config.label_column, config.max_length)
    model = session.model(config.model, data.label_names).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    rows = subsample(len(data.splits["train"]), config.batch_size, config.seed)
    split = data.splits["train"].subset(rows, progress=False)
    indices = np.arange(len(split))

    def step(batch: dict) -> None:
        with autocast_for(precision, device.type):
            loss = model(**batch, labels=torch.as_tensor(split.labels[indices], device=device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    # One batch, stepped again and again: the first step of each new shape sets up kernels (oneDNN on a CPU), a
    # cost a real run pays once per shape and then amortises over thousands of steps.
    batch = split.batch(indices, data.pad_id, device)
    # The machine's other project workers pause: two probes starting at once measured 7.2 s a step each, where one
    # alone measured 0.49 s.
    with session.timer.lease.exclusive():
        timing = measure_steps(step, [batch], device, warmup=1, repeats=steps)
    return statistics.median(timing.repeat_seconds), len(data.splits["train"])


@contextlib.contextmanager
def preserved(params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler=None,
              device: torch.device | str = "cpu", scaler: torch.amp.GradScaler | None = None):
    """Steps taken inside leave no trace: trainable weights, optimizer state and learning rates, the schedule's
    position, fp16's loss scale, the RNG (dropout masks) and the gradients are put back as they were."""
    device = torch.device(device)
    weights = [p.detach().clone() for p in params]
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    scheduler_state = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    scaler_state = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
                p.grad = None
        optimizer.load_state_dict(optimizer_state)
        if scheduler is not None:
            scheduler.load_state_dict(scheduler_state)
        if scaler_state is not None:
            scaler.load_state_dict(scaler_state)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)


def interleaved_steps(step_fns: dict[Any, Callable[[Any], None]], batches: dict[Any, Sequence],
                      device: torch.device | str = "cpu", warmup: int = WARMUP, rounds: int = REPEATS,
                      probe: LoadProbe | None = None, device_label: str = "") -> dict[Any, StepTiming]:
    """Several work shapes timed in one sitting, round-robin: each shape's `warmup` steps first, then each round
    times every shape's `batches` once (one full optimizer step each), so drift of the machine over minutes
    reaches every shape alike and the per-round ratios between shapes are paired. Returns each shape's timing:
    `repeat_seconds` are its per-step seconds per round, `sitting` the number of shapes timed together."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    warmup_seconds = {}
    for name, step_fn in step_fns.items():
        started = time.perf_counter()
        for i in range(warmup):
            step_fn(batches[name][i % len(batches[name])])
        if cuda:
            torch.cuda.synchronize(device)
        warmup_seconds[name] = time.perf_counter() - started
    if probe is not None:
        probe.start()
    per_round: dict[Any, list[float]] = {name: [] for name in step_fns}
    cpu = dict.fromkeys(step_fns, 0.0)
    for _ in range(max(1, rounds)):
        for name, step_fn in step_fns.items():
            cpu_start = time.process_time()
            per_round[name].append(_timed_pass(step_fn, batches[name], device))
            cpu[name] += time.process_time() - cpu_start
    contention = probe.stop() if probe is not None else Contention(False, math.nan, math.nan, 0, 0, "not probed")
    timings, stamp = {}, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # one sitting, one time
    for name, seconds in per_round.items():
        mean, low, high = per_step_interval(seconds)
        timings[name] = StepTiming(str(name), mean, low, high, seconds, len(batches[name]), warmup,
                                   round(warmup_seconds[name], 4), cpu[name] / (len(seconds) * len(batches[name])),
                                   "cuda events" if cuda else "perf_counter", device_label or str(device),
                                   contention.contended, contention.evidence, contention.foreign_cores,
                                   contention.paused_cores, sitting=len(step_fns), measured_at=stamp)
    return timings
