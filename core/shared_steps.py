"""Shared steps: runs that differ only in their learning-rate schedule train identically until the schedules part.

Linear and cosine decay have the same warm-up (lr * t / W for t < W) and the same peak at step W, so in a
grid over schedulers each pair repeats the first ~10 % of a run step for step. A run told which configs the
process may train next (`siblings`) keeps a snapshot of its training state (trainable weights, optimizer
state, RNG state, running loss) at each step where a sibling's schedule departs from its own; a sibling that
finds one starts there instead of at step 0. Sharing stays within the first epoch and is exact: the sibling
sees the same weights, batches and dropout masks it would have computed itself (tested bit for bit).

What a run costs alone stays its `train_seconds`: a run that starts from a snapshot adds the seconds the
shared steps took when they ran (the record's `shared_steps` says how many, and from which run).
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import torch

from core.config import SCHEDULE_ONLY, RunConfig
from core.device import rate_multipliers

MIN_SHARED_STEPS = 2  # below this a snapshot costs about what it saves


def trajectory_key(config: RunConfig, **runtime) -> str:
    """Equal for two configs (and runtime settings: device, precision, cache) whose steps are the same
    arithmetic given the same learning rates."""
    fields = {k: v for k, v in config.to_dict().items() if k not in SCHEDULE_ONLY}
    text = json.dumps([fields, {k: str(v) for k, v in sorted(runtime.items())}], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def multipliers(config: RunConfig, steps_per_epoch: int) -> tuple[float, ...]:
    """The learning-rate multiplier of each step of the first epoch, as the run's scheduler computes it."""
    return rate_multipliers(config.scheduler, config.warmup_ratio, steps_per_epoch * config.epochs,
                            config.learning_rate)[:steps_per_epoch]


def common_steps(a: tuple[float, ...], b: tuple[float, ...]) -> int:
    """How many leading steps two multiplier sequences agree on."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Plan:
    """What one run shares: the snapshot it starts from (if any) and the steps after which it keeps one."""
    key: str
    rates: tuple[float, ...] | None
    resumed: "Snapshot | None"
    keep_at: frozenset[int]

    def record(self) -> dict | None:
        if self.resumed is None:
            return None
        return {"steps": self.resumed.steps, "from_run": self.resumed.run_id,
                "seconds": round(self.resumed.seconds, 3)}


def plan(store: "SharedSteps", config: RunConfig, siblings, steps_per_epoch: int, **runtime) -> Plan:
    """Find a snapshot for `config` in `store`, and the steps at which a sibling's learning rates part from its own."""
    key, rates = trajectory_key(config, **runtime), multipliers(config, steps_per_epoch)
    resumed = store.find(key, rates)
    first = max(MIN_SHARED_STEPS, resumed.steps + 1 if resumed else 0)
    keep_at = set()
    for other in siblings:
        if other.run_id != config.run_id and trajectory_key(other, **runtime) == key:
            n = common_steps(rates, multipliers(other, steps_per_epoch))
            if n >= first:
                keep_at.add(n)
    return Plan(key, rates, resumed, frozenset(keep_at))


@dataclass
class Snapshot:
    key: str
    multipliers: tuple[float, ...]   # of the steps taken so far
    run_id: str                      # the run that took them
    params: list[torch.Tensor]       # trainable parameters, host copies
    optimizer: dict                  # optimizer.state_dict(), host copies
    cpu_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    loss_sum: torch.Tensor
    seconds: float                   # training time of these steps when they ran (cumulative over snapshots)
    scaler: dict | None = None       # fp16's loss scale and its growth count (GradScaler.state_dict())

    @property
    def steps(self) -> int:
        return len(self.multipliers)


class SharedSteps:
    """A session's snapshots, the `capacity` most recent kept: one by default, since the grid trains schedule
    siblings back to back, and a snapshot holds three copies of the trainable weights (weights, two moments)."""

    def __init__(self, capacity: int = 1):
        self.capacity = capacity
        self.entries: OrderedDict[tuple[str, int], Snapshot] = OrderedDict()

    def find(self, key: str, wanted: tuple[float, ...]) -> Snapshot | None:
        """The snapshot furthest along whose steps used the learning rates `wanted` begins with."""
        matching = [s for s in self.entries.values()
                    if s.key == key and s.steps <= len(wanted) and wanted[:s.steps] == s.multipliers]
        best = max(matching, key=lambda s: s.steps, default=None)
        if best is not None:
            self.entries.move_to_end((best.key, best.steps))
        return best

    def take(self, key: str, wanted: tuple[float, ...], run_id: str, params, optimizer, device, loss_sum,
             seconds: float, scaler: torch.amp.GradScaler | None = None) -> None:
        """Keep the state after the steps `wanted` (their count is the snapshot's step)."""
        device = torch.device(device)
        state = optimizer.state_dict()
        snapshot = Snapshot(
            key, tuple(wanted), run_id, [p.detach().to("cpu", copy=True) for p in params],
            {"state": _to_host(state["state"]), "param_groups": copy.deepcopy(state["param_groups"])},
            torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            loss_sum.detach().to("cpu", copy=True), seconds,
            scaler.state_dict() if scaler is not None and scaler.is_enabled() else None)
        self.entries[(key, snapshot.steps)] = snapshot
        self.entries.move_to_end((key, snapshot.steps))
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    @staticmethod
    def restore(snapshot: Snapshot, params, optimizer, schedule, device, loss_sum,
                scaler: torch.amp.GradScaler | None = None) -> None:
        """Put a run at the snapshot's step: weights, optimizer moments, schedule position, fp16's loss scale, RNG,
        running loss."""
        device = torch.device(device)
        with torch.no_grad():
            for p, saved in zip(params, snapshot.params):
                p.copy_(saved)
            loss_sum.copy_(snapshot.loss_sum)
        # A copy: load_state_dict keeps tensors that already have the right device and dtype, and the next
        # step would update the snapshot's moments in place under a third sibling.
        optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
        # The schedule goes on from the snapshot's step with this run's own multipliers.
        schedule.last_epoch = snapshot.steps
        schedule._step_count = snapshot.steps + 1
        rates = [group["initial_lr"] * fn(snapshot.steps) for group, fn in zip(optimizer.param_groups,
                                                                                schedule.lr_lambdas)]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        schedule._last_lr = rates
        if snapshot.scaler is not None and scaler is not None:
            scaler.load_state_dict(snapshot.scaler)
        torch.set_rng_state(snapshot.cpu_rng)
        if snapshot.cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(snapshot.cuda_rng, device)

    def clear(self) -> None:
        self.entries.clear()


def _to_host(state: dict) -> dict:
    return {k: {name: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for name, v in per_param.items()} for k, per_param in state.items()}

