"""The training step captured once per length bucket as a CUDA graph and replayed (`--engine captured`).

At batch 16 a small encoder's step is bound by kernel launches, not arithmetic (issue 14's stand-alone probes:
25 ms eager vs 2.7 ms replayed on an H100). What is captured is the stacked step of `core.stacked.StackedRuns`
(a group of one run included), wired in through its `capture` argument (`core.group.train_group`). A graph
needs static shapes and no host syncs, so:
- every step is padded to batch-size rows per run and the shortest of a few length buckets (`buckets_for`,
  `bucket_for`) that holds it, and copied into that bucket's static buffers;
- the learning rate of every step lives in a device table (`LearningRates`); the step reads a device tensor
  and advances its own index, so the schedule needs no host value inside an epoch;
- AdamW is torch's fused kernel with a tensor learning rate, on gradient buffers that stay in place;
- autocast runs without its weight-cast cache (`core.device.autocast_for(..., cache_enabled=False)`), as
  PyTorch's CUDA-graph notes require; fp16's per-run loss scales are device tensors (`core.device.RunScales`);
- the first `warmup` steps of a bucket run eagerly (they are real training steps), the next one is captured
  and replayed; every step executes exactly once.
Capture is tried in a child process first (`probe_capture`): capturing Hugging Face DistilBERT crashed the
process (segfault) on an H100, and a crash must not take the run with it. Where capture is unavailable (a
CPU, a failed probe, an error while capturing) the step runs eagerly, and one log line says why — except where
the device ran out of memory capturing a group's first epoch: that group is trained again in halves
(`oom_raises`, `ablations.runner.make_group_trainer`), since a smaller captured group beats a larger eager one.
"""
from __future__ import annotations

import functools
import logging
import subprocess
import sys
from typing import Callable

import numpy as np
import torch

from core.device import sync_time
from core.errors import UsageError

ENGINES = ("auto", "eager", "captured", "stacked")
DEFAULT_BUCKETS = (32, 64, 128, 256, 512)
log = logging.getLogger(__name__)


def resolve_engine(requested: str, device) -> str:
    """`auto` is the eager step on the CPU (capture needs CUDA; stacking MiniLM pays little on the 2-core CPU, and
    not at every depth: N = 2 / 4 took 0.84x / 0.85x the eager ms per run-step at depth 3 but 0.93x / 0.99x at depth
    0, one run stacked 1.10x / 1.04x, single rounds from 30 % below to 37 % above their median:
    results/step_times_cpu.json) and the captured step on CUDA (no GPU has run it yet: issue 14's figures are not
    measured). `core.group.choose_engine` makes the final choice (probe, group size)."""
    if requested not in ENGINES:
        raise UsageError(f"--engine {requested!r} is unknown: use one of {', '.join(ENGINES)}")
    if requested == "auto":
        return "captured" if torch.device(device).type == "cuda" else "eager"
    return requested


def buckets_for(max_length: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The bucket lengths a run with `max_length` uses: the defaults below it, and max_length itself."""
    return tuple(b for b in buckets if b < max_length) + (max_length,)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The shortest bucket that holds `length` tokens."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise ValueError(f"a batch of {length} tokens is longer than the largest bucket ({max(buckets)})")


class LearningRates:
    """Every step's learning rate per run as a device table; `current[i]` is run i's rate for this step and
    `advance()` (device ops only, so it can live inside a captured graph) moves to the next step."""

    def __init__(self, table: np.ndarray, device):
        device = torch.device(device)
        dtype = torch.float32 if device.type == "cuda" else torch.float64  # fused CUDA AdamW reads a float lr
        self.table = torch.as_tensor(np.asarray(table), dtype=dtype, device=device)      # [steps, runs]
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.current = self.table[0].clone()
        self.views = [self.current[i] for i in range(self.table.shape[1])]  # stable storage the graph reads

    def advance(self) -> None:
        self.index.add_(1).clamp_(max=self.table.shape[0] - 1)
        self.current.copy_(self.table.index_select(0, self.index)[0])

    def start_at(self, step: int) -> None:
        """Go to step `step` of the table (a group narrowed mid-training goes on from where it stood)."""
        self.index.fill_(min(step, self.table.shape[0] - 1))
        self.current.copy_(self.table[int(self.index)])


def fill_static(static: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Copy one step's tensors (already padded to the bucket) into the bucket's static buffers."""
    for key, buffer in static.items():
        if values[key].shape != buffer.shape:
            raise ValueError(f"{key} of shape {tuple(values[key].shape)} does not fit its bucket buffer "
                             f"{tuple(buffer.shape)}: pad the batch to the bucket first")
        buffer.copy_(values[key], non_blocking=True)


class CapturedStep:
    """`body(static_tensors) -> loss`, eager for the first `warmup` calls of a bucket, then captured once and
    replayed. `enabled=False` (or a failed capture) runs every call eagerly, with one log line saying why."""

    needs_cuda = True

    def __init__(self, body: Callable[[dict], torch.Tensor], device, enabled: bool, reason: str = "",
                 warmup: int = 3, reset: Callable[[], None] | None = None):
        """`reset` runs after a failed capture, before that step runs eagerly (e.g. drop half-recorded grads)."""
        self.body, self.device, self.warmup, self.reset = body, torch.device(device), warmup, reset
        self.enabled = enabled and (self.device.type == "cuda" or not self.needs_cuda)
        self.static: dict[object, dict[str, torch.Tensor]] = {}
        self.calls: dict[object, int] = {}
        self.replays: dict[object, Callable[[], torch.Tensor]] = {}
        self.replayed = 0  # steps that ran as a replayed graph (the record says "captured" only if any did)
        self.fell_back = False  # a capture failed and later steps ran eagerly (the record says "captured in part")
        self.capture_seconds = 0.0  # spent recording graphs: warm-up, not training time (kept out of the loop's time)
        self.stream = None
        self.why = ""  # why the step runs eagerly, once it does
        # Running out of memory while capturing raises (the caller trains the group again smaller) instead of going
        # on eagerly: `core.group.train_group` sets it for a group of several runs until its first epoch ends.
        self.oom_raises = False
        if not self.enabled:
            self.why = reason or ("capture needs CUDA" if self.device.type != "cuda" else "capture switched off")
            log.warning("training step runs eagerly: %s", self.why)

    def __call__(self, bucket, values: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.enabled:
            return self.body(values)
        if bucket not in self.static:
            self.static[bucket] = {k: v.clone() for k, v in values.items()}
        static = self.static[bucket]
        fill_static(static, values)
        if bucket in self.replays:
            self.replayed += 1
            return self.replays[bucket]()
        self.calls[bucket] = self.calls.get(bucket, 0) + 1
        if self.calls[bucket] <= self.warmup:
            return self._warm(static)
        started = sync_time(self.device)
        try:
            self.replays[bucket] = self._capture(static)
        except Exception as error:  # noqa: BLE001 - any capture failure means: go on eagerly
            if self.oom_raises and (out_of_memory := _out_of_memory(error)) is not None:
                raise out_of_memory
            self.enabled, self.fell_back = False, True
            self.why = f"capturing it failed ({(str(error).splitlines() or [type(error).__name__])[0][:200]})"
            log.warning("training step runs eagerly: %s", self.why)
            if self.reset is not None:
                self.reset()
            self.capture_seconds += sync_time(self.device) - started
            return self.body(static)
        self.capture_seconds += sync_time(self.device) - started
        self.replayed += 1
        return self.replays[bucket]()

    def _warm(self, static: dict) -> torch.Tensor:
        """A real step, on a side stream as capture requires (the allocator sees the shapes first)."""
        if self.stream is None:  # one side stream for every warm-up: the allocator caches memory per stream
            self.stream = torch.cuda.Stream(self.device)
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            loss = self.body(static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return loss

    def _capture(self, static: dict) -> Callable[[], torch.Tensor]:
        """Record the step once; replaying it runs it. The capture itself computes nothing."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self.body(static)

        def replay() -> torch.Tensor:
            graph.replay()
            return loss
        return replay


def _out_of_memory(error: BaseException | None) -> torch.cuda.OutOfMemoryError | None:
    """The device's out-of-memory error behind `error`: itself, or the one that ending an aborted capture (which can
    raise in its turn) was handling."""
    while error is not None and not isinstance(error, torch.cuda.OutOfMemoryError):
        error = error.__cause__ or error.__context__
    return error


@functools.lru_cache(maxsize=16)  # one answer per (model, length, device, precision) for the process: seconds each
def probe_capture(model: str, length: int, device: str = "cuda", precision: str = "bf16",
                  command: tuple[str, ...] | None = None, timeout: float = 600.0) -> tuple[bool, str]:
    """Capture a step of `model` in `precision` (bf16, fp16 or fp32) in a child process; (True, "") if it
    replayed, else (False, why)."""
    if command is None:
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            return False, "capture needs CUDA"
        command = (sys.executable, "-m", "core.captured", "--probe", model, str(length), precision)
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"the capture probe did not finish within {timeout:.0f} s"
    if done.returncode == 0:
        return True, ""
    if done.returncode < 0:
        return False, f"the capture probe crashed (signal {-done.returncode}) on {model}"
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return False, f"the capture probe failed on {model}: {tail[0][:200]}"


def _probe(model_dir: str, length: int, precision: str) -> None:
    """Child process: three eager steps, one capture, two replays of one stacked run of `model_dir`."""
    from transformers import AutoModelForSequenceClassification

    from core.config import RunConfig
    from core.device import autocast_for
    from core.stacked import StackedRun, StackedRuns
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    config = RunConfig(model=model_dir, dataset="probe", freeze_depth=0, epochs=1, max_length=max(8, length))
    run = StackedRun(config, model, lambda i: {}, np.full(16, length), torch.zeros(16, dtype=torch.long))
    engine = StackedRuns([run], steps_per_epoch=8, pad_id=0, device="cuda",
                         autocast=lambda: autocast_for(precision, "cuda", cache_enabled=False), capture=CapturedStep,
                         buckets=(length,), loss_scaling=precision == "fp16")
    ids = torch.randint(5, model.config.vocab_size, (16, length), device="cuda")
    values = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "labels": torch.zeros(1, 16, dtype=torch.long, device="cuda"),
              "weights": torch.ones(1, 16, device="cuda")}
    engine.model.train()  # as training captures it: with dropout (from_pretrained leaves the model in eval mode)
    for _ in range(6):
        loss = engine.captured(length, values)
    torch.cuda.synchronize()
    if not engine.captured.replays:
        raise SystemExit("the step was not captured")
    if not torch.isfinite(loss).all():
        raise SystemExit("the replayed step gave a non-finite loss")


if __name__ == "__main__" and sys.argv[1:2] == ["--probe"]:
    _probe(sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "bf16")
