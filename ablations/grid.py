"""`python -m ablations.grid`: every cell of freeze depths × schedulers × epochs × seeds, each trained once.

Start it again after a crash and it runs only what is missing; start it on several GPUs or machines with the
same `--storage` and the workers split the cells between them.
"""
from __future__ import annotations

import argparse
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ablations.runner import (
    locations,
    add_study_arguments,
    free_accelerator_memory,
    write_report,
)
from core.cli import ArgumentParser, add_run_arguments, check_output_dir, config_from_args, main_guard
from core.config import RunConfig
from core.errors import UsageError, failure_reason

if TYPE_CHECKING:  # optuna, torch and the ledger load when the grid runs, not for --help
    import optuna

    from ablations.ledger import Ledger

TrainFn = Callable[[RunConfig, list[RunConfig]], dict]  # (config, the cells this worker may train next)
GroupTrainFn = Callable[[list[RunConfig]], list]  # configs of one work shape -> per run a record dict or an error
GRID_AXES = ("freeze_depth", "scheduler", "epochs", "seed")


@dataclass
class GridOutcome:
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    given_up: list[str] = field(default_factory=list)
    train_seconds: float = 0.0


def run_cells(configs: list[RunConfig], study: optuna.Study, ledger: Ledger, train: TrainFn, retries: int = 2,
              varying: tuple[str, ...] = (), poll_seconds: float = 5.0, progress: bool = True,
              train_group: GroupTrainFn | None = None, max_parallel: int = 1) -> GridOutcome:
    """Claim and train cells until each is complete, failed `retries + 1` times, or (this run) failed once.

    With `max_parallel` > 1 and `train_group`, up to that many runnable cells of one work shape (seeds,
    schedules, rates of one depth) are claimed, each through the ledger's atomic claim, and trained together;
    each still ends as its own COMPLETE or FAIL trial."""
    from tqdm.auto import tqdm

    from ablations.space import study_params
    from core.shared_steps import trajectory_key

    outcome, attempted = GridOutcome(), set()
    by_id = {c.run_id: c for c in configs}
    bar = tqdm(total=len(by_id), disable=not progress, unit="cell", desc=f"grid {study.study_name}")
    rng, last = random.Random(), None
    in_study = ledger.complete_in_study(study)
    while True:
        ledger.fail_stale()
        statuses = ledger.lookup(configs)
        runnable, waiting, done = [], [], 0
        for run_id, config in by_id.items():
            status = statuses[run_id]
            if status.complete:
                done += 1
                here = status.where.startswith(f"{study.study_name}#")
                if not here and run_id not in in_study and config.legacy_run_id not in in_study:
                    # A run done in another study on the same storage is copied here, not trained again.
                    ledger.copy_complete(study, status, *study_params(config, varying))
                    in_study.add(run_id)
                    outcome.reused.append(run_id)
            elif status.live:
                waiting.append(run_id)
            elif status.failures > retries:
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
        trial_id = ledger.new_claim(study, config.run_id, params, distributions)
        if trial_id is None:
            continue  # another worker claimed it a moment earlier: look again
        attempted.add(config.run_id)
        last = config
        bar.set_postfix_str(f"freeze {config.freeze_depth} · {config.scheduler} · {config.epochs} ep · "
                            f"seed {config.seed}")
        partners = claim_partners(study, ledger, config, runnable, max_parallel if train_group else 1, varying)
        if partners:
            claims = [(config, trial_id), *partners]
            attempted.update(c.run_id for c, _ in partners)
            for done_config, record in train_group_claimed(study, ledger, claims, train_group, outcome.failed):
                outcome.trained.append(done_config.run_id)
                in_study.add(done_config.run_id)
                outcome.train_seconds += record["train_seconds"]
            continue
        record = train_claimed(study, ledger, trial_id, config, train, outcome.failed,
                               [c for c in runnable if c is not config])
        if record is not None:
            outcome.trained.append(config.run_id)
            in_study.add(config.run_id)
            outcome.train_seconds += record["train_seconds"]
    bar.close()
    return outcome


def claim_partners(study: optuna.Study, ledger: Ledger, config: RunConfig, runnable: list[RunConfig],
                   max_parallel: int, varying: tuple[str, ...]) -> list[tuple[RunConfig, int]]:
    """Claim up to `max_parallel - 1` more runnable cells of `config`'s work shape; a cell another worker claims
    first is skipped."""
    from ablations.space import study_params
    from core.stacked import work_shape

    shape, partners = work_shape(config), []
    for other in runnable:
        if len(partners) >= max_parallel - 1:
            break
        if other.run_id == config.run_id or work_shape(other) != shape:
            continue
        trial_id = ledger.new_claim(study, other.run_id, *study_params(other, varying))
        if trial_id is not None:
            partners.append((other, trial_id))
    return partners


def train_group_claimed(study: optuna.Study, ledger: Ledger, claims: list[tuple[RunConfig, int]],
                        train_group: GroupTrainFn, failed: dict[str, str]) -> list[tuple[RunConfig, dict]]:
    """Train claimed runs as one group under a heartbeat each; every run ends COMPLETE with its own record or
    FAIL with its own reason (an error of the whole group fails each of its runs)."""
    from ablations.storage import Heartbeat

    try:
        with contextlib.ExitStack() as beats:
            for _, trial_id in claims:
                beats.enter_context(Heartbeat(ledger.storage, trial_id))
            results = train_group([config for config, _ in claims])
    except KeyboardInterrupt:
        for _, trial_id in claims:
            ledger.finish_failed(study, trial_id, "interrupted", "interrupted by the user")
        raise
    except Exception as error:  # out of memory for the group, say: each run fails with the reason
        results = [error] * len(claims)
        free_accelerator_memory()
    done = []
    for (config, trial_id), result in zip(claims, results):
        if isinstance(result, Exception):
            failed[config.run_id] = reason = failure_reason(result)
            ledger.finish_failed(study, trial_id, "error", reason)
        else:
            ledger.finish_complete(study, trial_id, result)
            done.append((config, result))
    return done


def run_tuned(configs: list[RunConfig], rates: tuple[float, ...], study: optuna.Study, ledger: Ledger,
              train: TrainFn, **run) -> GridOutcome:
    """Every cell tuned alike (`ablations.tuning`): its first seed at every rate, then its seeds at the rate chosen
    on dev. The choice is stored as the study's `lr_tuning` attribute; a rerun recomputes it from the ledger."""
    from ablations.tuning import TIE_RULE, choose_rates, chosen_configs, tuning_configs

    tuning = tuning_configs(configs, rates)
    outcome = run_cells(tuning, study, ledger, train, **run)
    records = {c.run_id: ledger.record(status) for c in tuning
               if (status := ledger.lookup([c])[c.run_id]).complete}
    choices = choose_rates(tuning, records)
    study.set_user_attr("lr_tuning", {"rates": list(rates), "rule": TIE_RULE, "cells": list(choices.values())})
    for choice in choices.values():
        print(f"  freeze {choice['freeze_depth']} · {choice['scheduler']} · {choice['epochs']} ep: learning rate "
              f"{choice['learning_rate']:g} chosen on {choice['selected_on']} ({choice['dev_accuracy']})")
    seeds = run_cells(chosen_configs(configs, choices), study, ledger, train, **run)  # seed 1: a tuning run, reused
    return GridOutcome(outcome.trained + seeds.trained, outcome.reused + seeds.reused, outcome.failed | seeds.failed,
                       outcome.given_up + seeds.given_up, outcome.train_seconds + seeds.train_seconds)


def train_claimed(study: optuna.Study, ledger: Ledger, trial_id: int, config: RunConfig, train: TrainFn,
                  failed: dict[str, str], siblings: list[RunConfig]) -> dict | None:
    """Train a claimed run under a heartbeat; any error becomes a FAIL trial with its reason, never a crash."""
    from ablations.storage import Heartbeat

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


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m ablations.grid", description=__doc__.splitlines()[0])
    add_run_arguments(parser, skip=GRID_AXES)
    parser.add_argument("--freeze-depths", default="all", metavar="LIST", help="depths to run: all (0 to the "
                        "model's layer count), a comma-separated list or a range, e.g. 0,2,4 or 0-6 (default: all)")
    parser.add_argument("--schedulers", default="linear,cosine", metavar="LIST",
                        help="comma-separated schedulers, e.g. linear,cosine (default: linear,cosine)")
    parser.add_argument("--epochs", default="3,4", metavar="LIST", help="comma-separated epoch counts, e.g. 1,3 "
                        "(default: 3,4, the reference study's: 3 for full fine-tuning, 4 for the frozen recipe)")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="repeats per cell, with training seeds --seed, --seed + 1, ... (default: 1)")
    parser.add_argument("--seed", type=int, default=42, help="training seed of the first repeat (default: 42)")
    parser.add_argument("--lr-by-depth", default=None, metavar="SPEC", help="a learning rate per freeze depth, "
                        "overriding --learning-rate: 0=3e-4,6=1e-3 or the file python -m ablations.lr_choice wrote "
                        "(default: --learning-rate for every depth)")
    parser.add_argument("--learning-rates", default=None, metavar="RATES", help="tune every cell alike: train "
                        "each cell's first seed at each of these comma-separated rates (e.g. 1e-5,3e-5,1e-4,3e-4,"
                        "1e-3), choose on the dev split by higher dev accuracy, then lower dev loss, then the smaller "
                        "rate, and train its other seeds at the chosen rate (default: no tuning)")
    add_study_arguments(parser, default_study="grid")
    parser.add_argument("--retries", type=int, default=2, metavar="N",
                        help="re-attempts of a failed cell on later invocations (default: 2)")
    parser.add_argument("--engine", default="auto", help="auto, eager, stacked or captured: how runs train (auto: "
                        "stacked for a group of several runs, else eager; see README, Engines) (default: auto)")
    parser.add_argument("--max-parallel-runs", default="auto", metavar="N", help="runs of one work shape trained "
                        "at once as one stacked model (auto: 1 on a CPU, on CUDA as many as fit in the free memory; "
                        "1: one at a time) (default: auto)")
    parser.set_defaults(model=None)  # not given: distilbert-base-uncased, or offline the packaged MiniLM
    return parser


def planned_runs(configs: list[RunConfig], tuning_rates: tuple[float, ...] | None, ledger: Ledger) -> list[RunConfig]:
    """Every run the grid will store: its cells, or with tuning every cell's first seed at each rate and then its
    other seeds (at the chosen rate once every tuning run is stored; before that at the base rate, the same work)."""
    if not tuning_rates:
        return configs
    from ablations.tuning import choose_rates, chosen_configs, tuning_configs

    tuning = tuning_configs(configs, tuning_rates)
    first = min(c.seed for c in configs)
    status = ledger.lookup(tuning)
    if all(s.complete for s in status.values()):
        seeds = chosen_configs(configs, choose_rates(tuning, {c.run_id: ledger.record(status[c.run_id])
                                                              for c in tuning}))
    else:
        seeds = configs
    return tuning + [c for c in seeds if c.seed != first]


def duration_estimate(pending: list[RunConfig], planned: int, base: RunConfig, device: str | None, session) -> str:
    """How long training the runs not yet stored takes here, from timed steps of the slowest cell; no steps are
    timed when nothing is left to train."""
    import math

    if not pending:
        return f"all {planned} runs are stored: nothing to train"
    from core.model import seconds_per_training_step
    step, rows = seconds_per_training_step(base, session, device)
    steps = sum(c.epochs * math.ceil(min(rows, c.max_train_samples or rows) / c.batch_size) for c in pending)
    total = steps * step
    quick = base.max_train_samples is None or any(c.epochs > 1 for c in pending)  # not already a quick look
    hint = " For a quick look: --max-train-samples 2000 --epochs 1." if total > 600 and quick else ""
    return (f"estimate: at most {_duration(total)} of training for the {len(pending)} of {planned} runs not stored "
            f"yet ({steps:,} steps x {step:.3f} s, the median of 3 timed steps of a full fine-tune here; frozen cells "
            f"are faster, evaluation is extra).{hint}")


def _duration(seconds: float) -> str:
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if hours else f"{max(minutes, 1)} min"


def make_trainers(args: argparse.Namespace, session, engine: str = "eager") -> tuple[TrainFn, GroupTrainFn]:
    """The grid's trainers of one run and of a group of runs, over the command's one session."""
    from core import run
    from core.group import run_group

    def group(configs: list[RunConfig]) -> list:
        return [r if isinstance(r, Exception) else r.to_dict() for r in run_group(configs, session, args.device)]

    def one(config: RunConfig, siblings: list[RunConfig]) -> dict:
        if engine == "stacked":
            result = group([config])[0]
            if isinstance(result, Exception):
                raise result
            return result
        return run(config, device=args.device, progress=not args.no_progress, compile=args.compile,
                   siblings=siblings, session=session).to_dict()
    return one, group


def parallel_runs(args: argparse.Namespace, base: RunConfig) -> tuple[str, int]:
    """(engine, group size) from --engine and --max-parallel-runs; bad values are a UsageError."""
    from core.group import choose_engine, group_size
    if args.max_parallel_runs == "auto":
        size = group_size(base, args.device)
    elif args.max_parallel_runs.isdigit() and int(args.max_parallel_runs) >= 1:
        size = int(args.max_parallel_runs)
    else:
        raise UsageError(f"--max-parallel-runs {args.max_parallel_runs!r} is invalid: use auto or a whole number "
                         "of at least 1")
    from core.train import default_device
    engine = choose_engine(args.engine, args.device or default_device(), size, base.model, base.max_length)
    if engine == "stacked" and args.compile:
        raise UsageError("--compile applies to the eager engine: drop it, or use --engine eager")
    return engine, size if engine == "stacked" else 1


def main() -> int:
    args = build_parser().parse_args()
    if args.seeds < 1 or args.retries < 0 or args.heartbeat < 1:
        raise UsageError("--seeds and --heartbeat must be at least 1 and --retries at least 0")
    from ablations.storage import storage_errors
    from ablations.space import Grid, parse_choices, parse_int_list, parse_rates_by_depth
    from ablations.tuning import parse_rates
    from core.config import SCHEDULERS
    from core.cli import make_session
    from core.model import num_layers, preflight, resolve_model

    url, output_dir = locations(args.storage, args.output_dir, args.study_name)
    check_output_dir(output_dir)
    base = config_from_args(args, skip=GRID_AXES, seed=args.seed, freeze_depth=0,
                            model=resolve_model(args.model, RunConfig.model))
    session = make_session(args)  # what the runs share; the pre-flight's loads are the first run's
    layers = num_layers(preflight(base, session))  # model and data checked once, before any trial is recorded
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
    engine, size = parallel_runs(args, base)  # the depth-0 base: the most memory per run, the smallest group
    with storage_errors(url):
        return run_grid(args, url, output_dir, configs, grid, base, depths, rates, session, engine, size,
                        tuning_rates)


def run_grid(args, url, output_dir, configs, grid, base, depths, rates, session, engine="eager", size=1,
             tuning_rates=None) -> int:
    from ablations.ledger import Ledger, open_study
    from ablations.storage import mask_url, open_storage

    ledger = Ledger(open_storage(url, args.heartbeat))
    study = open_study(ledger.storage, args.study_name)
    study.set_user_attr("grid", {"freeze_depths": depths, "schedulers": list(grid.schedulers),
                                 "epochs": list(grid.epochs), "seeds": list(grid.seeds), "base": base.to_dict(),
                                 "lr_by_depth": rates and {str(d): rates[d] for d in depths}})
    planned = planned_runs(configs, tuning_rates, ledger)
    tuning = f", plus {len(planned) - len(configs)} tuning runs ({len(tuning_rates)} rates per cell, its first " \
             "seed among them)" if tuning_rates else ""
    print(f"grid {args.study_name!r}: {grid.describe()}{tuning} on {mask_url(url)}; engine {engine}, "
          f"{size} run(s) at once")
    status = ledger.lookup(planned)
    print(duration_estimate([c for c in planned if not status[c.run_id].complete], len(planned), base, args.device,
                            session))
    train, train_group = make_trainers(args, session, engine)
    run = dict(retries=args.retries, poll_seconds=min(5.0, args.heartbeat), progress=not args.no_progress,
               train_group=train_group, max_parallel=size)
    if tuning_rates:
        outcome = run_tuned(configs, tuning_rates, study, ledger, train, **run)
    else:
        outcome = run_cells(configs, study, ledger, train, **run)
    print(f"grid {args.study_name!r}: {len(outcome.trained)} trained now ({outcome.train_seconds:.1f} s of training), "
          f"{len(outcome.reused)} reused from other studies, {len(outcome.failed)} failed now, "
          f"{len(outcome.given_up)} given up after {args.retries + 1} failures")
    for run_id, reason in outcome.failed.items():
        print(f"  failed {run_id}: {reason}")
    if not args.no_report:
        write_report(url, [args.study_name], output_dir)
    return 1 if outcome.failed or outcome.given_up else 0


if __name__ == "__main__":
    main_guard(main)
