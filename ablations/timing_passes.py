"""`python -m ablations.timing_passes --storage URL --study-name S`: each work shape's timing passes side by side.

A record's `train_seconds` comes from one timing pass of its work shape (README: How training time is measured),
and its interval covers the spread of that pass's repeats, not how far the machine drifts between passes. A study
extended later (more rates, more seeds) can hold two passes of one shape taken hours apart, and a table row may
then divide a time from one pass by a time from the other. This table shows every pass of every shape: when it
was taken, how many runs use it, their mean `train_seconds`, and the speed-up against the baseline depth timed in
the same pass (the baseline's pass taken nearest in time), so the drift can be read off.

`--interleave` measures instead of reading: one run of every shape of the study is prepared again and all shapes
are timed in one sitting, round-robin (`core.timing.interleaved_steps`: each round times every shape's 10 sampled
batches once, alone on the machine), so minute-scale drift reaches every shape alike; each speed-up then comes
with an interval over the paired per-round ratios. It trains nothing that is stored.
"""
from __future__ import annotations

import statistics
from datetime import datetime
from pathlib import Path

from core.cli import ArgumentParser, check_output_file, main_guard
from core.errors import UsageError



def shape_of(record: dict) -> tuple:
    """Equal for runs whose training costs the same: the fields a work shape is made of (every config field but
    `core.config.COST_FREE`, as `core.timing.work_shape`), the epochs (they multiply the steps of the compared
    totals), the device and the training-set size. Sorted by freeze depth first."""
    from core.config import COST_FREE
    config = record["config"]
    fields = tuple(sorted((k, str(v)) for k, v in config.items() if k not in COST_FREE and k != "freeze_depth"))
    return config["freeze_depth"], fields, config.get("epochs"), record.get("device"), record.get("train_samples")


def baseline_of(key: tuple, depth: int) -> tuple:
    """The same shape at the baseline freeze depth."""
    return (depth, *key[1:])


def passes(records: list[dict]) -> dict[tuple, list[dict]]:
    """Per work shape, its timing passes in the order they were taken: when, which timing key, how many runs
    use it, and their mean train_seconds (steps at that pass's per-step cost plus each run's prefix build)."""
    shapes: dict[tuple, dict[tuple, list[float]]] = {}
    for record in records:
        timing = record.get("timing") or {}
        if not timing.get("measured_at"):
            continue  # untimed (--timing-repeats 0): its train_seconds are the loop as it ran, not a pass
        key = shape_of(record)
        shapes.setdefault(key, {}).setdefault((timing["measured_at"], timing.get("shape")), []).append(
            record["train_seconds"])
    return {key: [{"measured_at": at, "shape": shape, "runs": len(seconds), "train_seconds": statistics.fmean(seconds)}
                  for (at, shape), seconds in sorted(found.items())]
            for key, found in shapes.items()}


def rows(records: list[dict], baseline_depth: int = 0) -> list[dict]:
    """One row per (shape, pass): the pass's mean train_seconds and its speed-up against the baseline depth's
    pass taken nearest in time, of otherwise the same shape (None where the baseline has no pass)."""
    found = passes(records)
    out = []
    for key in sorted(found, key=lambda k: (k[0], str(k[1:]))):
        baseline = found.get(baseline_of(key, baseline_depth), [])
        for index, timing in enumerate(found[key]):
            base = min(baseline, key=lambda b: abs(_when(b) - _when(timing)), default=None)
            out.append({"freeze_depth": key[0], "pass": index + 1, **timing,
                        "baseline_at": base["measured_at"] if base else None,
                        "speedup": base["train_seconds"] / timing["train_seconds"] if base else None})
    return out


def _when(timing: dict) -> float:
    return datetime.fromisoformat(timing["measured_at"].replace("Z", "+00:00")).timestamp()


def interleaved(records: list[dict], session, device=None, rounds: int = 5, baseline_depth: int = 0) -> list[dict]:
    """Every shape of `records` timed again in one sitting, round-robin; per shape its per-step seconds and
    its training seconds (steps x per step + the prefix build, built now) per round, and the speed-up against
    the baseline depth with a Student-t interval over the paired rounds."""
    import contextlib
    import math

    import numpy as np

    from core.config import RunConfig
    from core.device import make_optimizer, make_schedule
    from core.timing import per_step_interval, sample_batches
    from core.train import _train_mode, prepare, timing_batches, train_step

    configs: dict[tuple, RunConfig] = {}
    for record in records:
        configs.setdefault(shape_of(record), RunConfig.from_dict(record["config"]))
    steps_fns, batches, totals = {}, {}, {}
    with contextlib.ExitStack() as views:
        for key in sorted(configs, key=lambda k: (k[0], str(k[1:]))):
            config = configs[key]
            p = prepare(config, session, device, False, True)  # the prefix build is timed alone here, as in a run
            views.enter_context(p.frozen_view())  # entered once, as a run's steps see it (each shape its own model)
            steps_per_epoch = math.ceil(len(p.train) / config.batch_size)
            optimizer = make_optimizer(p.model, config, p.device)
            scheduler = make_schedule(optimizer, config, steps_per_epoch * config.epochs)
            epoch, cost = timing_batches(p)
            _train_mode(p)
            steps_fns[key] = lambda indices, p=p, o=optimizer, s=scheduler: train_step(p, p.model, indices, o, s)
            batches[key] = sample_batches(epoch, session.timer.steps, cost)
            prefix = p.prefix["seconds"].get("train", 0.0) if p.cached else 0.0
            totals[key] = (steps_per_epoch * config.epochs, prefix, p.device)
        per_round, contention = session.timer.interleaved(steps_fns, batches, next(iter(totals.values()))[2],
                                                          rounds)
    train = {key: np.array(per_round[key]) * totals[key][0] + totals[key][1] for key in per_round}
    rows = []
    for key in per_round:
        mean, low, high = per_step_interval(per_round[key])
        baseline = baseline_of(key, baseline_depth)
        ratio = per_step_interval(list(train[baseline] / train[key])) if baseline in train else (None, None, None)
        rows.append({"freeze_depth": key[0], "per_step": mean, "per_step_low": low, "per_step_high": high,
                     "steps": totals[key][0], "prefix_seconds": totals[key][1],
                     "train_seconds": float(train[key].mean()), "speedup": ratio[0], "speedup_low": ratio[1],
                     "speedup_high": ratio[2], "rounds": len(per_round[key]), "contended": contention.contended,
                     "evidence": contention.evidence})
    return rows


def interleaved_markdown(rows: list[dict], baseline_depth: int = 0) -> str:
    lines = [f"Timed in one sitting, round-robin over {rows[0]['rounds'] if rows else 0} rounds "
             f"({'contended: ' if rows and rows[0]['contended'] else ''}{rows[0]['evidence'] if rows else ''}).",
             "", f"| freeze depth | ms per step [95 % CI over rounds] | steps | prefix build s | train s | "
             f"speed-up vs depth {baseline_depth} [95 % CI over paired rounds] |", "|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        speedup = "—" if row["speedup"] is None else \
            f"{row['speedup']:.2f}× [{row['speedup_low']:.2f}, {row['speedup_high']:.2f}]"
        lines.append(f"| {row['freeze_depth']} | {1000 * row['per_step']:.1f} [{1000 * row['per_step_low']:.1f}, "
                     f"{1000 * row['per_step_high']:.1f}] | {row['steps']} | {row['prefix_seconds']:.1f} | "
                     f"{row['train_seconds']:.1f} | {speedup} |")
    return "\n".join(lines) + "\n"


def markdown(table: list[dict], baseline_depth: int = 0) -> str:
    lines = ["| freeze depth | pass | timed at (UTC) | runs | train s (mean) | speed-up vs depth "
             f"{baseline_depth}, its pass nearest in time (timed at) |", "|--:|--:|---|--:|--:|--:|"]
    for row in table:
        speedup = f"{row['speedup']:.2f}× ({_clock(row['baseline_at'])})" if row["speedup"] else "—"
        lines.append(f"| {row['freeze_depth']} | {row['pass']} | {_clock(row['measured_at'])} | {row['runs']} | "
                     f"{row['train_seconds']:.1f} | {speedup} |")
    return "\n".join(lines) + "\n"


def _clock(measured_at: str) -> str:
    return measured_at.replace("T", " ").rstrip("Z")


def main() -> int:
    parser = ArgumentParser(prog="python -m ablations.timing_passes", description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="the ledger's URL, e.g. sqlite:///runs/ablations.db")
    parser.add_argument("--study-name", required=True, metavar="NAME", help="the study to read")
    parser.add_argument("--baseline-depth", type=int, default=0, metavar="K",
                        help="the freeze depth speed-ups are against (default: 0)")
    parser.add_argument("--interleave", action="store_true", help="time every shape again now, in one sitting, "
                        "round-robin, instead of listing the stored passes (default: list)")
    parser.add_argument("--rounds", type=int, default=5, metavar="N", help="rounds of --interleave (default: 5)")
    parser.add_argument("--device", default=None, help="device of --interleave (default: cuda when available)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (default: print only)")
    args = parser.parse_args()
    if args.rounds < 2:
        raise UsageError(f"--rounds {args.rounds} is invalid: an interval needs at least 2")
    if args.output:
        check_output_file(args.output)
    from ablations.storage import load_runs
    from ablations.tradeoff import completed_runs
    records = [r["record"] for r in completed_runs(load_runs(args.storage, [args.study_name]))]
    if not records:
        raise UsageError(f"study {args.study_name!r} has no completed runs to read timings from")
    if args.interleave:
        from core.session import Session
        text = interleaved_markdown(interleaved(records, Session(), args.device, args.rounds, args.baseline_depth),
                                    args.baseline_depth)
    else:
        text = markdown(rows(records, args.baseline_depth), args.baseline_depth)
    print(text, end="")
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    main_guard(main)
