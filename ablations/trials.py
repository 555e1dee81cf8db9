"""The search's trial loop over the ledger: ask a batch of trials, answer each from a stored run, train the ones
this worker claimed (those of one work shape as one stacked group), wait for runs another worker trains, and
prune by Optuna's pruner (one objective) or by Pareto dominance (two).

`python -m ablations.optuna_search` opens the study and hands it here (`Search.run`).
"""
from __future__ import annotations

import contextlib
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ablations.runner import free_accelerator_memory
from core.config import RunConfig
from core.errors import failure_reason

if TYPE_CHECKING:  # optuna, torch and the ledger load when the search runs, not for --help
    import optuna
    from optuna.trial import Trial
    from tqdm.auto import tqdm

    from ablations.space import SearchSpace
    from ablations.ledger import Ledger

TrainFn = Callable[[RunConfig, Callable[[dict], "str | None"] | None], dict]
GroupTrainFn = Callable[[list[RunConfig], list], list]  # configs of one work shape, their stoppers -> records/errors
SAMPLERS = ("tpe", "nsga2", "random", "qmc")
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


@dataclass
class Outcome:
    """What one trial came to: trained, reused, pruned or failed (lost: another worker failed our claim)."""
    kind: str
    record: dict | None = None
    reason: str | None = None
    replayed: bool = False  # pruned again from an earlier trial's record of the same run: nothing trained


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
                for trial, config in list(claimed):
                    if (outcome := self._pruned_again(trial, config)) is not None:
                        claimed.remove((trial, config))
                        finish(trial, config, outcome)
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
            self.train_seconds += 0.0 if outcome.replayed else outcome.record["train_seconds"]
        elif outcome.kind == "failed":
            self.ledger.finish_failed(self.study, trial_id, "error", outcome.reason)
            self.failures.append(f"trial {trial.number} ({describe([config])}): {outcome.reason}")
            free_accelerator_memory()
        return outcome

    def _pruned_again(self, trial: Trial, config: RunConfig) -> Outcome | None:
        """A run this study pruned before, proposed again: its epochs replayed from that record through this trial's
        pruning rule. Training is deterministic and the front only grows, so where the record's epochs are pruned
        now the run would be again after the same epochs: it is not retrained (with --no-prune, or a margin that
        lets it through, it is)."""
        from optuna.trial import TrialState

        earlier = next((t.user_attrs["record"] for t in self.study.get_trials(deepcopy=False,
                                                                               states=(TrialState.PRUNED,))
                        if t.user_attrs.get("run_id") == config.run_id and t.user_attrs.get("record")), None)
        if earlier is None or not self.prune or len(self.study.directions) != 2:  # a median moves: not replayed
            return None
        from ablations.stored_sitting import SITTING, on_axis
        earlier = on_axis(earlier, self.study.user_attrs.get(SITTING))
        stopper = self._stopper(trial, config)
        for epochs, entry in enumerate(earlier.get("history") or [], start=1):
            if (reason := stopper(entry)) is not None:
                history = earlier["history"][:epochs]
                record = {**earlier, "history": history, "stopped_early": reason,
                          "train_seconds": round(sum(e["train_seconds"] for e in history), 3)}
                return Outcome("pruned", record, f"{reason} (replayed from the run's earlier pruned trial: not "
                                                 "trained again)", replayed=True)
        return None

    def _wait(self, trial: Trial, config: RunConfig, holder) -> Outcome:
        """Another worker trains this run: reuse it when done, or reclaim and train it if that worker went stale."""
        while True:
            if holder is None:  # pruned by the trial that held it (one batch): replayed, not retrained
                return self._pruned_again(trial, config) or self._train_together([(trial, config)])[0]
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
        from ablations.stored_sitting import SITTING
        elsewhere = pareto.storage_points(self.ledger, self.study.study_name, fixed_fields(self.base.to_dict()),
                                          self.device, self.study.user_attrs.get(SITTING)) \
            if self.prune and len(self.study.directions) == 2 else []

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
