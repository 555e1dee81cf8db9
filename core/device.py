"""The choices a run makes by device: which device and precision, AdamW fused where torch has a kernel, the
learning-rate schedule (one definition for solo runs, groups and shared steps), gradient clipping that skips a
needless pass on the CPU, and a clock that waits for the device's queued work."""
from __future__ import annotations

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
    """'auto' means bf16 autocast where the hardware runs it natively (CUDA; CPUs with AVX512-BF16/AMX)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
            else "fp32"
    return "fp32"


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
