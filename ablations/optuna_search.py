"""Search freeze depth, schedule and epochs for the best accuracy–time trade-off (Pareto front).

`python -m ablations.optuna_search --trials N` adds N trials to the study; learning rate and warmup are
searched too, as nuisance parameters, so that each scientific choice is judged at a good learning rate.

Every trial goes through the shared run ledger: a config that already ran anywhere on the storage (a grid or
another search) is answered from its record, one that another worker is training is waited for, and only a
new one is trained. Run it again to add N more trials; start it on several machines with one `--storage` and
the workers share the study.
"""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ablations.runner import (SEARCHED, add_parallel_argument, add_study_arguments, default_output_dir, locations,
                              make_group_trainer, make_trainer, parallel_runs)
from ablations.trials import SAMPLERS, Search
from core.cli import (ArgumentParser, add_run_arguments, check_output_dir, config_from_args, main_guard,
                      new_folders_removed_on_error)
from core.config import RunConfig
from core.errors import UsageError

if TYPE_CHECKING:  # optuna loads when the search runs, not for --help
    import optuna

    from ablations.space import SearchSpace

BATCH = 8  # the automatic --max-parallel-runs at most: trials asked together are proposed without each other's result
OBJECTIVES = {"pareto": ("maximize", "minimize"), "accuracy": ("maximize",)}


def open_search_study(storage, name: str, objective: str, space: SearchSpace, base: RunConfig) -> optuna.Study:
    """The study, holding its space and fixed settings so that a later invocation extends the same search."""
    from ablations.pareto import changed_fixed, fixed_fields
    from optuna.trial import TrialState

    from ablations.ledger import open_study

    study = open_study(storage, name, OBJECTIVES[objective])
    if "grid" in study.user_attrs:
        raise UsageError(f"study {name!r} holds a grid, not a search: choose another --study-name")
    stored = study.user_attrs.get("search")
    wanted = json.loads(json.dumps({"space": space.to_dict(), "fixed": fixed_fields(base.to_dict())}))
    # Settings are pinned by the first trial that completed: a study whose every trial failed (a dataset that
    # would not load, say) holds no result that other settings could be mixed with, so it takes the new ones.
    if stored is None or not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        # ... but Optuna keeps a categorical parameter's choices for good once any trial holds it (failed ones too):
        # another scheduler list would fail the first trial's suggest with a traceback, so it is refused here
        choices = next((t.distributions["scheduler"].choices for t in study.get_trials(deepcopy=False)
                        if "scheduler" in t.distributions), None)
        if choices is not None and list(choices) != list(space.schedulers):
            raise UsageError(f"study {name!r} holds trials over the schedulers {','.join(choices)}: search those "
                             "again (--schedulers) or choose another --study-name")
        study.set_user_attr("search", wanted)
    elif stored["space"] != wanted["space"]:
        raise UsageError(f"study {name!r} was created with the search space {json.dumps(stored['space'])}: "
                         "search that space again or choose another --study-name")
    elif changed := changed_fixed(stored["fixed"], wanted["fixed"]):  # a copied folder is the same (run ids)
        key = changed[0]
        raise UsageError(f"study {name!r} was created with {key}={stored['fixed'].get(key)!r}, not "
                         f"{wanted['fixed'].get(key)!r}: use the same fixed settings or choose another --study-name")
    return study


def resolve_space(args: argparse.Namespace, layers: int) -> SearchSpace:
    """Defaults (freeze depth 0 to the model's layer count) < the --space file < the range flags."""
    from ablations.space import SearchSpace, parse_choices, parse_range
    from core.config import SCHEDULERS

    space = SearchSpace(freeze_depth=(0, layers))
    if args.space:
        space = SearchSpace.load(args.space, defaults=space)
    flags = {"freeze_depth": (args.freeze_depths, "--freeze-depths", int),
             "epochs": (args.epochs_range, "--epochs-range", int),
             "learning_rate": (args.lr_range, "--lr-range", float),
             "warmup_ratio": (args.warmup_range, "--warmup-range", float)}
    # `is not None`: an empty value (an unset shell variable) is refused, not read as "no narrowing"
    values = {key: list(parse_range(text, flag, kind)) for key, (text, flag, kind) in flags.items() if text is not None}
    if args.schedulers is not None:
        values["schedulers"] = parse_choices(args.schedulers, "--schedulers", SCHEDULERS)
    space = SearchSpace.from_dict(values, defaults=space)
    space.validate(layers)
    return space


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m ablations.optuna_search", description=__doc__.splitlines()[0])
    add_run_arguments(parser, skip=SEARCHED)
    parser.add_argument("--trials", type=int, default=20, metavar="N",
                        help="trials to add in this invocation (default: 20)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (default: tpe)")
    parser.add_argument("--sampler-seed", type=int, default=0, help="sampler seed: a fresh study of one name and "
                        "sampler seed proposes the same configs (default: 0)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="start no new trial after this many seconds (default: no limit)")
    parser.add_argument("--objective", choices=tuple(OBJECTIVES), default="pareto",
                        help="pareto: maximize dev accuracy (dev macro-F1 with --select-by f1) and minimize training "
                             "seconds; accuracy: that dev score alone, in its own study (default name "
                             "search-accuracy) with Optuna's MedianPruner (default: pareto)")
    parser.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True,
                        help="stop trials that cannot reach the front (pareto) or fall below the median (accuracy) "
                             "(default: on)")
    parser.add_argument("--margin", type=float, default=0.01, help="accuracy (macro-F1 with --select-by f1) a "
                        "pruned trial is assumed still able to gain (default: 0.01)")
    parser.add_argument("--space", default=None, metavar="FILE",
                        help="JSON file overriding the search space (see --print-space) (default: none)")
    parser.add_argument("--freeze-depths", default=None, metavar="RANGE", help="freeze depth range, e.g. 0-6, or "
                        "one depth (default: 0 to the model's layer count)")
    parser.add_argument("--schedulers", default=None, metavar="LIST",
                        help="comma-separated schedulers to choose from, e.g. linear,cosine (default: linear,cosine)")
    parser.add_argument("--epochs-range", default=None, metavar="RANGE", help="epochs range, e.g. 1-4 "
                        "(default: 1-4)")
    parser.add_argument("--lr-range", default=None, metavar="LOW,HIGH",
                        help="log-uniform learning rate range, e.g. 1e-5,5e-4, or one rate to hold it fixed "
                        "(default: 1e-5,5e-4)")
    parser.add_argument("--warmup-range", default=None, metavar="LOW,HIGH",
                        help="uniform warmup ratio range, e.g. 0,0.2, or one value to hold it fixed (default: 0,0.2)")
    parser.add_argument("--print-space", action="store_true", help="print the search space as JSON and exit")
    add_study_arguments(parser, default_study=None)  # search, or search-accuracy for --objective accuracy
    add_parallel_argument(parser, f"trials asked at once (auto: at most {BATCH}, so that the sampler learns "
                          "between batches); those of one work shape train together as one stacked model")
    parser.set_defaults(model=None)  # not given: distilbert-base-uncased, or offline the packaged MiniLM
    return parser


def device_label(device: str | None) -> str:
    """The device name runs record, so that only runs timed on this device are compared when pruning."""
    from core.device import resolve_device
    from core.model import device_name
    return device_name(resolve_device(device))


def main() -> int:
    args = build_parser().parse_args()
    checks = [(args.trials >= 1, f"--trials {args.trials} is invalid: use a whole number of at least 1"),
              (args.heartbeat >= 1, f"--heartbeat {args.heartbeat} is invalid: use at least 1 second"),
              (args.margin >= 0, f"--margin {args.margin} is invalid: use 0 or a positive accuracy such as 0.01"),
              (args.timeout is None or args.timeout > 0, f"--timeout {args.timeout} is invalid: use positive seconds")]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    from core.hub import checked_sources
    # a model or data folder that cannot be found is refused before torch and transformers load
    model = checked_sources(args.model, RunConfig.model, args.dataset)
    from core.model import model_config, num_layers
    base = config_from_args(args, skip=SEARCHED, freeze_depth=0, model=model)
    space = resolve_space(args, num_layers(model_config(base.model)))  # checked once, before the model loads
    if args.print_space:
        print(json.dumps(space.to_dict(), indent=2))
        return 0
    name = args.study_name or ("search" if args.objective == "pareto" else "search-accuracy")
    # the output folder is made when it is checked, before the model loads; refused later, the search takes it back
    with new_folders_removed_on_error(args.output_dir or default_output_dir(name)):
        return checked_search(args, base, space, name)


def checked_search(args: argparse.Namespace, base: RunConfig, space, name: str) -> int:
    """The search, its model and data checked once (the pre-flight), then its trials and outputs."""
    url, output_dir = locations(args.storage, args.output_dir, name)
    check_output_dir(output_dir)
    import optuna

    from ablations.ledger import Ledger
    from ablations.storage import mask_url, open_storage, storage_errors
    from ablations.pareto import write_outputs
    from ablations.tuning import choice_metric, split_label
    from core.cli import make_session
    from core.model import preflight
    session = make_session(args)  # what the runs share; the pre-flight's loads are the first run's
    preflight(base, session)  # model and data checked once, before any trial
    device = device_label(args.device)
    engine, size = parallel_runs(args, base, most=BATCH)  # the depth-0 base: the most memory per run
    with storage_errors(url):
        ledger = Ledger(open_storage(url, args.heartbeat))
        study = open_search_study(ledger.storage, name, args.objective, space, base)
        study.pruner = optuna.pruners.MedianPruner()  # consulted in the accuracy study only
        train = make_trainer(args, pass_as="on_epoch", session=session, engine=engine)
        search = Search(study, ledger, base, space, train, args.sampler, args.sampler_seed, args.prune, args.margin,
                        device, poll_seconds=min(5.0, args.heartbeat),
                        train_group=make_group_trainer(args, session, engine) if size > 1 else None, max_parallel=size)
        print(f"search {name!r}: {args.trials} more trial(s), {args.sampler} sampler (seed {args.sampler_seed}), "
              f"training seed {base.seed}, objective {args.objective} on "
              f"{split_label(choice_metric(base), base.dev_size != 0)}, "
              f"pruning {'on' if args.prune else 'off'}, "
              f"space {space.describe()} on {mask_url(url)}; engine {engine}, "
              f"{f'{size} trials asked at once' if size > 1 else 'one trial at a time'}")
        if session.timing_repeats:  # every depth the search may choose timed in one sitting (core.sitting), with
            from ablations.stored_sitting import time_study  # the shapes of the study's stored runs where it grows
            low, high = space.freeze_depth
            time_study(url, name, [base.replace(freeze_depth=d) for d in range(low, high + 1)], session, args.device,
                       compile=args.compile)
        search.run(args.trials, args.timeout, progress=not args.no_progress)
        c = search.counts
        print(f"search {name!r}: {sum(c.values())} trial(s) added, {len(study.get_trials(deepcopy=False))} in the "
              f"study now: {c['trained']} trained ({search.train_seconds:.1f} s "
              f"of training), {c['reused']} answered from stored runs, {c['pruned']} pruned, {c['failed']} failed")
        for failure in search.failures:
            print(f"  failed {failure}")
        print(write_outputs(study, ledger, base, url, output_dir, report=not args.no_report))
    return 1 if c["failed"] and c["failed"] == sum(c.values()) else 0


if __name__ == "__main__":
    main_guard(main)
