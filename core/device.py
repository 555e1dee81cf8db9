"""The choices a run makes by device: which device and precision (autocast, fp16's loss scaling), AdamW fused where
torch has a kernel, the learning-rate schedule (one definition for solo runs, groups and shared steps), gradient
clipping that skips a needless pass on the CPU, and a clock that waits for the device's queued work."""
from __future__ import annotations

import contextlib
import functools
import math
import time

import torch
from transformers import get_scheduler

from core.config import RunConfig, has_closed_form
from core.errors import UsageError
from core.model import decay_groups


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device `--device` names (None: the default), or one line saying why this machine has no such device:
    `--device cuda` on a CPU-only build ended in a traceback from inside torch."""
    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {str(name)!r} is unknown: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {str(name)!r} is not supported: use cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and count == 0:
        raise UsageError(f"--device {str(name)!r}: torch sees no CUDA device on this machine (torch "
                         f"{torch.__version__}): use --device cpu, or leave --device out")
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise UsageError(f"--device {str(name)!r}: this machine has {count} CUDA device(s): use cuda:0 to "
                         f"cuda:{count - 1}")
    return device


def precision_for(precision: str, device: torch.device) -> str:
    """'auto' means bf16 autocast where the hardware runs it natively (CUDA from Ampere on; CPUs with
    AVX512-BF16/AMX), fp16 autocast with loss scaling on older CUDA cards (a T4, a V100: torch emulates bf16 there,
    slower than fp32, while their tensor cores run fp16), and fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu":
        return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
            else "fp32"
    return "fp32"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision: str, device_type: str, cache_enabled: bool = True):
    """The autocast context of a resolved precision (none for fp32). `cache_enabled=False` for a step captured as
    a CUDA graph: a weight cast cached during capture would live in memory the graph's pool may reuse."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=cache_enabled)


def loss_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (its range is narrow: small gradients would underflow to zero), torch's
    GradScaler with its defaults; for bf16 and fp32 a disabled scaler, whose every call passes straight through."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


class RunScales:
    """fp16's dynamic loss scaling for the N runs of a stacked group (`core.stacked`), each run its own scale, as
    its own GradScaler (torch's defaults: 2^16, x2 after 2,000 steps without overflow, x0.5 and the step skipped
    on one) would keep it alone, with the same kernels. Device tensors only: no host sync, so a captured step
    holds it."""

    def __init__(self, runs: int, device: torch.device):
        defaults = torch.amp.GradScaler(torch.device(device).type)
        self.growth_factor, self.backoff_factor = defaults.get_growth_factor(), defaults.get_backoff_factor()
        self.growth_interval = defaults.get_growth_interval()
        self.scale = torch.full((runs,), defaults.get_scale(), device=device)
        self.growth_tracker = torch.zeros(runs, dtype=torch.int32, device=device)
        self.found_inf = torch.zeros(runs, device=device)

    def unscale(self, run_grads: list[list[torch.Tensor]]) -> None:
        """Divide each run's gradients by its scale and note in `found_inf` whether any is inf or NaN."""
        self.found_inf.zero_()
        inverse = self.scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
        for run, grads in enumerate(run_grads):
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf[run:run + 1],
                                                             inverse[run:run + 1])

    def update(self) -> None:
        """Back off the scale of each run that overflowed; grow it after `growth_interval` clean steps."""
        for run in range(len(self.scale)):
            torch._amp_update_scale_(self.scale[run:run + 1], self.growth_tracker[run:run + 1],
                                     self.found_inf[run:run + 1], self.growth_factor, self.backoff_factor,
                                     self.growth_interval)

    def state(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scales and growth counts of the runs in slots `keep`, on the host (a narrowed group goes on)."""
        return self.scale.index_select(0, keep).cpu(), self.growth_tracker.index_select(0, keep).cpu()

    def load(self, scale: torch.Tensor, growth_tracker: torch.Tensor) -> None:
        self.scale.copy_(scale)
        self.growth_tracker.copy_(growth_tracker)


def make_optimizer(model, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel (CUDA; CPU since torch 2.4): the update of every trainable
    parameter, embeddings included, is otherwise a chain of small ops that costs as much as the backward pass."""
    groups = decay_groups(model, config.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=config.learning_rate, fused=device.type in ("cuda", "cpu"))
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=config.learning_rate)


def make_schedule(optimizer: torch.optim.Optimizer, config: RunConfig, total_steps: int):
    """The run's schedule: `transformers.get_scheduler` with ceil(warmup_ratio x total_steps) warm-up steps."""
    return _schedule(optimizer, config.scheduler, config.warmup_ratio, total_steps)


def _schedule(optimizer: torch.optim.Optimizer, scheduler: str, warmup_ratio: float, total_steps: int):
    return get_scheduler(scheduler, optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps),
                         num_training_steps=total_steps)


@functools.lru_cache(maxsize=64)  # a grid's runs ask for the same few schedules again and again
def rate_multipliers(scheduler: str, warmup_ratio: float, total_steps: int, learning_rate: float
                     ) -> tuple[float, ...]:
    """Every step's learning rate as a multiple of the base rate, read in closed form from the schedule's lambda
    (what LambdaLR multiplies the base rate by before that step). The base rate matters: the polynomial
    schedule's lambda divides by it. Every schedule a RunConfig accepts is a LambdaLR (`core.config.step_schedulers`
    refuses others), so anything else is an error here, not a second, stepped way to the same table."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=learning_rate)
    schedule = _schedule(optimizer, scheduler, warmup_ratio, total_steps)
    if not has_closed_form(schedule):
        raise ValueError(f"schedule {scheduler!r} is a {type(schedule).__name__}, not a LambdaLR with one lambda: "
                         "its learning rates have no closed form (core.config.step_schedulers refuses it)")
    return tuple(float(schedule.lr_lambdas[0](step)) for step in range(total_steps))


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, device: torch.device) -> None:
    """`clip_grad_norm_`, minus its multiply-by-one on the CPU: there reading the norm costs no device sync, so
    the rescale (a pass over every gradient) runs only when the norm is above `max_norm`. Same result."""
    if device.type != "cpu" or not hasattr(torch.nn.utils, "get_total_norm"):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norm = torch.nn.utils.get_total_norm([g.grad for g in params if g.grad is not None])
    if norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def sync_time(device: torch.device) -> float:
    """`time.perf_counter()` once the device has finished what is queued on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
