"""What a run's two CPU settings buy, measured on one model: freed host memory kept for reuse (`core.host_memory`)
and fused AdamW (`core.device.make_optimizer`).

- page faults: minor page faults (`getrusage` ru_minflt) and ms per step over `steps` of the project's solo
  training step (`core.engine_timing`'s eager step: forward, backward, clipping, fused AdamW) at freeze depth 0,
  after `warmup` untimed steps; each setting in a process of its own (`mallopt` is per process and cannot be
  undone), the two processes alternating for `rounds` rounds. The counts are a property of the allocator, not of
  the load. Beside the wall time per step, the process's CPU time and its system part (where faulting in and
  zeroing pages is paid): on a shared machine the wall time moves with the other processes, so what is kept is
  each round's ratio, reuse / default, and the rounds' range.
- AdamW: ms per `optimizer.step()` on every parameter of the model (what a depth-0 run updates) with fixed random
  gradients, torch's fused kernel against the per-tensor loop (`foreach=False`) and the multi-tensor one
  (`foreach=True`), interleaved for `rounds` rounds; what is kept is the median over rounds of each one's ratio to
  the fused update of the same round, in wall time and in process CPU time, and the rounds' range.
`python -m ablations.benchmark --cpu-settings` runs both; `python -m core.host_costs` is one fault-counting process.
"""
from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from core.errors import UsageError

TIMES = ("ms_per_step", "cpu_ms_per_step", "system_ms_per_step")  # wall; process CPU; its part in the kernel
ADAMW = {"fused": {"fused": True}, "per-tensor": {"foreach": False}, "foreach": {"foreach": True}}


def _ratio_summary(values: list[float | None]) -> dict:
    """Median and range of per-round ratios; a round whose denominator was 0 (too short to register) has none."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"median": None, "low": None, "high": None, "rounds": values}
    return {"median": round(statistics.median(kept), 3), "low": round(min(kept), 3), "high": round(max(kept), 3),
            "rounds": [None if v is None else round(v, 3) for v in values]}


def fault_probe(model: str, batch_size: int, length: int, steps: int, warmup: int) -> dict:
    """In this process: the setting applied as a CPU run applies it (unless ABLATIONS_KEEP_GLIBC_MALLOC=1), then
    the minor page faults and ms per step of `steps` training steps after `warmup` untimed ones."""
    from core.host_memory import reuse_freed_memory
    reused = reuse_freed_memory()
    import torch

    from core.config import RunConfig
    from core.device import autocast_for, precision_for
    from core.engine_timing import _batches, _eager
    from core.model import load_pretrained
    device = torch.device("cpu")
    precision = precision_for("auto", device)
    config = RunConfig(model=model, dataset="timing", freeze_depth=0, batch_size=batch_size, epochs=1,
                       scheduler="constant", max_length=max(8, length), learning_rate=1e-5, precision=precision)
    pristine = load_pretrained(model, ["0", "1"])
    torch.manual_seed(0)
    step = _eager(pristine, 0, config, _batches(pristine[0], 0, batch_size, length, 8, device), device,
                  lambda: autocast_for(precision, "cpu"))
    for _ in range(warmup):
        step()
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)

    def per_step(value: float) -> float:
        return round(value / steps * 1e3, 2)
    return {"reuse_freed_memory": reused, "precision": precision, "threads": torch.get_num_threads(),
            "minor_faults": after.ru_minflt - before.ru_minflt, "ms_per_step": per_step(seconds),
            "cpu_ms_per_step": per_step(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime),
            "system_ms_per_step": per_step(after.ru_stime - before.ru_stime)}


def _probe_process(model: str, batch_size: int, length: int, steps: int, warmup: int, reuse: bool) -> dict:
    root = str(Path(__file__).resolve().parents[1])  # this checkout's core, whatever the editable install says
    env = {**os.environ, "ABLATIONS_KEEP_GLIBC_MALLOC": "0" if reuse else "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run([sys.executable, "-m", "core.host_costs", model, str(batch_size), str(length), str(steps),
                           str(warmup)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UsageError(f"the fault-counting process failed: {tail[0][:300]}")  # one line, as the benchmark's
    return json.loads(done.stdout.strip().splitlines()[-1])


def page_faults(model: str, batch_size: int = 16, length: int = 32, steps: int = 20, warmup: int = 5,
                rounds: int = 3) -> dict:
    """Glibc's default against the reuse setting, one process each, alternating for `rounds` rounds."""
    runs = {"default": [], "reuse": []}
    for _ in range(rounds):
        for name in runs:
            runs[name].append(_probe_process(model, batch_size, length, steps, warmup, reuse=name == "reuse"))
    per_step = {name: [r["minor_faults"] / steps for r in rows] for name, rows in runs.items()}
    return {"steps": steps, "warmup": warmup, "batch_size": batch_size, "length": length, "freeze_depth": 0,
            "precision": runs["default"][0]["precision"], "threads": runs["default"][0]["threads"],
            "applied": {name: [r["reuse_freed_memory"] for r in rows] for name, rows in runs.items()},
            "minor_faults_per_step": {name: round(statistics.median(v)) for name, v in per_step.items()},
            "minor_faults_rounds": {name: [r["minor_faults"] for r in rows] for name, rows in runs.items()},
            **{f"{key}_rounds": {name: [r[key] for r in rows] for name, rows in runs.items()} for key in TIMES},
            **{f"reuse_vs_default_{key}": _ratio_summary([r[key] / d[key] if d[key] else None
                                                          for r, d in zip(runs["reuse"], runs["default"])])
               for key in TIMES}}


def adamw_times(model: str, steps: int = 10, warmup: int = 2, rounds: int = 5) -> dict:
    """ms per AdamW update of every parameter of `model`, each implementation on its own copy, interleaved."""
    import torch

    from core.backbone import decay_groups
    from core.model import load_pretrained
    pristine = load_pretrained(model, ["0", "1"])[0]
    generator = torch.Generator().manual_seed(0)
    optimizers = {}
    for name, kwargs in ADAMW.items():
        model_copy = pristine if name == "fused" else copy.deepcopy(pristine)
        for parameter in model_copy.parameters():
            parameter.grad = torch.randn(parameter.shape, generator=generator) * 1e-3
        optimizers[name] = torch.optim.AdamW(decay_groups(model_copy, 0.01), lr=1e-4, **kwargs)
    times = {name: [] for name in optimizers}
    cpu_times = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, optimizer in optimizers.items():
            for _ in range(warmup):
                optimizer.step()
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(steps):
                optimizer.step()
            times[name].append((time.perf_counter() - started) / steps * 1e3)
            cpu_times[name].append((time.process_time() - cpu_started) / steps * 1e3)

    def against_fused(values: dict[str, list[float]]) -> dict:
        return {name: _ratio_summary([t / f if f else None for t, f in zip(v, values["fused"])])
                for name, v in values.items() if name != "fused"}
    return {"parameters": sum(p.numel() for p in pristine.parameters()), "steps": steps, "warmup": warmup,
            "threads": torch.get_num_threads(),
            "ms_per_step": {name: round(statistics.median(v), 2) for name, v in times.items()},
            "rounds_ms": {name: [round(t, 2) for t in v] for name, v in times.items()},
            "rounds_cpu_ms": {name: [round(t, 2) for t in v] for name, v in cpu_times.items()},
            "vs_fused": against_fused(times), "cpu_vs_fused": against_fused(cpu_times)}


def cpu_settings(model: str, batch_size: int = 16, length: int = 32, steps: int = 20, rounds: int = 5) -> dict:
    """Both measurements, and where they ran."""
    import torch

    from core.model import device_name
    return {"page_faults": page_faults(model, batch_size, length, steps, rounds=rounds),
            "adamw": adamw_times(model, steps, rounds=rounds), "rounds": rounds,
            "device_name": device_name(torch.device("cpu")), "torch": torch.__version__,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


if __name__ == "__main__":
    model, batch_size, length, steps, warmup = sys.argv[1], *map(int, sys.argv[2:6])
    print(json.dumps(fault_probe(model, batch_size, length, steps, warmup)))
