"""The grid's cell loop over the ledger: claim each cell once across workers, train it under a heartbeat (alone
or with cells of its work shape), record it as COMPLETE or FAIL, copy a run another study stored, retry failures.

`python -m ablations.grid` builds the cells and hands them here; with `--learning-rates` every cell is tuned
alike first (`run_tuned`).
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ablations.runner import free_accelerator_memory
from core.config import RunConfig
from core.errors import failure_reason

if TYPE_CHECKING:  # optuna and the ledger load with the runs they serve
    import optuna

    from ablations.ledger import Ledger

TrainFn = Callable[[RunConfig, list[RunConfig]], dict]  # (config, the cells this worker may train next)
GroupTrainFn = Callable[[list[RunConfig]], list]  # configs of one work shape -> per run a record dict or an error


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
        config = _next_cell(runnable, last, rng)
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


def _next_cell(runnable: list[RunConfig], last: RunConfig | None, rng: random.Random) -> RunConfig:
    """Stay at the depth this worker just ran (its frozen prefix is cached), else the shallowest depth (a deeper
    prefix derives from it); there, prefer a cell that differs from the last one only in its schedule (it starts
    from their common steps, core.shared_steps); pick at random among equals so concurrent workers rarely collide."""
    from core.shared_steps import trajectory_key

    depth = last.freeze_depth if last and any(c.freeze_depth == last.freeze_depth for c in runnable) else \
        min(c.freeze_depth for c in runnable)
    here = [c for c in runnable if c.freeze_depth == depth]
    last_key = trajectory_key(last) if last else None
    return rng.choice([c for c in here if trajectory_key(c) == last_key] or here)


def claim_partners(study: optuna.Study, ledger: Ledger, config: RunConfig, runnable: list[RunConfig],
                   max_parallel: int, varying: tuple[str, ...]) -> list[tuple[RunConfig, int]]:
    """Claim up to `max_parallel - 1` more runnable cells of `config`'s work shape; a cell another worker claims
    first is skipped."""
    from ablations.space import study_params
    from core.stacked import group_key

    shape, partners = group_key(config), []
    for other in runnable:
        if len(partners) >= max_parallel - 1:
            break
        if other.run_id == config.run_id or group_key(other) != shape:
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


def run_tuned(configs: list[RunConfig], rates: tuple[float, ...], study: optuna.Study, ledger: Ledger,
              train: TrainFn, **run) -> GridOutcome:
    """Every cell tuned alike (`ablations.tuning`): its first seed at every rate, then its seeds at the rate chosen
    on dev. The choice is stored as the study's `lr_tuning` attribute; a rerun recomputes it from the ledger."""
    from ablations.tuning import choice_line, choice_metric, choose_rates, chosen_configs, tie_rule, tuning_configs

    tuning = tuning_configs(configs, rates)
    outcome = run_cells(tuning, study, ledger, train, **run)
    choices = choose_rates(tuning, tuning_records(tuning, ledger))
    rule = tie_rule(choice_metric(configs[0]))  # one base config: one --select-by for every cell
    study.set_user_attr("lr_tuning", {"rates": list(rates), "rule": rule, "cells": list(choices.values())})
    for choice in choices.values():
        print(choice_line(choice))
    seeds = run_cells(chosen_configs(configs, choices), study, ledger, train, **run)  # seed 1: a tuning run, reused
    return GridOutcome(outcome.trained + seeds.trained, outcome.reused + seeds.reused, outcome.failed | seeds.failed,
                       outcome.given_up + seeds.given_up, outcome.train_seconds + seeds.train_seconds)


def planned_runs(configs: list[RunConfig], tuning_rates: tuple[float, ...] | None, ledger: Ledger) -> list[RunConfig]:
    """Every run the grid will store: its cells, or with tuning every cell's first seed at each rate and then its
    other seeds (at the chosen rate once every tuning run is stored; before that at the base rate, the same work)."""
    if not tuning_rates:
        return configs
    from ablations.tuning import choose_rates, chosen_configs, tuning_configs

    tuning = tuning_configs(configs, tuning_rates)
    first = min(c.seed for c in configs)
    records = tuning_records(tuning, ledger)
    seeds = chosen_configs(configs, choose_rates(tuning, records)) if len(records) == len(tuning) else configs
    return tuning + [c for c in seeds if c.seed != first]


def tuning_records(tuning: list[RunConfig], ledger: Ledger) -> dict[str, dict]:
    """The stored records of the tuning runs that are complete, by run id: one look-up for all of them."""
    status = ledger.lookup(tuning)
    return {run_id: ledger.record(s) for run_id, s in status.items() if s.complete}
