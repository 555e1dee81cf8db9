"""One run in four stages: prepare (data, model, freeze, frozen-prefix cache) -> train epochs -> evaluate -> record.

`run()` reads top to bottom through them; the first, `prepare`, is `core.prepare`. The training step itself is
`train_step`; an engine that trains differently (several runs at once, a captured step) replaces `train_epochs`
and keeps the other stages.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core import metrics as run_metrics
from core import shared_steps, timing
from core.batches import eval_tokens, length_grouped_batches, sorted_batches
from core.config import RunConfig
from core.data import to_device
from core.device import clip_gradients, make_optimizer, make_schedule, precision_for, resolve_device, sync_time
from core.model import device_name, frozen_modules
from core.prepare import Prepared, caches_prefix, prepare, split_rows
from core.record import RunRecord
from core.recording import charged_prefix_seconds, make_record
from core.session import Session

EpochCallback = Callable[[dict], "str | None"]


def run(config: RunConfig, device: str | torch.device | None = None, progress: bool = True,
        on_epoch: EpochCallback | None = None, use_prefix_cache: bool = True, compile: bool = False,
        siblings: Iterable[RunConfig] = (), session: Session | None = None) -> RunRecord:
    """Train one config and return its record. `on_epoch(entry)` may return a reason to stop early.

    `session` holds what runs of one process share (loaded data and checkpoint, prefix caches, shared steps);
    a grid passes one along, a single run gets a fresh one. `compile=True` runs the model through
    `torch.compile` (dynamic shapes: batches vary in length). `siblings`: configs this process may train
    next; where one differs only in its schedule, the steps both take alike are kept for it
    (`core.shared_steps`), and this run itself starts from such steps if kept."""
    wall_start = time.perf_counter()
    session = session or Session()
    with session.timer.working():  # a project process that times elsewhere on this machine pauses us
        prepared = prepare(config, session, device, progress, use_prefix_cache)
        with prepared.frozen_view():
            forward = torch.compile(prepared.model, dynamic=True) if compile else prepared.model
            training = train_epochs(prepared, forward, session, on_epoch, progress, compile, siblings)
            test_metrics = evaluate_test(prepared, forward, training.best, session)
        # still a worker: the record (library versions, predictions) takes CPU that another's timing would count
        return make_record(prepared, training, test_metrics, session, compile, wall_start)


@dataclass
class Training:
    """What the epochs produced: per-epoch history, the selected epoch (weights kept in memory), timings."""
    history: list[dict] = field(default_factory=list)
    best: dict | None = None           # epoch, metrics, predictions, weights of the selected epoch
    stopped: str | None = None         # the reason on_epoch gave for stopping early
    train_seconds: float = 0.0         # the steps as they ran in this process (shared steps as they ran)
    eval_seconds: float = 0.0
    sharing: shared_steps.Plan | None = None
    timing: timing.StepTiming | None = None  # what one step of this work shape costs alone
    steps: int = 0                     # steps the run took (shared ones included)
    engine: str = "eager"              # what trained the steps: eager, "stacked (N runs)", "captured (N runs)"


def train_epochs(p: Prepared, forward, session: Session, on_epoch: EpochCallback | None, progress: bool,
                 compile: bool, siblings: Iterable[RunConfig]) -> Training:
    """The loop: epochs of length-grouped batches, evaluation after each, the best epoch kept."""
    config, device = p.config, p.device
    steps_per_epoch = math.ceil(len(p.train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = make_optimizer(p.model, config, device)
    scheduler = make_schedule(optimizer, config, total_steps)
    # Steps shared with siblings that differ only in their schedule (core.shared_steps).
    store = session.shared_steps
    sharing = shared_steps.plan(store, config, siblings, steps_per_epoch, device=device.type, precision=p.precision,
                                cached=p.cached, compile=compile, data=p.data.fingerprint)
    done = Training(sharing=sharing)
    if session.timing_repeats:
        _train_mode(p)
        done.timing = time_steps(p, forward, optimizer, scheduler, session, compile, progress)
    bar = tqdm(total=total_steps, disable=not progress, unit="step", leave=False,
               desc=f"freeze {config.freeze_depth} · {config.scheduler} · seed {config.seed}")
    for epoch in range(1, config.epochs + 1):
        _train_mode(p)
        started, loss_sum = sync_time(device), torch.zeros((), device=device)
        skip, earlier = 0, 0.0  # steps (and their seconds) of this epoch that a snapshot already took
        if epoch == 1 and sharing.resumed:
            store.restore(sharing.resumed, p.params, optimizer, scheduler, device, loss_sum, p.scaler)
            skip, earlier = sharing.resumed.steps, sharing.resumed.seconds
            started = sync_time(device)  # the copy back is no step of the run alone: its steps took `earlier`
            bar.update(skip)
        batches = length_grouped_batches(p.train.lengths, config.batch_size, seed=config.seed * 1000 + epoch)
        for step in range(skip, len(batches) + 1):
            if epoch == 1 and step in sharing.keep_at:  # the state after `step` steps, for a sibling
                paused = sync_time(device)
                store.take(sharing.key, sharing.rates[:step], config.run_id, p.params, optimizer, device, loss_sum,
                           earlier + paused - started, p.scaler)
                started += sync_time(device) - paused  # the copy is not this run's training time
            if step == len(batches):
                break
            loss_sum += train_step(p, forward, batches[step], optimizer, scheduler)
            session.timer.pause_point()
            bar.update()
        epoch_seconds = sync_time(device) - started + earlier
        done.steps += len(batches)
        entry = end_epoch(p, forward, session, done, epoch, len(batches), loss_sum.item() / steps_per_epoch,
                          epoch_seconds, on_epoch)
        bar.set_postfix(accuracy=f"{entry['accuracy']:.4f}", loss=f"{entry['loss']:.4f}")
        if done.stopped:
            break
    bar.close()
    return done


def end_epoch(p: Prepared, forward, session: Session, done: Training, epoch: int, steps: int, train_loss: float,
              epoch_seconds: float, on_epoch: EpochCallback | None) -> dict:
    """After an epoch's steps (solo or in a stacked group, `core.group`): evaluate, log, keep the best epoch,
    ask `on_epoch` whether to stop. The model holds this run's weights. Returns the epoch's history entry."""
    if not math.isfinite(train_loss):
        fp16 = ", or train in --precision fp32 (fp16's range may be too narrow for this model)" \
            if p.precision == "fp16" else ""
        raise FloatingPointError(f"training loss became {train_loss} in epoch {epoch}: lower the learning "
                                 f"rate or check the data{fp16}")
    done.train_seconds += epoch_seconds
    started = time.perf_counter()
    metrics, predictions = evaluate(p, forward, "validation", session)
    dev = evaluate(p, forward, "dev", session)[0] if "dev" in p.splits else None
    done.eval_seconds += time.perf_counter() - started
    # An epoch's train_seconds is what it costs alone (timed steps; the prefix build the record charges counts in
    # epoch 1), the seconds the search's pruning compares; loop_seconds what its steps took here.
    prefix = charged_prefix_seconds(p, done.timing) if epoch == 1 else 0.0
    alone = done.timing.seconds(steps, prefix)[0] if done.timing else epoch_seconds + prefix
    entry = {"epoch": epoch, **metrics, **{f"dev_{k}": v for k, v in (dev or {}).items()},
             "train_loss": round(train_loss, 5), "train_seconds": round(alone, 3),
             "loop_seconds": round(epoch_seconds, 3)}
    done.history.append(entry)
    select_epoch(p, done, epoch, metrics, dev, predictions)
    if on_epoch is not None and (stopped := on_epoch(entry)):
        done.stopped = stopped
    return entry


def select_epoch(p: Prepared, done: Training, epoch: int, metrics: dict, dev: dict | None,
                 predictions: np.ndarray) -> None:
    """Keep this epoch (its weights too) if it beats the best so far by the run's `select_by` on the dev split;
    validation is only reported (without a dev split it must do both)."""
    chosen_on = dev or metrics
    if done.best is None or _better(chosen_on, done.best["chosen_on"], p.config.select_by):
        done.best = {"epoch": epoch, "metrics": metrics, "dev": dev, "chosen_on": chosen_on,
                     "predictions": predictions, "weights": [w.detach().clone() for w in p.params]}


def _train_mode(p: Prepared) -> None:
    p.model.train()
    if not p.config.frozen_dropout:  # frozen layers run in eval mode: the same function the cache computed
        for module in frozen_modules(p.backbone, p.config.freeze_depth) if not p.cached else []:
            module.eval()


def time_steps(p: Prepared, forward, optimizer, scheduler, session: Session, compile: bool,
               progress: bool = False) -> timing.StepTiming:
    """What one step of this run's work shape costs alone on this machine (`core.timing`): timed once per shape
    on the run's own first-epoch batches before it trains, the run's state put back afterwards."""
    shape = timing_shape(p, compile)
    if (known := session.timer.known(shape)) is not None:
        return known  # timed before: no batches to build, no model and optimizer state to copy and put back
    batches, cost = timing_batches(p)
    if progress:  # on a CPU a minute or more before the progress bar: say what it is, not a silent terminal
        timer = session.timer
        print(f"timing {timer.warmup} + {timer.repeats} × {min(timer.steps, len(batches))} training steps alone "
              "before training, for train_seconds and its interval (--timing-repeats 1: a quick look, 0: none)",
              file=sys.stderr, flush=True)
    with timing.preserved(p.params, optimizer, scheduler, p.device, p.scaler):
        return session.timer.step_timing(shape, lambda indices: train_step(p, forward, indices, optimizer, scheduler),
                                         batches, p.device, device_name(p.device), cost, quiet_prefix_build(p))


def quiet_prefix_build(p: Prepared) -> float | None:
    """The seconds of the train split's frozen-prefix build this run made just now, alone and quiet (what a step
    timing of its shape keeps, `core.timing.StepTiming.prefix_seconds`); None where it made none, reused one, or
    met foreign load."""
    if not p.cached or p.prefix["reused"].get("train", True) or "contended" in p.prefix:
        return None
    return p.prefix["seconds"].get("train")


def timing_shape(p: Prepared, compile: bool) -> str:
    """The key of this run's work shape in the timing file (`core.timing.work_shape` with the runtime settings)."""
    return timing.work_shape(p.config, device=device_name(p.device), precision=p.precision, cached=p.cached,
                             compile=compile, rows=len(p.train), data=p.data.fingerprint)


def planned_shape(config: RunConfig, session: Session, device=None, compile: bool = False) -> str:
    """`timing_shape` of a run not prepared yet, from its data alone (loaded once per session; no model, no
    prefix build): what asks whether a timing is needed before anything is prepared for one."""
    return planned_run(config, session, device, compile)[0]


def planned_run(config: RunConfig, session: Session, device=None, compile: bool = False) -> tuple[str, int]:
    """(`planned_shape`, the run's training rows), from one look at its data."""
    device = resolve_device(device)
    data = session.text_data(config.dataset, session.tokenizer(config.model), config.text_column,
                             config.label_column, config.max_length)
    rows = len(split_rows(config, data)[0])
    return timing.work_shape(config, device=device_name(device), precision=precision_for(config.precision, device),
                             cached=caches_prefix(config, session, data), compile=compile, rows=rows,
                             data=data.fingerprint), rows


def timing_batches(p: Prepared) -> tuple[list[np.ndarray], list[int]]:
    """The batches a timing pass samples from — the run's own first-epoch batches — and each one's cost (rows x
    padded length), by which `core.timing.sample_batches` picks a sample whose mean step is the epoch's."""
    batches = length_grouped_batches(p.train.lengths, p.config.batch_size, seed=p.config.seed * 1000 + 1)
    return batches, [len(b) * int(p.train.lengths[b].max()) for b in batches]


def train_step(p: Prepared, forward, indices: np.ndarray, optimizer: torch.optim.Optimizer, scheduler) -> torch.Tensor:
    """One optimizer step on the rows `indices`: forward, backward, clip to norm 1, AdamW, schedule. In fp16 the
    loss is scaled before the backward pass and the gradients unscaled before clipping; a step whose gradients
    overflowed is skipped (GradScaler; AdamW's step count stays) and the scale backs off."""
    target = to_device(p.labels["train"][indices], p.device)
    with p.autocast():
        loss = forward(**p.inputs("train", indices), labels=target).loss
    p.scaler.scale(loss).backward()
    p.scaler.unscale_(optimizer)
    clip_gradients(p.params, 1.0, p.device)
    p.scaler.step(optimizer)
    p.scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def evaluate_test(p: Prepared, forward, best: dict, session: Session) -> dict | None:
    """The labeled test split, once, with the selected epoch's weights."""
    if "test" not in p.splits:
        return None
    with torch.no_grad():
        for param, weights in zip(p.params, best["weights"]):
            param.copy_(weights)
    metrics, _ = evaluate(p, forward, "test", session)
    return metrics


@torch.inference_mode()
def evaluate(p: Prepared, forward, name: str, session: Session) -> tuple[dict, np.ndarray]:
    """Loss, accuracy and macro-F1 on one split, in large length-sorted batches; also the predictions."""
    forward.eval()
    split = p.splits[name]
    predictions = np.empty(len(split), dtype=np.int64)
    loss_sum = 0.0
    for indices in sorted_batches(split.lengths, eval_tokens(p.device)):
        session.timer.pause_point()
        with p.autocast():
            logits = forward(**p.inputs(name, indices)).logits.float()
        target = p.labels[name][indices].to(p.device)
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        predictions[indices] = logits.argmax(-1).cpu().numpy()
    scores = run_metrics.classification_metrics(predictions, split.labels, p.data.num_labels,
                                                session.metric("accuracy"), session.metric("f1"))
    return {"accuracy": round(scores["accuracy"], 6), "loss": round(loss_sum / max(1, len(split)), 6),
            "f1": round(scores["f1"], 6)}, predictions


def _better(new: dict, old: dict, select_by: str) -> bool:
    return new["loss"] < old["loss"] if select_by == "loss" else new[select_by] > old[select_by]
