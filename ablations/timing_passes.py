"""`python -m ablations.timing_passes --storage URL --study-name S`: each work shape's timing passes side by side.

A record's `train_seconds` comes from one timing pass of its work shape (README: How training time is measured),
and its interval covers the spread of that pass's repeats, not how far the machine drifts between passes. A study
extended later (more rates, more seeds) can hold two passes of one shape taken hours apart, and a table row may
then divide a time from one pass by a time from the other. This table shows every pass of every shape: when it
was taken, how many runs use it, their mean `train_seconds`, and the speed-up against the baseline depth timed in
the same pass (the baseline's pass taken nearest in time), so the drift can be read off.
"""
from __future__ import annotations

import statistics
from datetime import datetime
from pathlib import Path

from core.cli import ArgumentParser, check_output_file, main_guard

# What makes two runs the same physical work shape in a report (with the device and the training-set size).
SHAPE_FIELDS = ("model", "dataset", "freeze_depth", "batch_size", "max_length", "max_train_samples", "precision")


def passes(records: list[dict]) -> dict[tuple, list[dict]]:
    """Per work shape, its timing passes in the order they were taken: when, which timing key, how many runs
    use it, and their mean train_seconds (steps at that pass's per-step cost plus each run's prefix build)."""
    shapes: dict[tuple, dict[tuple, list[float]]] = {}
    for record in records:
        timing = record.get("timing") or {}
        if not timing.get("measured_at"):
            continue  # untimed (--timing-repeats 0): its train_seconds are the loop as it ran, not a pass
        key = (tuple(record["config"].get(f) for f in SHAPE_FIELDS), record.get("device"), record.get("train_samples"))
        shapes.setdefault(key, {}).setdefault((timing["measured_at"], timing.get("shape")), []).append(
            record["train_seconds"])
    return {key: [{"measured_at": at, "shape": shape, "runs": len(seconds), "train_seconds": statistics.fmean(seconds)}
                  for (at, shape), seconds in sorted(found.items())]
            for key, found in shapes.items()}


def rows(records: list[dict], baseline_depth: int = 0) -> list[dict]:
    """One row per (shape, pass): the pass's mean train_seconds and its speed-up against the baseline depth's
    pass taken nearest in time, of otherwise the same shape (None where the baseline has no pass)."""
    found = passes(records)
    depth = SHAPE_FIELDS.index("freeze_depth")
    out = []
    for key in sorted(found, key=lambda k: tuple(str(v) for v in k[0]) + (str(k[1]), str(k[2]))):
        fields = list(key[0])
        fields[depth] = baseline_depth
        baseline = found.get((tuple(fields), key[1], key[2]), [])
        for index, timing in enumerate(found[key]):
            base = min(baseline, key=lambda b: abs(_when(b) - _when(timing)), default=None)
            out.append({"freeze_depth": key[0][depth], "pass": index + 1, **timing,
                        "baseline_at": base["measured_at"] if base else None,
                        "speedup": base["train_seconds"] / timing["train_seconds"] if base else None})
    return out


def _when(timing: dict) -> float:
    return datetime.fromisoformat(timing["measured_at"].replace("Z", "+00:00")).timestamp()


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
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (default: print only)")
    args = parser.parse_args()
    if args.output:
        check_output_file(args.output)
    from ablations.storage import load_runs
    records = [r["record"] for r in load_runs(args.storage, [args.study_name])
               if r["state"] == "COMPLETE" and r.get("record")]
    text = markdown(rows(records, args.baseline_depth), args.baseline_depth)
    print(text, end="")
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    main_guard(main)
