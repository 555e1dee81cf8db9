"""Milliseconds per run-step of the three engines on one model, measured interleaved (a shared machine drifts).

- eager: the project's solo step (fused AdamW and `clip_gradients` from `core.device`, a schedule), one run;
- stacked N: `core.stacked.StackedRuns`, N runs as one model, the time divided by N;
- captured N: the same stacked step captured as a CUDA graph and replayed (CUDA only; N = 1 is one run).
The inputs are random token ids (depth 0) or random hidden states of the model's width (depth > 0: what the
frozen-prefix cache feeds), `length` tokens with some padding, the model's real weights and shapes, in train mode
as training runs them (dropout on; frozen layers, where they run, in eval mode). A step is the step alone: its
inputs are already on the device, padded and stacked (what the training loop does around it, assembling batches
and copying them in, is in the grid's wall time, not here). Each round times every contender for `steps` steps
after `warmup` untimed ones; what is reported is the median over rounds of each contender's ms per run-step and
of its ratio to the eager step of the same round. A contender that does not fit beside the others in device
memory, or whose step did not capture, gets a row that says so and no time.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import statistics
import time
from typing import Callable

import numpy as np
import torch

from core.captured import CapturedStep
from core.config import RunConfig
from core.device import autocast_for, clip_gradients, loss_scaler, make_optimizer, precision_for
from core.model import device_name, freeze, fresh_model, load_pretrained, num_layers
from core.prefix_cache import layer_view
from core.errors import UsageError
from core.stacked import StackedRun, StackedRuns, pad_and_stack
from core.stacked_modules import stack_problem


def _batches(model, depth: int, batch_size: int, length: int, count: int, device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        lengths = torch.randint(length * 3 // 4, length + 1, (batch_size,), generator=generator)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        if depth:
            values = {"inputs_embeds": torch.randn(batch_size, length, model.config.hidden_size, generator=generator)}
        else:
            values = {"input_ids": torch.randint(5, model.config.vocab_size, (batch_size, length), generator=generator)}
        out.append({**{k: v.to(device) for k, v in values.items()}, "attention_mask": mask.to(device),
                    "labels": torch.randint(0, 2, (batch_size,), generator=generator).to(device)})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eager(pristine, depth: int, config: RunConfig, batches: list[dict], device, autocast):
    model = fresh_model(*pristine).to(device)
    backbone = freeze(model, depth)
    model.train()  # from_pretrained leaves a model in eval mode: no dropout, not the step a run trains with
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, config, device)
    scaler = loss_scaler(config.precision, device)  # fp16: scaled as a run's step is (core.train.train_step)
    view = (lambda: layer_view(backbone, depth, num_layers(model.config), True)) if depth else contextlib.nullcontext
    state = {"i": 0}

    def step():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        with view(), autocast():
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        clip_gradients(params, 1.0, device)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def _stacked(pristine, depth: int, config: RunConfig, runs: int, batches: list[dict], device, autocast,
             capture: bool):
    members = []
    for seed in range(runs):
        torch.manual_seed(seed)
        model = fresh_model(*pristine)  # the checkpoint read once, copied per run: 56 reads would take a minute
        freeze(model, depth)
        members.append(StackedRun(config.replace(seed=seed), model, lambda i: {}, np.zeros(1), torch.zeros(1)))
    length = batches[0]["attention_mask"].shape[1]  # every batch has this many tokens: one bucket
    engine = StackedRuns(members, steps_per_epoch=1000, pad_id=0, device=device, autocast=autocast,
                         cached=depth > 0, capture=CapturedStep if capture else None, buckets=(length,),
                         loss_scaling=config.precision == "fp16")
    del members
    engine.model.train()  # as StackedRuns.train_epoch sets it: dropout on, live frozen layers in eval mode
    for module in engine.frozen:
        module.eval()
    stacked = []
    for i in range(len(batches)):
        parts = [batches[(i + r) % len(batches)] for r in range(runs)]  # each run its own batch
        inputs, labels, weights = pad_and_stack([{k: v for k, v in p.items() if k != "labels"} for p in parts],
                                                [p["labels"] for p in parts], pad_id=0)
        stacked.append({**inputs, "labels": labels, "weights": weights})
    state = {"i": 0}

    def run_step():  # a constant schedule: every step's rates are the first step's
        values = stacked[state["i"] % len(stacked)]
        state["i"] += 1
        with engine.view():
            if capture:
                return engine.captured(length, values)
            inputs = {k: v for k, v in values.items() if k not in ("labels", "weights")}
            return engine.step(inputs, values["labels"], values["weights"], engine.rates[0].tolist())
    if capture:  # warm-up and capture happen here: a timed step of this contender is a replay
        for _ in range(engine.captured.warmup + 1):
            run_step()
        if not engine.captured.replays:  # it fell back to the eager stacked step: timing that as "captured" lies
            why = engine.captured.why or "the step was not captured"
            engine.release()  # its device memory now, not when the cycle collector runs (core.stacked)
            return f"not captured: {why}"
    else:
        run_step()  # one untimed step now: its activations and AdamW state are allocated here, where a lack of
        # device memory is caught (step_times), not in the middle of the timed rounds
    return run_step


def _contender(build, runs: int, device) -> Callable[[], object] | str:
    """`build()`'s step, or why it has none: its own reason, or that it did not fit in device memory beside the
    contenders built before it (all of a process's contenders live at once)."""
    try:
        return build()
    except torch.OutOfMemoryError:
        pass
    gc.collect()  # the half-built group and its captured step are a reference cycle (core.stacked.release)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return f"out of device memory: {runs} run(s) did not fit beside this process's other contenders"


def step_times(model: str, runs: list[int], depths: list[int], batch_size: int = 16, length: int = 32,
               steps: int = 5, warmup: int = 2, rounds: int = 3, device=None,
               capture: bool | None = None) -> list[dict]:
    """One row per (depth, contender): ms per run-step (median over rounds) and its ratio to eager."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    capture = device.type == "cuda" if capture is None else capture
    precision = precision_for("auto", device)
    autocast = lambda: autocast_for(precision, device.type)  # noqa: E731
    graph_autocast = lambda: autocast_for(precision, device.type, cache_enabled=False)  # noqa: E731
    rows = []
    same = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "precision": precision, "batch_size": batch_size, "length": length}  # every row: what ran, and where
    for depth in depths:
        config = RunConfig(model=model, dataset="timing", freeze_depth=depth, batch_size=batch_size, epochs=1,
                           scheduler="constant", max_length=max(8, length), learning_rate=1e-5, precision=precision)
        pristine = load_pretrained(model, ["0", "1"])
        problem = stack_problem(pristine[0], depth)
        if problem is not None:  # a training command would train such runs one at a time: nothing to time here
            raise UsageError(f"--step-times compares stacked engines, and runs of {model} at freeze depth {depth} "
                             f"cannot be stacked ({problem}): the grid and the search train them one at a time")
        batches = _batches(pristine[0], depth, batch_size, length, 8, device)
        contenders = {"eager": (1, _eager(pristine, depth, config, batches, device, autocast))}
        untimed = {}  # contenders with no step to time (no memory, no capture): a row saying why, no time
        for n in runs:
            kinds = [("stacked", autocast, False)] + ([("captured", graph_autocast, True)] if capture else [])
            for kind, context, captured in kinds:
                step = _contender(functools.partial(_stacked, pristine, depth, config, n, batches, device, context,
                                                    captured), n, device)
                (untimed if isinstance(step, str) else contenders)[f"{kind} N={n}"] = (n, step)
        del pristine
        times = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, (n, step) in contenders.items():
                for _ in range(warmup):
                    step()
                _sync(device)
                started = time.perf_counter()
                for _ in range(steps):
                    step()
                _sync(device)
                times[name].append((time.perf_counter() - started) / steps / n * 1e3)
        for name, values in times.items():
            ratios = [v / e for v, e in zip(values, times["eager"])]
            rows.append({"depth": depth, "engine": name, "runs": contenders[name][0],
                         "ms_per_run_step": round(statistics.median(values), 3),
                         "vs_eager": round(statistics.median(ratios), 3), "rounds_ms": [round(v, 2) for v in values],
                         **same})
        for name, (n, why) in untimed.items():
            rows.append({"depth": depth, "engine": name, "runs": n, "ms_per_run_step": None, "vs_eager": None,
                         "not_timed": why, **same})
    return rows
