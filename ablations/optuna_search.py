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
import contextlib
import json
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ablations.runner import (
    SEARCHED,
    add_parallel_argument,
    add_study_arguments,
    free_accelerator_memory,
    locations,
    make_group_trainer,
    make_trainer,
    parallel_runs,
)
from core.cli import ArgumentParser, add_run_arguments, check_output_dir, config_from_args, main_guard
from core.config import RunConfig
from core.errors import UsageError, failure_reason

if TYPE_CHECKING:  # optuna, torch and the ledger load when the search runs, not for --help
    import optuna
    from optuna.trial import Trial
    from tqdm.auto import tqdm

    from ablations.space import SearchSpace
    from ablations.ledger import Ledger

TrainFn = Callable[[RunConfig, Callable[[dict], "str | None"] | None], dict]
GroupTrainFn = Callable[[list[RunConfig], list], list]  # configs of one work shape, their stoppers -> records/errors
SAMPLERS = ("tpe", "nsga2", "random", "qmc")
BATCH = 8  # the automatic --max-parallel-runs at most: trials asked together are proposed without each other's result
OBJECTIVES = {"pareto": ("maximize", "minimize"), "accuracy": ("maximize",)}
# The ledger drives trials by ask/tell under its own heartbeats; Optuna's hint about optimize() does not apply.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)  # multi-objective TPE on the two-objective study
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


def suggest(trial: Trial, space: SearchSpace) -> dict:
    return {"freeze_depth": trial.suggest_int("freeze_depth", *space.freeze_depth),
            "scheduler": trial.suggest_categorical("scheduler", list(space.schedulers)),
            "epochs": trial.suggest_int("epochs", *space.epochs),
            "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
            "warmup_ratio": trial.suggest_float("warmup_ratio", *space.warmup_ratio)}


def open_search_study(storage, name: str, objective: str, space: SearchSpace, base: RunConfig) -> optuna.Study:
    """The study, holding its space and fixed settings so that a later invocation extends the same search."""
    from ablations.pareto import fixed_fields
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
        study.set_user_attr("search", wanted)
    elif stored["space"] != wanted["space"]:
        raise UsageError(f"study {name!r} was created with the search space {json.dumps(stored['space'])}: "
                         "search that space again or choose another --study-name")
    elif stored["fixed"] != wanted["fixed"]:
        changed = next(k for k in wanted["fixed"] if stored["fixed"].get(k) != wanted["fixed"][k])
        raise UsageError(f"study {name!r} was created with {changed}={stored['fixed'].get(changed)!r}, not "
                         f"{wanted['fixed'][changed]!r}: use the same fixed settings or choose another --study-name")
    return study


@dataclass
class Outcome:
    """What one trial came to: trained, reused, pruned or failed (lost: another worker failed our claim)."""
    kind: str
    record: dict | None = None
    reason: str | None = None


def outcome_of(result: dict | Exception) -> Outcome:
    """A trained run's record (or the error that ended it) as a trial's outcome."""
    if isinstance(result, Exception):
        return Outcome("failed", reason=failure_reason(result))
    if result.get("stopped_early"):
        return Outcome("pruned", result, result["stopped_early"])
    return Outcome("trained", result)


def describe(configs: list[RunConfig]) -> str:
    """What is training now, for the progress bar and failure lines: one config, or a stacked group's shape."""
    c = configs[0]
    if len(configs) == 1:
        return f"freeze {c.freeze_depth}, {c.scheduler}, {c.epochs} ep, lr {c.learning_rate:.2g}"
    return f"freeze {c.freeze_depth}, {len(configs)} trials stacked"


@dataclass
class Search:
    study: optuna.Study
    ledger: Ledger
    base: RunConfig
    space: SearchSpace
    train: TrainFn
    sampler: str = "tpe"
    seed: int | None = 0
    prune: bool = True
    margin: float = 0.01
    device: str | None = None      # runs timed on another device are not compared when pruning
    poll_seconds: float = 5.0
    train_group: GroupTrainFn | None = None  # runs of one work shape as one stacked group (core.group)
    max_parallel: int = 1  # trials asked at once; those sharing a work shape train together (with train_group)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("trained", "reused", "pruned", "failed", "lost"), 0))
    failures: list[str] = field(default_factory=list)  # this invocation's failed runs: config and reason
    train_seconds: float = 0.0

    def run(self, trials: int, timeout: float | None = None, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        started, left = time.time(), trials
        bar = tqdm(total=trials, disable=not progress, unit="trial", desc=f"search {self.study.study_name}")
        while left > 0:
            if timeout is not None and time.time() - started > timeout:
                break
            # Trials of a killed worker are failed here (Optuna does so only inside Study.optimize): left RUNNING,
            # they would stay in the report's counts and in TPE's constant liar for good.
            self.ledger.fail_stale()
            size = min(left, self.max_parallel if self.train_group else 1)
            for outcome in self.batch(size, bar):
                self.counts[outcome.kind] += 1
                bar.update()
            left -= size
        self.ledger.fail_stale()  # a worker killed only moments before this one started is stale by now
        bar.close()

    def batch(self, size: int, bar: tqdm) -> list[Outcome]:
        """Ask `size` trials, then answer each from a stored run, train the ones this worker claimed — those of one
        work shape as one stacked group where `train_group` is given (`core.group`), each trial still its own
        record — or wait for a run another worker trains. Each trial is finished as soon as its outcome is known."""
        from ablations.storage import Heartbeat

        asked: list[tuple[Trial, RunConfig]] = []
        outcomes: dict[int, Outcome] = {}

        def finish(trial: Trial, config: RunConfig, outcome: Outcome) -> None:
            outcomes[trial.number] = self._finish(trial, config, outcome)

        try:
            for _ in range(size):  # inside the try: a Ctrl-C between two asks fails the trials asked before it
                asked.append(self._ask())
            with contextlib.ExitStack() as beats:
                for trial, _ in asked:
                    beats.enter_context(Heartbeat(self.ledger.storage, trial._trial_id))
                claimed, waiting = [], []
                for trial, config in asked:
                    holder = self.ledger.tag_claim(self.study, trial._trial_id, config)  # tags once, then claims
                    if holder is None:
                        claimed.append((trial, config))
                    elif holder.complete:
                        finish(trial, config, Outcome("reused", self.ledger.record(holder), holder.where))
                    else:
                        waiting.append((trial, config, holder))
                for group in self._groups(claimed):
                    bar.set_postfix_str(describe([c for _, c in group]))
                    for (trial, config), outcome in zip(group, self._train_together(group)):
                        finish(trial, config, outcome)
                for trial, config, holder in waiting:
                    finish(trial, config, self._wait(trial, config, holder))
        except KeyboardInterrupt:
            for trial, _ in asked:
                if trial.number not in outcomes:
                    self.ledger.finish_failed(self.study, trial._trial_id, "interrupted", "interrupted by the user")
            raise
        return [outcomes[trial.number] for trial, _ in asked]

    def _ask(self) -> tuple[Trial, RunConfig]:
        trial = self.study.ask()
        # Re-seeded per trial from (study name, seed, trial number): a fresh study of one name and seed proposes
        # the same configs, workers sharing a study (numbers are unique) never propose in lockstep, and two
        # studies on one storage do not replay each other's proposals (which the ledger would answer, not train).
        # Trials asked together in one batch see each other as running (TPE's constant liar keeps them apart).
        key = f"{self.study.study_name}/{self.seed}/{trial.number}".encode()
        self.study.sampler = make_sampler(self.sampler, None if self.seed is None else zlib.crc32(key))
        self.ledger.storage.record_heartbeat(trial._trial_id)  # a worker killed from here on leaves a stale trial
        return trial, self.base.replace(**suggest(trial, self.space))

    def _groups(self, claimed: list[tuple[Trial, RunConfig]]) -> list[list[tuple[Trial, RunConfig]]]:
        """The claimed trials by work shape (`core.stacked.group_key`), in the order they were asked."""
        from core.stacked import group_key

        groups: dict[tuple, list] = {}
        for trial, config in claimed:
            groups.setdefault(group_key(config), []).append((trial, config))
        return list(groups.values())

    def _finish(self, trial: Trial, config: RunConfig, outcome: Outcome) -> Outcome:
        from optuna.trial import TrialState

        trial_id = trial._trial_id
        if outcome.kind == "trained":
            self.ledger.finish_complete(self.study, trial_id, outcome.record)
            self.train_seconds += outcome.record["train_seconds"]
        elif outcome.kind == "reused":
            self.ledger.finish_complete(self.study, trial_id, outcome.record, reused_from=outcome.reason)
        elif outcome.kind == "pruned":
            self.ledger.finish_failed(self.study, trial_id, "pruned", outcome.reason, state=TrialState.PRUNED,
                                      record=outcome.record)
            self.train_seconds += outcome.record["train_seconds"]
        elif outcome.kind == "failed":
            self.ledger.finish_failed(self.study, trial_id, "error", outcome.reason)
            self.failures.append(f"trial {trial.number} ({describe([config])}): {outcome.reason}")
            free_accelerator_memory()
        return outcome

    def _wait(self, trial: Trial, config: RunConfig, holder) -> Outcome:
        """Another worker trains this run: reuse it when done, or reclaim and train it if that worker went stale."""
        while True:
            if holder is None:
                return self._train_together([(trial, config)])[0]
            if holder.complete:
                return Outcome("reused", self.ledger.record(holder), holder.where)
            time.sleep(self.poll_seconds)
            self.ledger.fail_stale()
            holder = self.ledger.claim(self.study, config.run_id, trial._trial_id)

    def _train_together(self, group: list[tuple[Trial, RunConfig]]) -> list[Outcome]:
        """Train the group's runs, alone (`train`) or as one stacked group (`train_group`); each run's outcome."""
        try:
            if len(group) == 1:
                trial, config = group[0]
                results = [self.train(config, self._stopper(trial, config))]
            else:
                results = self.train_group([c for _, c in group], [self._stopper(t, c) for t, c in group])
        except Exception as error:  # NaN loss at a high learning rate, out of memory: record it, search on
            results = [error] * len(group)
        return [outcome_of(result) for result in results]

    def _stopper(self, trial: Trial, config: RunConfig) -> Callable[[dict], str | None]:
        """The on_epoch callback: Optuna's pruner for one objective, Pareto dominance for two."""
        from ablations import pareto
        from ablations.pareto import fixed_fields
        from ablations.tuning import choice_metric, choice_value

        metric, named = choice_metric(self.base), pareto.SCORE_NAMES[choice_metric(self.base)]
        history: list[dict] = []
        elsewhere = pareto.storage_points(self.ledger, self.study.study_name, fixed_fields(self.base.to_dict()),
                                          self.device) if self.prune and len(self.study.directions) == 2 else []

        def on_epoch(entry: dict) -> str | None:
            history.append(entry)
            last = entry["epoch"] >= config.epochs  # a finished run is worth keeping: never prune the last epoch
            if len(self.study.directions) == 1:
                trial.report(choice_value(entry, metric), entry["epoch"])  # dev: the report's set chooses nothing
                if self.prune and not last and trial.should_prune():
                    return (f"pruned by {type(self.study.pruner).__name__} after epoch {entry['epoch']}: {named} "
                            f"{choice_value(entry, metric):.4f} is below the median of earlier trials at that epoch")
                return None
            if not self.prune or last:
                return None
            return pareto.prune_reason(elsewhere + pareto.study_points(self.study, self.device, metric), history,
                                       self.margin, metric)

        return on_epoch


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
    values = {key: list(parse_range(text, flag, kind)) for key, (text, flag, kind) in flags.items() if text}
    if args.schedulers:
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
    from core.model import model_config, num_layers, preflight
    base = config_from_args(args, skip=SEARCHED, freeze_depth=0, model=model)
    space = resolve_space(args, num_layers(model_config(base.model)))  # checked once, before the model loads
    if args.print_space:
        print(json.dumps(space.to_dict(), indent=2))
        return 0
    name = args.study_name or ("search" if args.objective == "pareto" else "search-accuracy")
    url, output_dir = locations(args.storage, args.output_dir, name)
    check_output_dir(output_dir)
    import optuna

    from ablations.ledger import Ledger
    from ablations.storage import mask_url, open_storage, storage_errors
    from ablations.pareto import write_outputs
    from ablations.tuning import CHOICE_LABELS, choice_metric
    from core.cli import make_session
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
              f"training seed {base.seed}, objective {args.objective} on {CHOICE_LABELS[choice_metric(base)]}, "
              f"pruning {'on' if args.prune else 'off'}, "
              f"space {space.describe()} on {mask_url(url)}; engine {engine}, "
              f"{f'{size} trials asked at once' if size > 1 else 'one trial at a time'}")
        if session.timing_repeats:  # every depth the search may choose timed in one sitting (core.sitting), with
            from ablations.timing_passes import time_study  # the shapes of the study's stored runs where it grows
            low, high = space.freeze_depth
            time_study(url, name, [base.replace(freeze_depth=d) for d in range(low, high + 1)], session, args.device,
                       compile=args.compile)
        search.run(args.trials, args.timeout, progress=not args.no_progress)
        c = search.counts
        print(f"search {name!r}: {sum(c.values())} trial(s) now: {c['trained']} trained ({search.train_seconds:.1f} s "
              f"of training), {c['reused']} answered from stored runs, {c['pruned']} pruned, {c['failed']} failed")
        for failure in search.failures:
            print(f"  failed {failure}")
        print(write_outputs(study, ledger, base, url, output_dir, report=not args.no_report))
    return 1 if c["failed"] and c["failed"] == sum(c.values()) else 0


if __name__ == "__main__":
    main_guard(main)
