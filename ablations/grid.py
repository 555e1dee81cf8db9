"""`python -m ablations.grid`: every cell of freeze depths × schedulers × epochs × seeds, each trained once.

Start it again after a crash and it runs only what is missing; start it on several GPUs or machines with the
same `--storage` and the workers split the cells between them. This command builds the cells and reports;
claiming and training them is `ablations.cells`.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ablations.runner import (add_parallel_argument, add_study_arguments, default_output_dir, locations,
                              make_group_trainer, make_trainer, parallel_runs, write_report)
from core.cli import (ArgumentParser, add_run_arguments, check_output_dir, config_from_args, main_guard,
                      new_folders_removed_on_error)
from core.config import DATA_FIELDS, RunConfig
from core.errors import UsageError

if TYPE_CHECKING:  # the cell loop, optuna, torch and the ledger load when the grid runs, not for --help
    from ablations.cells import GroupTrainFn, TrainFn

GRID_AXES = ("freeze_depth", "scheduler", "epochs", "seed")


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
                        "1e-3), choose on the dev split by higher dev accuracy (dev macro-F1 with --select-by f1), "
                        "then lower dev loss, then the smaller rate, and train its other seeds at the chosen rate "
                        "(default: no tuning)")
    add_study_arguments(parser, default_study="grid")
    parser.add_argument("--retries", type=int, default=2, metavar="N",
                        help="re-attempts of a failed cell on later invocations (default: 2)")
    add_parallel_argument(parser, "runs of one work shape trained at once as one stacked model")
    parser.set_defaults(model=None)  # not given: distilbert-base-uncased, or offline the packaged MiniLM
    return parser


def duration_estimate(pending: list[RunConfig], planned: int, base: RunConfig, device: str | None, session) -> str:
    """How long training the runs not yet stored takes here, from timed steps of the slowest cell; no steps are
    timed when nothing is left to train."""
    import math

    if not pending:
        return f"all {planned} runs are stored: nothing to train"
    from core.batches import dev_rows_count
    from core.timing import seconds_per_training_step
    step, rows = seconds_per_training_step(base, session, device)
    left = {c.dev_size: rows - dev_rows_count(rows, c.dev_size) for c in pending}  # the dev split trains nothing
    steps = sum(c.epochs * math.ceil(min(left[c.dev_size], c.max_train_samples or rows) / c.batch_size)
                for c in pending)
    total = steps * step
    quick = base.max_train_samples is None or any(c.epochs > 1 for c in pending)  # not already a quick look
    hint = " For a quick look: --max-train-samples 2000 --epochs 1." if total > 600 and quick else ""
    return (f"estimate: at most {_duration(total)} of training for the {len(pending)} of {planned} runs not stored "
            f"yet ({steps:,} steps x {step:.3f} s, the median of 3 timed steps of a full fine-tune here; frozen cells "
            f"are faster, evaluation is extra).{hint}")


def timed_estimate(pending: list[RunConfig], session, device: str | None, compile: bool = False,
                   stacked: bool = False, prefix_seconds: dict[str, float] | None = None) -> str | None:
    """The training time of the runs not yet stored from this machine's timing of each one's work shape (the
    sitting's, taken just before) plus, where the sitting built it (`prefix_seconds` by shape) or the timing kept
    one (`StepTiming.prefix_seconds`, what the run will be charged), its frozen-prefix build: each run alone, as
    the time axis counts it. None where a shape has no timing (--timing-repeats 0)."""
    import math

    from core.train import planned_run
    prefix_seconds = prefix_seconds or {}
    total, shapes, unbuilt = 0.0, set(), False
    for config in pending:
        key, rows = planned_run(config, session, device, compile)
        if (timing := session.timer.known(key)) is None:
            return None
        total += config.epochs * math.ceil(rows / config.batch_size) * timing.per_step
        build = prefix_seconds.get(key, timing.prefix_seconds)
        total += build or 0.0
        unbuilt |= config.freeze_depth > 0 and build is None
        shapes.add(key)
    extra = "frozen-prefix builds and evaluation are extra" if unbuilt else "evaluation is extra"
    together = "; runs trained together in stacked groups take less wall time" if stacked else ""
    took = f"{total:.0f} s" if total < 60 else _duration(total)
    return (f"estimate from the timing of its {len(shapes)} work shape(s): {took} of training for the "
            f"{len(pending)} runs, each as if alone ({extra}{together}).")


def _duration(seconds: float) -> str:
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if hours else f"{max(minutes, 1)} min"


def refuse_other_data(study, base: RunConfig) -> None:
    """A UsageError where the study holds completed runs of other data than `base`'s: their accuracies are on
    other sentences, so one map or Pareto front over both would compare what cannot be compared (and the default
    --study-name is the same for every dataset). Data is compared by its rows (`core.identity.same_data`)."""
    from optuna.trial import TrialState

    from core.identity import same_data
    wanted = tuple(getattr(base, field) for field in DATA_FIELDS)
    stored = {tuple(c.get(field) for field in DATA_FIELDS)
              for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if (c := (t.user_attrs.get("record") or {}).get("config"))}
    for data in sorted(stored, key=str):
        if same_data(data, wanted) is False:
            raise UsageError(f"study {study.study_name!r} holds runs of other data ({data[0]!r}"
                             f"{', columns ' + ', '.join(map(str, data[1:])) if any(data[1:]) else ''}): choose "
                             "another --study-name (python -m ablations.report reads several studies at once)")


def make_trainers(args: argparse.Namespace, session, engine: str = "eager") -> tuple[TrainFn, GroupTrainFn]:
    """The grid's trainers of one run (`ablations.runner.make_trainer`, given the cell's schedule siblings) and of
    a group of runs (`ablations.runner.make_group_trainer`), over the command's one session."""
    return make_trainer(args, "siblings", session, engine), make_group_trainer(args, session, engine)


def main() -> int:
    args = build_parser().parse_args()
    for ok, message in [(args.seeds >= 1, f"--seeds {args.seeds} is invalid: use a whole number of at least 1"),
                        (args.heartbeat >= 1, f"--heartbeat {args.heartbeat} is invalid: use at least 1 second"),
                        (args.retries >= 0, f"--retries {args.retries} is invalid: use 0 or more")]:
        if not ok:
            raise UsageError(message)
    from core.hub import checked_sources
    # a model or data folder that cannot be found is refused before torch and transformers load
    model = checked_sources(args.model, RunConfig.model, args.dataset)
    # the output folder is made when it is checked, before the model loads; refused later, the grid takes it back
    with new_folders_removed_on_error(args.output_dir or default_output_dir(args.study_name)):
        return checked_grid(args, model)


def checked_grid(args: argparse.Namespace, model: str) -> int:
    """The grid's settings checked against the model and the data (loaded once here), then run."""
    from ablations.storage import storage_errors
    from ablations.space import Grid, parse_choices, parse_int_list, parse_rates_by_depth
    from ablations.tuning import parse_rates
    from core.config import SCHEDULERS
    from core.cli import make_session
    from core.device import resolve_device
    from core.model import num_layers, preflight

    url, output_dir = locations(args.storage, args.output_dir, args.study_name)
    check_output_dir(output_dir)
    base = config_from_args(args, skip=GRID_AXES, seed=args.seed, freeze_depth=0, model=model)
    schedulers = tuple(parse_choices(args.schedulers, "--schedulers", SCHEDULERS))  # refused before the model loads
    epochs = tuple(parse_int_list(args.epochs, "--epochs", 1))
    resolve_device(args.device)
    session = make_session(args)  # what the runs share; the pre-flight's loads are the first run's
    layers = num_layers(preflight(base, session))  # model and data checked once, before any trial is recorded
    depths = list(range(layers + 1)) if args.freeze_depths == "all" else \
        parse_int_list(args.freeze_depths, "--freeze-depths", 0, layers)
    grid = Grid(tuple(depths), schedulers, epochs, tuple(range(args.seed, args.seed + args.seeds)))
    configs = grid.configs(base)
    rates = None if args.lr_by_depth is None else parse_rates_by_depth(args.lr_by_depth)
    if rates is not None:
        missing = [d for d in depths if d not in rates]
        if missing:
            raise UsageError(f"--lr-by-depth gives no learning rate for freeze depth {missing[0]}: "
                             f"add {missing[0]}=RATE")
        configs = [c.replace(learning_rate=rates[c.freeze_depth]) for c in configs]
        if beyond := sorted(d for d in rates if d > layers):  # a typo, or a file made for a deeper model
            print(f"--lr-by-depth: depth(s) {', '.join(map(str, beyond))} beyond the model's {layers} layers: their "
                  "rates are not used")
    tuning_rates = None if args.learning_rates is None else parse_rates(args.learning_rates)
    if tuning_rates and rates:
        raise UsageError("--learning-rates and --lr-by-depth both set the learning rate: give one of them")
    engine, size = parallel_runs(args, base)  # the depth-0 base: the most memory per run, the smallest group
    with storage_errors(url):
        return run_grid(args, url, output_dir, configs, grid, base, depths, rates, session, engine, size,
                        tuning_rates)


def run_grid(args, url, output_dir, configs, grid, base, depths, rates, session, engine="eager", size=1,
             tuning_rates=None) -> int:
    from ablations.cells import planned_runs, run_cells, run_tuned
    from ablations.ledger import Ledger, open_study
    from ablations.storage import mask_url, open_storage

    ledger = Ledger(open_storage(url, args.heartbeat))
    study = open_study(ledger.storage, args.study_name)
    if "search" in study.user_attrs:  # its runs would pin nothing and the search could not go on (a grid's study)
        raise UsageError(f"study {args.study_name!r} holds a search, not a grid: choose another --study-name")
    refuse_other_data(study, base)
    study.set_user_attr("grid", {"freeze_depths": depths, "schedulers": list(grid.schedulers),
                                 "epochs": list(grid.epochs), "seeds": list(grid.seeds), "base": base.to_dict(),
                                 "lr_by_depth": rates and {str(d): rates[d] for d in depths}})
    planned = planned_runs(configs, tuning_rates, ledger)
    tuning = f", plus {len(planned) - len(configs)} tuning runs ({len(tuning_rates)} rates per cell, its first " \
             "seed among them)" if tuning_rates else ""
    print(f"grid {args.study_name!r}: {grid.describe()}{tuning} on {mask_url(url)}; engine {engine}, "
          f"{size} run(s) at once")
    status = ledger.lookup(planned)
    pending = [c for c in planned if not status[c.run_id].complete]
    print(duration_estimate(pending, len(planned), base, args.device, session))
    copied = {c.run_id for c in planned if status[c.run_id].complete}  # done in this study or to copy
    if session.timing_repeats and (pending or copied - ledger.complete_in_study(study)):
        # every shape of the study on one time axis (core.sitting; copies of other studies' runs too), then trained
        from ablations.stored_sitting import time_study
        timed = time_study(url, args.study_name, pending, session, args.device, compile=args.compile, copied=copied)
        built = {t.key: t.prefix_seconds for t in timed}
        if pending and (estimate := timed_estimate(pending, session, args.device, args.compile, size > 1,
                                                   built)) is not None:
            print(estimate)  # each shape's own time: the first estimate counted every step at depth 0's
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
        try:
            write_report(url, [args.study_name], output_dir)
        except UsageError as error:  # every run failed: runs.csv holds their reasons, exit 1 says they failed
            if not (outcome.failed or outcome.given_up):
                raise
            print(f"report: {output_dir}/runs.csv only, trade-off tables skipped: {error}")
    return 1 if outcome.failed or outcome.given_up else 0


if __name__ == "__main__":
    main_guard(main)
