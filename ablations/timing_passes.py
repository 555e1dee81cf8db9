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
with an interval over the paired per-round ratios. It trains nothing that is stored; with `--store` the sitting
is kept with the study and its reports take every run's time from it (`retimed`, `ablations.stored_sitting`).
`time_study` is the grid's and the search's own sitting before their first run.
"""
from __future__ import annotations

import statistics
from datetime import datetime
from pathlib import Path

from ablations.stored_sitting import SITTING, shape_key, sitting_key, sitting_row, store_sitting
from core.cli import ArgumentParser, check_output_file, main_guard
from core.errors import UsageError


def shape_of(record: dict) -> tuple:
    """Equal for runs whose training costs the same: the fields a work shape is made of (every config field but
    `core.config.COST_FREE`, as `core.timing.work_shape`), the epochs (they multiply the steps of the compared
    totals), the device and the training-set size. Sorted by freeze depth first."""
    return shape_key(record["config"], record.get("device"), record.get("train_samples"))


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

    import numpy as np

    from core.config import RunConfig
    from core.sitting import prepared_shapes
    from core.timing import per_step_interval

    configs: dict[tuple, RunConfig] = {}
    for record in records:
        configs.setdefault(shape_of(record), RunConfig.from_dict(record["config"]))
    configs = {key: configs[key] for key in sorted(configs, key=lambda k: (k[0], str(k[1:])))}
    with contextlib.ExitStack() as views:
        shapes = prepared_shapes(configs, session, device, views)
        first = next(iter(shapes.values()))
        timings = session.timer.interleaved({k: s.step for k, s in shapes.items()},
                                            {k: s.batches for k, s in shapes.items()}, first.device, rounds,
                                            first.device_label)
    per_round = {key: t.repeat_seconds for key, t in timings.items()}
    totals = {key: (s.steps, s.prefix_seconds) for key, s in shapes.items()}
    train = {key: np.array(per_round[key]) * totals[key][0] + totals[key][1] for key in per_round}
    rows = []
    for key in per_round:
        baseline = baseline_of(key, baseline_depth)
        ratio = per_step_interval(list(train[baseline] / train[key])) if baseline in train else (None, None, None)
        rows.append({**sitting_row(sitting_key(configs[key].to_dict(), timings[key].device, key[4]), timings[key],
                                   totals[key][1], shapes[key].prefix_evidence),
                     "device": timings[key].device, "freeze_depth": key[0], "steps": totals[key][0],
                     "train_seconds": float(train[key].mean()), "speedup": ratio[0], "speedup_low": ratio[1],
                     "speedup_high": ratio[2]})
    return rows




def stored_note(url: str, study_name: str) -> str:
    """A line under the passes when the study holds a stored sitting: the time axis its reports use instead."""
    import optuna

    from ablations.storage import open_storage
    sitting = optuna.load_study(study_name=study_name, storage=open_storage(url)).user_attrs.get(SITTING)
    if sitting is None:
        return ""
    return (f"\nThe study holds a stored sitting of {len(sitting['shapes'])} work shapes, timed together at "
            f"{_clock(sitting['measured_at'])} UTC: its reports take every run's time from it, not from these "
            "passes.\n")


def interleaved_markdown(rows: list[dict], baseline_depth: int = 0) -> str:
    said = next((row for row in rows if row["contended"]), rows[0] if rows else None)  # a loaded prefix build too
    lines = [f"Timed in one sitting, round-robin over {rows[0]['rounds'] if rows else 0} rounds "
             f"({'contended: ' if said and said['contended'] else ''}{said['evidence'] if said else ''}).",
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
    parser.add_argument("--store", action="store_true", help="with --interleave: keep the sitting with the study; "
                        "its reports then take every run's time from it (default: print only)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (default: print only)")
    args = parser.parse_args()
    if args.rounds < 2:
        raise UsageError(f"--rounds {args.rounds} is invalid: an interval needs at least 2")
    if args.store and not args.interleave:
        raise UsageError("--store keeps a sitting: add --interleave")
    if args.output:
        check_output_file(args.output)
    from ablations.storage import existing_storage, load_runs
    from ablations.tradeoff import completed_runs
    args.storage = existing_storage(args.storage)
    records = [r["record"] for r in completed_runs(load_runs(args.storage, [args.study_name], retime=False))]
    if not records:
        raise UsageError(f"study {args.study_name!r} has no completed runs to read timings from")
    found = None
    if args.interleave:
        from core.session import Session
        found = interleaved(records, Session(), args.device, args.rounds, args.baseline_depth)
        text = interleaved_markdown(found, args.baseline_depth)
    else:
        text = markdown(rows(records, args.baseline_depth), args.baseline_depth) + stored_note(args.storage,
                                                                                             args.study_name)
    print(text, end="")
    if args.output:
        args.output.write_text(text)  # the measurement is kept even where it cannot be stored
    if args.store:
        elsewhere = sorted({str(r.get("device")) for r in records} - {row["device"] for row in found})
        if elsewhere:
            raise UsageError(f"the study ran on {', '.join(elsewhere)}, this sitting on {found[0]['device']}: a "
                             "sitting stands in only for times taken on its own hardware; not stored")
        store_sitting(args.storage, args.study_name, found)
        print(f"stored with study {args.study_name!r}: its reports now take every run's time from this sitting")
    return 0


if __name__ == "__main__":
    main_guard(main)
