"""`python -m ablations.benchmark`: the project's grid against plain Hugging Face Trainer runs, same configs,
same data, same machine, one invocation.

Three contenders over the cells freeze depths × schedulers (1 epoch by default):
- reference: `seed_recipe.py` as the reference study ran it (random batches, a checkpoint every epoch, the
  lowest-loss epoch reloaded at the end), one process per cell;
- tuned: the same script with `--tuned` (length-grouped batches, no checkpoints), one process per cell;
- project: one `python -m ablations.grid` command over all cells (fresh storage).
Wall time is measured around each process, start-up included, so the ratio is what a user waits.

`--step-times` instead times one training step per run of the engines (`core.engine_timing`): eager (the
solo step), stacked and, on CUDA, captured, at `--runs` runs per group (default 1,14,56; a CPU wants 1,2,4).
`--cpu-settings` instead measures what a run's two CPU settings buy (`core.host_costs`): the page faults and step
time of depth-0 training steps with and without freed memory kept for reuse, and fused against per-tensor AdamW.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.cli import ArgumentParser, main_guard
from core.errors import UsageError

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "seed_recipe.py"
# What each contender's seconds are: the key train_seconds does not mean the same thing for the Trainer and the project.
SECONDS = {
    "wall_seconds": "reference, tuned: their process per cell, start to exit; the project's is total_wall_seconds "
                    "(one grid command over every cell: start-up, on CUDA the capture probe, the timing pass and "
                    "evaluation included)",
    "train_seconds": "reference, tuned: Trainer.train() as it ran (steps, data loading, per-epoch evaluation on "
                     "validation; the reference also its per-epoch checkpoints and the best one's reload); project: "
                     "the run's steps timed alone (core.timing) times its step count, plus its frozen-prefix build, "
                     "no evaluation",
    "train_loop_seconds": "project: its steps as they ran in the grid's process (a stacked group's loop / runs)",
    "eval_seconds": "project: its per-epoch evaluation on the dev split and validation",
}


def _timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UsageError(f"benchmark command failed ({' '.join(command[:4])} ...): {tail[0][:300]}")
    return seconds, done.stdout


def recipe_run(args, depth: int, scheduler: str, tuned: bool) -> dict:
    command = [sys.executable, str(args.recipe), "--model", args.model, "--data", args.dataset,
               "--freeze-depth", str(depth), "--scheduler", scheduler, "--epochs", str(args.epochs),
               "--learning-rate", str(args.learning_rate), "--max-train-samples", str(args.max_train_samples),
               "--seed", str(args.seed)] + (["--tuned"] if tuned else [])
    seconds, out = _timed(command)
    result = json.loads(out.strip().splitlines()[-1])
    device = result.get("device", "cpu")
    return {"wall_seconds": seconds, "train_seconds": result["train_seconds"], "accuracy": result["accuracy"],
            "device": device,
            "precision": "bf16" if tuned and device != "cpu" else "fp32"}  # seed_recipe.py: bf16=a.tuned and cuda


def project_run(args, depths: list[int], schedulers: list[str], workdir: Path) -> tuple[float, dict]:
    command = [sys.executable, "-m", "ablations.grid", "--model", args.model, "--dataset", args.dataset,
               "--freeze-depths", ",".join(map(str, depths)), "--schedulers", ",".join(schedulers),
               "--epochs", str(args.epochs), "--learning-rate", str(args.learning_rate),
               "--max-train-samples", str(args.max_train_samples), "--seed", str(args.seed),
               "--output-dir", str(workdir), "--no-progress", "--no-report"] + args.project_args
    seconds, _ = _timed(command)
    from ablations.storage import load_runs
    runs = [r for r in load_runs(f"sqlite:///{workdir}/ablations.db") if r["state"] == "COMPLETE"]
    cells = {(r["params"]["freeze_depth"], r["params"]["scheduler"]): r["record"] for r in runs}
    return seconds, cells


def main() -> int:
    parser = ArgumentParser(prog="python -m ablations.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model folder (the same for every contender)")
    parser.add_argument("--dataset", help="folder with train.tsv and validation.tsv (not for --step-times)")
    parser.add_argument("--freeze-depths", default="0,3,6", metavar="LIST",
                        help="comma-separated depths or a range, e.g. 0,3,6 or 0-6 (default: 0,3,6)")
    parser.add_argument("--schedulers", default="linear,cosine", metavar="LIST",
                        help="comma-separated schedulers (default: linear,cosine)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every cell, one number (default: 1)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="learning rate (default: 1e-4)")
    parser.add_argument("--max-train-samples", type=int, default=2000, metavar="N",
                        help="training subsample (default: 2000)")
    parser.add_argument("--seed", type=int, default=42, help="training seed (default: 42)")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="the Trainer recipe script "
                        "(default: ../shared/bench/seed_recipe.py)")
    parser.add_argument("--skip-reference", action="store_true", help="time only the tuned Trainer and the project")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here "
                        "(default: print only)")
    parser.add_argument("--step-times", action="store_true",
                        help="time ms per run-step of the eager, stacked and (CUDA) captured engines instead")
    parser.add_argument("--cpu-settings", action="store_true",
                        help="measure page faults with and without core.host_memory's setting and fused against "
                             "per-tensor AdamW on the CPU instead")
    parser.add_argument("--runs", default="1,14,56", metavar="LIST",
                        help="--step-times: comma-separated runs per stacked group (default: 1,14,56)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="--step-times, --cpu-settings: rows per run and step (default: 16)")
    parser.add_argument("--length", type=int, default=32,
                        help="--step-times, --cpu-settings: tokens per row (default: 32)")
    parser.add_argument("--steps", type=int, default=20,
                        help="--step-times, --cpu-settings: timed steps per contender and round (default: 20)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--step-times, --cpu-settings: interleaved rounds, the median kept (default: 3)")
    parser.add_argument("project_args", nargs="*", help="extra flags for the project's grid (after --)")
    args = parser.parse_args()
    if args.step_times:
        return step_times_main(args)
    if args.cpu_settings:
        return cpu_settings_main(args)
    if not args.dataset:
        raise UsageError("--dataset is missing: give a folder with train.tsv and validation.tsv")
    if not args.recipe.is_file():
        raise UsageError(f"--recipe {str(args.recipe)!r} does not exist: point it at seed_recipe.py")
    from ablations.space import parse_choices, parse_int_list
    from core.config import SCHEDULERS
    depths = parse_int_list(args.freeze_depths, "--freeze-depths")
    schedulers = parse_choices(args.schedulers, "--schedulers", SCHEDULERS)
    cells = [(d, s) for d in depths for s in schedulers]

    rows = {cell: {} for cell in cells}
    with tempfile.TemporaryDirectory(prefix="benchmark-") as workdir:
        project_seconds, project_cells = project_run(args, depths, schedulers, Path(workdir))
    for cell in cells:
        record = project_cells[cell]
        rows[cell]["project"] = {key: record.get(key) for key in (
            "accuracy", "train_seconds", "train_loop_seconds", "eval_seconds", "device", "precision", "engine")}
        for name, tuned in (("reference", False), ("tuned", True)):
            if name == "reference" and args.skip_reference:
                continue
            rows[cell][name] = recipe_run(args, cell[0], cell[1], tuned)
            print(f"{name:9s} freeze {cell[0]} {cell[1]:7s}: {rows[cell][name]['wall_seconds']:6.1f} s wall, "
                  f"{rows[cell][name]['train_seconds']:6.1f} s train, accuracy {rows[cell][name]['accuracy']:.4f}",
                  flush=True)

    totals = {"project": project_seconds}
    for name in ("reference", "tuned"):
        if all(name in r for r in rows.values()):
            totals[name] = sum(r[name]["wall_seconds"] for r in rows.values())
    mean_accuracy = {name: sum(r[name]["accuracy"] for r in rows.values()) / len(rows)
                     for name in ("project", "reference", "tuned") if name in totals}
    print(f"\n{'cell':18s} " + " ".join(f"{n:>22s}" for n in ("reference", "tuned", "project")))
    for (depth, scheduler), r in rows.items():
        cols = [f"{r[n]['accuracy']:.4f} / {r[n].get('wall_seconds', r[n]['train_seconds']):6.1f} s"
                if n in r else "—" for n in ("reference", "tuned", "project")]
        print(f"freeze {depth} {scheduler:9s} " + " ".join(f"{c:>22s}" for c in cols))
    print("(project per cell: training seconds incl. its prefix-cache build; the others: process wall time)")
    for name, seconds in totals.items():
        ratio = f", {seconds / project_seconds:.2f}x the project's" if name != "project" else ""
        print(f"total {name:9s}: {seconds:7.1f} s wall, mean accuracy {mean_accuracy[name]:.4f}{ratio}")
    write_output(args, {"cells": {f"{d}-{s}": r for (d, s), r in rows.items()}, "total_wall_seconds": totals,
                        "seconds": SECONDS, "mean_accuracy": mean_accuracy})
    return 0


def write_output(args, result: dict) -> None:
    """`--output`: the result as JSON with the command's arguments (nothing without --output)."""
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({**result, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


def check_sizes(args) -> None:
    for name, value, least in (("--batch-size", args.batch_size, 1), ("--length", args.length, 8),
                               ("--steps", args.steps, 1), ("--rounds", args.rounds, 1)):
        if value < least:
            raise UsageError(f"{name} {value} is too small: use at least {least}")


def cpu_settings_main(args) -> int:
    check_sizes(args)
    from core.host_costs import cpu_settings
    from core.model import model_config
    model_config(args.model)  # a folder that holds no model is refused here, not in a child process
    result = cpu_settings(args.model, args.batch_size, args.length, args.steps, args.rounds)
    faults, adamw = result["page_faults"], result["adamw"]
    per_step = faults["minor_faults_per_step"]
    print(f"minor page faults a step: {per_step['default']:,} with glibc's default, {per_step['reuse']:,} with freed "
          f"memory reused; with reuse, a step's")
    for key, what in (("ms_per_step", "wall time"), ("cpu_ms_per_step", "CPU time"),
                      ("system_ms_per_step", "system CPU time")):
        ratio = faults[f"reuse_vs_default_{key}"]
        print(f"  {what}: {ratio['median']:.2f}x the default's (rounds {ratio['low']:.2f}-{ratio['high']:.2f})"
              if ratio["median"] is not None else f"  {what}: too short to register")
    print(f"AdamW over {adamw['parameters']:,} parameters, fused {adamw['ms_per_step']['fused']:.1f} ms a step:")
    for name, summary in adamw["vs_fused"].items():
        cpu = adamw["cpu_vs_fused"][name]
        print(f"  {name}: {summary['median']:.2f}x the fused update's time (rounds {summary['low']:.2f}-"
              f"{summary['high']:.2f}), CPU time {cpu['median']:.2f}x (rounds {cpu['low']:.2f}-{cpu['high']:.2f})"
              if cpu["median"] is not None else f"  {name}: {summary['median']:.2f}x the fused update's time")
    write_output(args, result)
    return 0


def step_times_main(args) -> int:
    from ablations.space import parse_int_list
    runs = parse_int_list(args.runs, "--runs", low=1)
    depths = parse_int_list(args.freeze_depths, "--freeze-depths")
    check_sizes(args)
    from core.engine_timing import step_times
    from core.model import check_freeze_depth, model_config
    config = model_config(args.model)
    for depth in depths:
        check_freeze_depth(depth, config, args.model)
    rows = step_times(args.model, runs, depths, args.batch_size, args.length, args.steps, rounds=args.rounds)
    rounds = f"median of {args.rounds} rounds" if args.rounds != 1 else "1 round"
    print(f"{'depth':>5s} {'engine':16s} {'ms per run-step':>16s} {'vs eager':>9s}   ({rows[0]['device_name']}, "
          f"{rows[0]['precision']}, batch {args.batch_size}, {args.length} tokens, {rounds})")
    for row in rows:
        if row["ms_per_run_step"] is None:  # no step to time (did not capture, or did not fit): not timed
            print(f"{row['depth']:>5d} {row['engine']:16s} {'—':>16s} {'—':>9s}   {row['not_timed']}")
            continue
        print(f"{row['depth']:>5d} {row['engine']:16s} {row['ms_per_run_step']:16.2f} {row['vs_eager']:9.2f}")
    write_output(args, {"step_times": rows})
    return 0


if __name__ == "__main__":
    main_guard(main)
