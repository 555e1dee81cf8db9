"""Several runs of one work shape trained at once as one stacked model (`core.stacked`), each with its own record.

Only the training steps are shared. Everything else is the solo code of `core.train`, run per run: `prepare`
(data, own seed and head, frozen-prefix cache), the timing pass `time_steps` (once per group, whose runs share
one work shape: a record's train_seconds is what the run costs alone, never the group's wall time), and after
each epoch `end_epoch` on the run's own prepared model with the run's weights copied in (evaluation, best-epoch
selection, `on_epoch` pruning), then `evaluate_test` and `make_record` (`core.recording`). Shared steps
(`core.shared_steps`) do not apply inside a group: its runs start together, so there is no finished sibling to
take steps over from.

The runs may differ in their epochs: the group steps as many epochs as its longest run, and a shorter run's last
epoch is its last (its schedule ended there, `core.stacked.learning_rate_table`).

A run whose training loss turns non-finite fails alone: the runs share no trainable weight, and each run's
clip and AdamW update read only its own slice, so a NaN stays in its run. An error outside the steps fails the
group. Before an epoch in which fewer runs go on (some ended, were pruned or failed), the group is narrowed to
those runs (`StackedRuns.narrowed`: their weights, AdamW state and place in their schedules carried over), so a
run that ended costs no more steps.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence

import torch

from core import shared_steps
from core.captured import CapturedStep, buckets_for, probe_capture, resolve_engine
from core.config import RunConfig
from core.device import autocast_for, make_optimizer, make_schedule, precision_for, resolve_device, sync_time
from core.exact_dropout import random_state
from core.model import count_parameters, freeze, meta_model, model_config, num_layers
from core.record import RunRecord
from core.recording import make_record
from core.session import Session
from core.stacked import StackedRun, StackedRuns, group_key
from core.prepare import Prepared, prepare
from core.train import EpochCallback, Training, _train_mode, end_epoch, evaluate_test, run, time_steps, timing_shape

log = logging.getLogger(__name__)
MAX_GROUP = 64          # beyond this the stacked step stopped gaining in the H100 probes (N = 56: 0.99 ms/run-step)
MEMORY_HEADROOM = 0.8   # of the free device memory: the allocator fragments, eval batches come on top
_said: set[str] = set()


def choose_engine(requested: str, device, group_size: int, model: str = "", max_length: int = 128,
                  precision: str = "auto") -> str:
    """What trains a group of `group_size` runs: "eager" (one run, the solo step), "stacked" (runs fused into one
    model, `core.stacked`) or "captured" (that stacked step captured once per length bucket as a CUDA graph and
    replayed, `core.captured`; a group of one run included). `auto` is captured on CUDA where a probe in a child
    process captures this model, else stacked for more than one run, else eager. Asking for `captured` where it
    cannot run falls back the same way, with one log line saying why."""
    engine = resolve_engine(requested, device)  # checks the name; auto -> captured on CUDA, eager on the CPU
    if engine == "captured":
        ok, why = probe_capture(model, max_length, str(torch.device(device)),
                                precision_for(precision, torch.device(device)))
        if ok:
            return "captured"
        _say_once(f"training step runs eagerly: {why}")
        return "stacked" if group_size > 1 and requested in ("auto", "captured") else "eager"
    if engine == "eager" and group_size > 1 and requested == "auto":
        return "stacked"
    return engine


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning("%s", message)


def bytes_per_run(config: RunConfig, captured: bool = False, device=None) -> int:
    """Device memory one more run adds to a stacked group: its trainable weights (counted exactly, on a model built on
    the meta device and frozen to the run's depth), their gradients and two AdamW moments (4 tensors, 4 bytes each:
    master weights stay fp32 under autocast), its own whole model in fp32 (frozen layers included: after each epoch
    the run's weights are copied into it and the solo code evaluates it), plus the activations one batch keeps for
    the backward pass in each trained layer, s·b·h·(34 + 5·a·s/h) bytes at 16 bits (Korthikanti et al. 2022,
    "Reducing activation recomputation", eq. 1), doubled in fp32 (the precision the run resolves to on `device`).
    The stacked model's frozen layers and the prefix cache are shared by the group and not counted here
    (`group_size` keeps the cache's budget aside). `captured`: the step is captured once per length bucket
    (`core.captured.buckets_for`), and each graph keeps its own memory pool for good, so the activations of one
    batch of every bucket length are held at once (≈ 2x those of the longest bucket alone)."""
    cfg = model_config(config.model)
    hidden = cfg.hidden_size  # transformers maps each family's own name (dim, d_model, n_embd) to this one
    heads = getattr(cfg, "num_attention_heads", None) or max(1, hidden // 64)
    layers = num_layers(cfg)
    trained = layers - min(config.freeze_depth, layers)
    params, total = _parameters(config.model, config.freeze_depth)
    b, width = config.batch_size, 2 if precision_for(config.precision, resolve_device(device)) == "fp32" else 1
    lengths = buckets_for(config.max_length) if captured else (config.max_length,)
    activations = sum(trained * s * b * hidden * (34 + 5 * heads * s / hidden) * width for s in lengths)
    return int(16 * params + 4 * total + activations)


@functools.lru_cache(maxsize=64)
def _parameters(model_name: str, depth: int) -> tuple[int, int]:
    """(trainable, all) parameters of the model frozen to `depth`."""
    model = meta_model(model_name)
    freeze(model, depth)
    return count_parameters(model)


def group_size(config: RunConfig, device, free_bytes: int | None = None, captured: bool = False,
               reserved: int = 0) -> int:
    """The automatic --max-parallel-runs: 1 on a CPU (stacking pays little there, and not at every depth:
    `core.captured`); on CUDA as many runs as fit in MEMORY_HEADROOM of the free device memory, less `reserved`
    bytes (the frozen-prefix cache's device budget, filled only after this is decided), at `bytes_per_run` each
    (`captured`: with a graph pool per length bucket), 1..MAX_GROUP."""
    device = resolve_device(device)
    if device.type != "cuda" and free_bytes is None:
        return 1
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(device)
    usable = MEMORY_HEADROOM * max(0, free_bytes - reserved)
    return max(1, min(MAX_GROUP, int(usable // bytes_per_run(config, captured, device))))


def run_group(configs: Sequence[RunConfig], session: Session | None = None, device=None,
              on_epoch: Sequence[EpochCallback | None] | None = None, use_prefix_cache: bool = True,
              capture: type[CapturedStep] | None = None, exact_dropout: bool = False) -> list[RunRecord | Exception]:
    """Train `configs` (one work shape) as one stacked model, its step captured as a CUDA graph if `capture` is
    given (`core.captured.CapturedStep`); per run its record, or the error that failed it. `exact_dropout`: each
    run draws the dropout masks it would draw alone (`core.exact_dropout`; eager steps only)."""
    wall_start = time.perf_counter()
    session = session or Session()
    if len({group_key(c) for c in configs}) != 1:
        raise ValueError("a group's runs must share their work shape (core.stacked.group_key)")
    first = configs[0]
    data = session.text_data(first.dataset, session.tokenizer(first.model), first.text_column, first.label_column,
                             first.max_length)
    if exact_dropout and capture is not None:
        raise ValueError("exact dropout draws each run's masks from the host: it runs the eager stacked step only")
    problem = session.stack_problem(first.model, data, first.freeze_depth, exact_dropout, first.frozen_dropout)
    if problem is not None:  # e.g. a model with trainable convolutions: its runs train as they would alone
        _say_once(f"runs of {first.model} at freeze depth {first.freeze_depth} train one at a time: they cannot "
                  f"be stacked ({problem})")
        return [_alone(c, session, device, callback, use_prefix_cache)
                for c, callback in zip(configs, on_epoch or [None] * len(configs))]
    with session.timer.working():
        prepared, states = [], []
        for config in configs:
            prepared.append(prepare(config, session, device, False, use_prefix_cache))
            if exact_dropout:  # the run's random state as its prepare leaves it: where its dropout starts alone
                states.append(random_state(prepared[-1].device))
        trainings = train_group(prepared, session, on_epoch or [None] * len(configs), capture, states or None)
        results: list[RunRecord | Exception] = []
        for p, training in zip(prepared, trainings):
            if isinstance(training, Exception):
                results.append(training)
                continue
            with p.frozen_view():
                test_metrics = evaluate_test(p, p.model, training.best, session)
            results.append(make_record(p, training, test_metrics, session, False, wall_start))
    return results


def train_group(prepared: list[Prepared], session: Session, on_epoch: Sequence[EpochCallback | None],
                capture: type[CapturedStep] | None = None, random_states: list[torch.Tensor] | None = None
                ) -> list[Training | Exception]:
    """The epochs of every run at once; after each, every live run's weights go into its own model for the
    solo `end_epoch`. Returns each run's Training (its `engine` says "captured" if the steps ran as replayed
    graphs, "captured in part" if some did and a failed capture left others eager, "stacked" if all ran eagerly,
    and "exact dropout" where `random_states`, each run's random state after its prepare, had it draw its own
    dropout masks as alone), or the error that ended it."""
    first = prepared[0]
    steps_per_epoch = math.ceil(len(first.train) / first.config.batch_size)
    done = [Training(sharing=shared_steps.Plan("", None, None, frozenset())) for _ in prepared]
    if session.timing_repeats:
        # What a step of this shape costs alone: the runs share the shape, so one timing pass, as solo, on the first
        # model; none at all (no optimizer or schedule built for it) when the shape was timed before.
        timing = session.timer.known(timing_shape(first, False))
        if timing is None:
            optimizer = make_optimizer(first.model, first.config, first.device)
            scheduler = make_schedule(optimizer, first.config, steps_per_epoch * first.config.epochs)
            with first.frozen_view():
                _train_mode(first)
                timing = time_steps(first, first.model, optimizer, scheduler, session, False)
        for training in done:
            training.timing = timing
    runs = [StackedRun(p.config, p.model, _batches(p), p.train.lengths, p.labels["train"],
                       random_states[i] if random_states else None) for i, p in enumerate(prepared)]
    autocast = (lambda: autocast_for(first.precision, first.device.type, cache_enabled=False)) \
        if capture is not None else first.autocast  # a captured step's autocast keeps no weight-cast cache
    engine = StackedRuns(runs, steps_per_epoch, first.data.pad_id, first.device, autocast, first.cached,
                         capture=capture, loss_scaling=first.precision == "fp16", exact_dropout=bool(random_states))
    if engine.captured is not None:  # a group too big to capture is trained again in halves, not eagerly
        engine.captured.oom_raises = len(prepared) > 1
    outcome: list[Training | Exception] = list(done)

    def live(i: int, epoch: int) -> bool:  # not failed, not stopped early, and this epoch is one of the run's
        return outcome[i] is done[i] and not done[i].stopped and epoch <= prepared[i].config.epochs

    members = list(range(len(prepared)))  # the prepared run in each slot of the engine

    def capture_seconds() -> float:  # recording graphs is warm-up (issue 8): kept out of the loop's time
        return engine.captured.capture_seconds if engine.captured is not None else 0.0
    try:
        for epoch in range(1, max(p.config.epochs for p in prepared) + 1):
            keep = [slot for slot, i in enumerate(members) if live(i, epoch)]
            if not keep:
                break
            if len(keep) < len(members):  # runs ended (last epoch, pruned, failed): the rest go on as a smaller group
                engine, members = engine.narrowed(keep), [members[slot] for slot in keep]
            started, captures_before = sync_time(first.device), capture_seconds()
            losses = engine.train_epoch(epoch, session.timer.pause_point)
            if engine.captured is not None:  # the epoch's results go out now (`on_epoch`): no retry after this
                engine.captured.oom_raises = False
            share = (sync_time(first.device) - started - (capture_seconds() - captures_before)) / len(members)
            for slot, i in enumerate(members):
                p, training = prepared[i], done[i]
                training.steps += steps_per_epoch
                _load(p, engine.run_weights(slot))
                try:
                    with p.frozen_view():
                        end_epoch(p, p.model, session, training, epoch, steps_per_epoch, float(losses[slot]), share,
                                  on_epoch[i])
                except FloatingPointError as error:
                    outcome[i] = error
        step = engine.captured  # "captured" only where no step fell back to eager after a failed capture
        name = "stacked" if step is None or not step.replayed else "captured in part" if step.fell_back else "captured"
    finally:
        engine.release()  # its captured step refers back to it: without this its memory waits for the cycle collector
    for training in done:
        exact = ", exact dropout" if random_states else ""
        training.engine = f"{name} ({len(prepared)} run{'s' if len(prepared) != 1 else ''}{exact})"
    return outcome


def _alone(config: RunConfig, session: Session, device, on_epoch: EpochCallback | None,
           use_prefix_cache: bool) -> RunRecord | Exception:
    """One run of a group that cannot be stacked, trained by the solo engine; the error that failed it is its
    result, as a stacked run's would be, so the group's other runs still train."""
    try:
        return run(config, device, progress=False, on_epoch=on_epoch, use_prefix_cache=use_prefix_cache,
                   session=session)
    except Exception as error:
        return error


def _batches(p: Prepared) -> Callable:
    return lambda indices: p.inputs("train", indices)


@torch.no_grad()
def _load(p: Prepared, weights: dict[str, torch.Tensor]) -> None:
    for name, param in p.model.named_parameters():
        if param.requires_grad:
            param.copy_(weights[name])
