"""`python -m ablations.grid`: every cell of freeze depths × schedulers × epochs × seeds, each trained once.

Start it again after a crash and it runs only what is missing; start it on several GPUs or machines with the
same `--storage` and the workers split the cells between them.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import optuna
from tqdm.auto import tqdm

from ablations.space import Grid, parse_choices, parse_int_list, parse_rates_by_depth, study_params
from ablations.study import Heartbeat, Ledger, open_storage, open_study, storage_url
from ablations.tuning import TIE_RULE, choose_rates, chosen_configs, parse_rates, tuning_configs
from core import RunConfig, check
from core.cli import (
    ArgumentParser,
    add_cache_arguments,
    add_run_arguments,
    config_from_args,
    main_guard,
    make_session,
)
from core.config import SCHEDULERS
from core.errors import UsageError, failure_reason
from core.model import num_layers
from core.shared_steps import trajectory_key

TrainFn = Callable[[RunConfig, list[RunConfig]], dict]  # (config, the cells this worker may train next)
GRID_AXES = ("freeze_depth", "scheduler", "epochs", "seed")


@dataclass
class GridOutcome:
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    given_up: list[str] = field(default_factory=list)
    train_seconds: float = 0.0


def run_cells(configs: list[RunConfig], study: optuna.Study, ledger: Ledger, train: TrainFn, retries: int = 2,
              varying: tuple[str, ...] = (), poll_seconds: float = 5.0, progress: bool = True) -> GridOutcome:
    """Claim and train cells until each is complete, failed `retries + 1` times, or (this run) failed once."""
    outcome, attempted = GridOutcome(), set()
    by_id = {c.run_id: c for c in configs}
    bar = tqdm(total=len(by_id), disable=not progress, unit="cell", desc=f"grid {study.study_name}")
    rng, last = random.Random(), None
    while True:
        ledger.fail_stale()
        index = ledger.scan()
        runnable, waiting, done = [], [], 0
        for run_id, config in by_id.items():
            status = index.get(run_id)
            if status and status.complete:
                done += 1
                _ensure_in_study(study, ledger, config, status, varying, outcome)
            elif status and status.live:
                waiting.append(run_id)
            elif status and len(status.failures) > retries:
                done += 1
                if run_id not in outcome.given_up:
                    outcome.given_up.append(run_id)
            elif run_id not in attempted:
                runnable.append(config)
        bar.n = done
        bar.refresh()
        if not runnable:
            if not waiting:
                break
            time.sleep(poll_seconds)  # cells held by other workers: wait for them, or for them to go stale
            continue
        # Stay at the depth this worker just ran (its frozen prefix is cached), else the shallowest depth
        # (a deeper prefix derives from it); there, prefer a cell that differs from the last one only in its
        # schedule (it starts from their common steps, core.shared_steps); pick at random among equals so
        # concurrent workers rarely collide.
        depth = last.freeze_depth if last and any(c.freeze_depth == last.freeze_depth for c in runnable) else \
            min(c.freeze_depth for c in runnable)
        here = [c for c in runnable if c.freeze_depth == depth]
        last_key = trajectory_key(last) if last else None
        config = rng.choice([c for c in here if trajectory_key(c) == last_key] or here)
        params, distributions = study_params(config, varying)
        trial_id = ledger.create_claim(study, config.run_id, params, distributions)
        if trial_id is None:
            continue
        won, status = ledger.settle(trial_id, config.run_id)
        if not won:
            ledger.give_up_claim(study, trial_id, status)
            continue
        attempted.add(config.run_id)
        last = config
        bar.set_postfix_str(f"freeze {config.freeze_depth} · {config.scheduler} · {config.epochs} ep · "
                            f"seed {config.seed}")
        record = train_claimed(study, ledger, trial_id, config, train, outcome.failed,
                               [c for c in runnable if c is not config])
        if record is not None:
            outcome.trained.append(config.run_id)
            outcome.train_seconds += record["train_seconds"]
    bar.close()
    return outcome


def run_tuned(configs: list[RunConfig], rates: tuple[float, ...], study: optuna.Study, ledger: Ledger,
              train: TrainFn, **run) -> GridOutcome:
    """Every cell tuned alike (`ablations.tuning`): its first seed at every rate, then its seeds at the rate chosen
    on dev. The choice is stored as the study's `lr_tuning` attribute; a rerun recomputes it from the ledger."""
    tuning = tuning_configs(configs, rates)
    outcome = run_cells(tuning, study, ledger, train, **run)
    records = {run_id: status.record for run_id, status in ledger.scan().items() if status.complete}
    choices = choose_rates(tuning, records)
    study.set_user_attr("lr_tuning", {"rates": list(rates), "rule": TIE_RULE, "cells": list(choices.values())})
    for choice in choices.values():
        print(f"  freeze {choice['freeze_depth']} · {choice['scheduler']} · {choice['epochs']} ep: learning rate "
              f"{choice['learning_rate']:g} chosen on {choice['selected_on']} ({choice['dev_accuracy']})")
    seeds = run_cells(chosen_configs(configs, choices), study, ledger, train, **run)  # seed 1 is a tuning run: reused
    return GridOutcome(outcome.trained + seeds.trained, outcome.reused + seeds.reused, outcome.failed | seeds.failed,
                       outcome.given_up + seeds.given_up, outcome.train_seconds + seeds.train_seconds)


def train_claimed(study: optuna.Study, ledger: Ledger, trial_id: int, config: RunConfig, train: TrainFn,
                  failed: dict[str, str], siblings: list[RunConfig]) -> dict | None:
    """Train a claimed run under a heartbeat; any error becomes a FAIL trial with its reason, never a crash."""
    try:
        with Heartbeat(ledger.storage, trial_id):
            record = train(config, siblings)
    except KeyboardInterrupt:
        ledger.finish_failed(study, trial_id, "interrupted", "interrupted by the user")
        raise
    except Exception as error:  # NaN loss, CUDA out of memory, a bad batch: record it and go on
        reason = failure_reason(error)
        ledger.finish_failed(study, trial_id, "error", reason)
        failed[config.run_id] = reason
        free_accelerator_memory()
        return None
    ledger.finish_complete(study, trial_id, record)
    return record


def free_accelerator_memory() -> None:
    """After a failed run (CUDA out of memory, say), hand the cached blocks back before the next one."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ensure_in_study(study, ledger, config, status, varying, outcome) -> None:
    """A run done in another study on the same storage is copied here, not trained again."""
    if any(ledger.where(t).startswith(f"{study.study_name}#") for t in status.complete):
        return
    params, distributions = study_params(config, varying)
    ledger.copy_complete(study, status.complete[0], params, distributions)
    outcome.reused.append(config.run_id)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m ablations.grid", description=__doc__.splitlines()[0])
    add_run_arguments(parser, skip=GRID_AXES)
    parser.add_argument("--freeze-depths", default="all", help="depths to run: all (0..layers), 0,2,4 or 0-6")
    parser.add_argument("--schedulers", default="linear,cosine", help="comma-separated schedulers")
    parser.add_argument("--epochs", default="3,4", help="epoch counts; the default is the reference study's "
                        "(3 for full fine-tuning, 4 for the frozen recipe)")
    parser.add_argument("--seeds", type=int, default=1, help="repeats per cell (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=int, default=42, help="first seed")
    parser.add_argument("--lr-by-depth", default=None, metavar="SPEC", help="a learning rate per freeze depth, "
                        "overriding --learning-rate: 0=3e-4,6=1e-3 or the file python -m ablations.lr_choice wrote")
    parser.add_argument("--learning-rates", default=None, metavar="RATES", help="tune every cell alike: train "
                        "each cell's first seed at each of these rates (1e-5,3e-5,1e-4,3e-4,1e-3), choose on the dev "
                        f"split by {TIE_RULE}, and train its other seeds at the chosen rate")
    add_study_arguments(parser, default_study="grid")
    parser.add_argument("--retries", type=int, default=2, help="re-attempts of a failed cell on later invocations")
    return parser


def add_study_arguments(parser: argparse.ArgumentParser, default_study: str) -> None:
    """Flags the grid and the search share: where runs are stored and how a worker behaves."""
    parser.add_argument("--storage", default=None, help="Optuna storage URL (sqlite:///x.db, postgresql://...); "
                        "default: a SQLite file in --output-dir")
    parser.add_argument("--study-name", default=default_study, help=f"Optuna study name (default: {default_study})")
    parser.add_argument("--output-dir", default="results", help="where tables and plots go (default: results)")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--heartbeat", type=int, default=20, help="seconds between a worker's heartbeats; a run "
                        "whose worker is silent for 3 beats is failed and reclaimed")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--no-report", action="store_true", help="skip the trade-off report at the end")
    parser.add_argument("--compile", action="store_true", help="run models through torch.compile")
    add_cache_arguments(parser)


def make_trainer(args: argparse.Namespace) -> TrainFn:
    """Runs of one command share one session (loaded data and checkpoint, prefix caches, shared steps)."""
    from core import run
    session = make_session(args)
    return lambda config, siblings: run(config, device=args.device, progress=not args.no_progress,
                                        compile=args.compile, siblings=siblings, session=session).to_dict()


def write_report(url: str, study_names: list[str], output_dir: str) -> None:
    from ablations.report import write_report as report
    from ablations.study import load_runs
    paths = report(load_runs(url, study_names), output_dir)
    print(f"report: {', '.join(str(p) for p in paths.values())}")


def main() -> int:
    args = build_parser().parse_args()
    if args.seeds < 1 or args.retries < 0 or args.heartbeat < 1:
        raise UsageError("--seeds and --heartbeat must be at least 1 and --retries at least 0")
    base = config_from_args(args, skip=GRID_AXES, seed=args.seed, freeze_depth=0)
    layers = num_layers(check(base))
    depths = list(range(layers + 1)) if args.freeze_depths == "all" else \
        parse_int_list(args.freeze_depths, "--freeze-depths", 0, layers)
    grid = Grid(tuple(depths), tuple(parse_choices(args.schedulers, "--schedulers", SCHEDULERS)),
                tuple(parse_int_list(args.epochs, "--epochs", 1)),
                tuple(range(args.seed, args.seed + args.seeds)))
    configs = grid.configs(base)
    rates = None if args.lr_by_depth is None else parse_rates_by_depth(args.lr_by_depth)
    if rates is not None:
        missing = [d for d in depths if d not in rates]
        if missing:
            raise UsageError(f"--lr-by-depth gives no learning rate for freeze depth {missing[0]}: "
                             f"add {missing[0]}=RATE")
        configs = [c.replace(learning_rate=rates[c.freeze_depth]) for c in configs]
    tuning_rates = None if args.learning_rates is None else parse_rates(args.learning_rates)
    if tuning_rates and rates:
        raise UsageError("--learning-rates and --lr-by-depth both set the learning rate: give one of them")
    url = storage_url(args.storage, args.output_dir)
    ledger = Ledger(open_storage(url, args.heartbeat))
    study = open_study(ledger.storage, args.study_name)
    study.set_user_attr("grid", {"freeze_depths": depths, "schedulers": list(grid.schedulers),
                                 "epochs": list(grid.epochs), "seeds": list(grid.seeds), "base": base.to_dict(),
                                 "lr_by_depth": rates and {str(d): rates[d] for d in depths}})
    print(f"grid {args.study_name!r}: {grid.describe()} on {url}")
    run = dict(retries=args.retries, poll_seconds=min(5.0, args.heartbeat), progress=not args.no_progress)
    if tuning_rates:
        outcome = run_tuned(configs, tuning_rates, study, ledger, make_trainer(args), **run)
    else:
        outcome = run_cells(configs, study, ledger, make_trainer(args), **run)
    print(f"grid {args.study_name!r}: {len(outcome.trained)} trained now ({outcome.train_seconds:.1f} s of training), "
          f"{len(outcome.reused)} reused from other studies, {len(outcome.failed)} failed now, "
          f"{len(outcome.given_up)} given up after {args.retries + 1} failures")
    for run_id, reason in outcome.failed.items():
        print(f"  failed {run_id}: {reason}")
    if not args.no_report:
        write_report(url, [args.study_name], args.output_dir)
    return 1 if outcome.failed or outcome.given_up else 0


if __name__ == "__main__":
    main_guard(main)
