"""`python -m ablations.timing_check A_URL A_STUDY B_URL B_STUDY`: the same configs' training time in two studies.

Issue 12's check of the time axis: a grid run alone (A) and the same grid run under load (B: several workers, a
CPU hog). Each config's `train_seconds` (its solo cost from the timing pass) should agree within 20 % or be
marked contended; `loop seconds` (what the steps took as they ran) shows what the old time axis would have said.
"""
from __future__ import annotations

import re
from pathlib import Path

from core.cli import ArgumentParser, main_guard

TOLERANCE = 0.20


def by_config(url: str, study: str) -> dict[tuple, dict]:
    from ablations.storage import load_runs
    records = [r["record"] for r in load_runs(url, [study]) if r["state"] == "COMPLETE" and r.get("record")]
    return {(r["config"]["freeze_depth"], r["config"]["scheduler"], r["config"]["seed"]): r for r in records}


def compare(alone: dict[tuple, dict], loaded: dict[tuple, dict], quiet: bool = False) -> tuple[list[str], int]:
    """Markdown rows, and how many configs break the rule: off by more than 20 % and not marked contended, or
    (`quiet`: nothing but the project's own workers ran) off by more than 20 % or marked contended at all."""
    rows, broken = [], 0
    for key in sorted(alone.keys() & loaded.keys()):
        a, b = alone[key], loaded[key]
        ratio = b["train_seconds"] / a["train_seconds"]
        close = abs(ratio - 1) <= TOLERANCE
        ok = close and not b.get("contended") if quiet else close or bool(b.get("contended"))
        broken += not ok
        loop = b["train_loop_seconds"] / a["train_loop_seconds"] if a.get("train_loop_seconds") else float("nan")
        rows.append(f"| {key[0]} | {key[1]} | {_time(a)} | {_time(b)} | {ratio:.2f} | "
                    f"{'yes' if b.get('contended') else 'no'} | {loop:.2f} | {'✓' if ok else '✗'} | "
                    f"{_cores(a, 'foreign_cores')} | {_cores(b, 'foreign_cores')} | {_cores(b, 'paused_cores')} | "
                    f"{_build(b)} |")
    return rows, broken


def _build(record: dict) -> str:
    """The train split's frozen-prefix build, which train_seconds includes: "quiet", the foreign load it met
    (`prefix_cache.contended`, its evidence: "other processes kept 0.51 of 2 cores busy ..."), or — (no prefix)."""
    prefix = record.get("prefix_cache") or {}
    if not prefix.get("cached"):
        return "—"
    evidence = prefix.get("contended")
    if not evidence:
        return "quiet"
    found = re.search(r"kept ([\d.]+) of \d+ cores", evidence)
    return f"{found.group(1)} cores ⚠" if found else "contended ⚠"


def _cores(record: dict, field: str) -> str:
    """What the load probe measured while the record's timing ran (`core.lease.LoadProbe`): cores kept busy by
    processes outside the project (`foreign_cores`), or by the project's other workers while they waited for
    the lease (`paused_cores`: ~0 when they waited); — where the record has none."""
    value = (record.get("timing") or {}).get(field)
    return "—" if value is None else f"{value:.2f}"


def timed_at(records: list[dict]) -> str:
    """When the records' timings were taken: the first and last `measured_at`, UTC."""
    moments = sorted(t["measured_at"] for r in records if (t := r.get("timing") or {}).get("measured_at"))
    if not moments:
        return "no timing stored"
    first, last = (m.replace("T", " ").rstrip("Z") for m in (moments[0], moments[-1]))
    return f"{first} UTC" if first == last else f"{first} to {last} UTC"


def _time(record: dict) -> str:
    low, high = record.get("train_seconds_lo"), record.get("train_seconds_hi")
    interval = f" [{low:.1f}, {high:.1f}]" if low is not None and high is not None else ""
    return f"{record['train_seconds']:.1f}{interval}{' ⚠' if record.get('contended') else ''}"


def main() -> int:
    parser = ArgumentParser(prog="python -m ablations.timing_check", description=__doc__.splitlines()[0])
    parser.add_argument("alone_url", help="storage of the grid run alone")
    parser.add_argument("alone_study", help="its study")
    parser.add_argument("loaded_url", help="storage of the same grid run under load")
    parser.add_argument("loaded_study", help="its study")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (default: print only)")
    parser.add_argument("--quiet", action="store_true", help="B ran nothing but the project's own workers: its "
                        "times must be within 20 %% and none contended (default: B had foreign load too)")
    parser.add_argument("--what", default=None, help="how B ran, for the table's first line (default: two workers "
                        "on one storage, beside a CPU hog or, with --quiet, with nothing else running)")
    args = parser.parse_args()
    alone, loaded = by_config(args.alone_url, args.alone_study), by_config(args.loaded_url, args.loaded_study)
    rows, broken = compare(alone, loaded, args.quiet)
    device = next(iter(alone.values()))["device"] if alone else "unknown"
    what = args.what or ("two workers on one storage, nothing else running" if args.quiet else
                         "two workers beside a CPU hog")
    rule = f"within {TOLERANCE:.0%} of A and not marked contended" if args.quiet else \
        f"within {TOLERANCE:.0%} of A, or B marked contended"
    lines = [f"Same grid alone (A) and as {what} (B), device: {device}. A timed {timed_at(list(alone.values()))}; "
             f"B timed {timed_at(list(loaded.values()))}.", "",
             "| freeze depth | schedule | train s, A | train s, B | B / A | B contended | loop s B / A | rule | "
             "A foreign cores | B foreign cores | B paused cores | B prefix build |",
             "|--:|---|--:|--:|--:|:-:|--:|:-:|--:|--:|--:|:-:|", *rows, "",
             f"Rule: train_seconds in B {rule}. "
             f"{len(rows) - broken} of {len(rows)} configs keep it. 'loop s' is what the steps took as they ran "
             "(the time axis before this check). Foreign cores: cores other processes kept busy while the config's "
             "timing ran (the probe's `timing.foreign_cores`; above 0.25 marks it contended); paused cores: what "
             "the project's other workers used meanwhile (`timing.paused_cores`: they wait while one times); B prefix "
             "build: the foreign load B's frozen-prefix build met, which train_seconds includes (⚠ above 0.25)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 1 if broken else 0


if __name__ == "__main__":
    main_guard(main)
