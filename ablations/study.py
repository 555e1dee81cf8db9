"""The run ledger on an Optuna storage: claim a run, train it once, record it, reuse it, retry it.

Every run is an Optuna trial whose user attributes hold its `run_id` and full record; values are
(validation accuracy, training seconds). A run id is trained at most once per storage, across workers,
invocations and studies. The claim protocol, on top of Optuna's own storage and heartbeat machinery:

1. A worker writes a RUNNING trial tagged with the run id and a claim time (one insert, so atomic).
2. It waits a settle time, longer than a claim insert may take, so every concurrent claim is visible.
3. Among live claims of that run id in any study of the storage, the earliest (claim time, trial id) wins;
   the others end as FAIL with `fail_kind` "claim_lost" and train nothing.
4. The winner sends heartbeats while training; a worker that dies (kill -9) stops sending them, and
   `optuna.storages.fail_stale_trials` turns its trial into FAIL ("stale") so another worker reclaims the run.
Optuna's GridSampler is deliberately not used: it counts FAIL cells as done and can hand one cell to two
workers (optuna#2039, #5489).
"""
from __future__ import annotations

import datetime
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from core.errors import UsageError, first_line

# How long a claim waits before it looks for rivals: longer than a claim insert takes to land (a claim whose
# insert took more than half of it is withdrawn). SQLite serialises writers on one machine; a database server
# has clients on machines whose clocks differ by a little.
SETTLE_SECONDS = float(os.environ["ABLATIONS_SETTLE_SECONDS"]) if "ABLATIONS_SETTLE_SECONDS" in os.environ else None


def settle_seconds(storage: RDBStorage) -> float:
    if SETTLE_SECONDS is not None:
        return SETTLE_SECONDS
    return 0.25 if str(storage.engine.url).startswith("sqlite") else 0.5
DIRECTIONS = ("maximize", "minimize")  # validation accuracy, training seconds
COUNTED_FAILURES = ("error",)           # claim_lost, stale and interrupted attempts are not the run's fault

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(url: str | None, output_dir: str | Path) -> str:
    if not url:
        path = Path(output_dir).resolve() / "ablations.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if url.startswith(("postgresql://", "postgres://")):
        try:  # SQLAlchemy's default PostgreSQL driver is psycopg2; use psycopg 3 when that is what is installed
            import psycopg2  # noqa: F401
        except ImportError:
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(url: str, heartbeat_seconds: int = 20) -> RDBStorage:
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                              grace_period=3 * heartbeat_seconds)
        except Exception as error:
            # Workers started together on an empty database race to create Optuna's tables: the losers retry.
            racing = ("duplicate key", "already exists", "UNIQUE constraint", "IntegrityError", "database is locked")
            if any(text in str(error) for text in racing) and attempt < 4:
                time.sleep(0.5 + random.random())
                continue
            reason = first_line(error, 200)
            raise UsageError(f"cannot open storage {url!r}: {reason}") from None
    raise UsageError(f"cannot open storage {url!r}: its tables could not be created")


def fail_kind(trial: FrozenTrial) -> str | None:
    """Why a trial failed; a FAIL without our own tag was failed by Optuna's stale-heartbeat check."""
    if trial.state != TrialState.FAIL:
        return None
    return trial.user_attrs.get("fail_kind", "stale")


def open_study(storage: RDBStorage, name: str, directions: tuple[str, ...] = DIRECTIONS) -> optuna.Study:
    """Open or create a study; ("maximize",) is the accuracy-only study of `--objective accuracy`."""
    study = optuna.create_study(storage=storage, study_name=name, directions=list(directions), load_if_exists=True)
    if [d.name.lower() for d in study.directions] != list(directions):
        wanted = "(accuracy max, seconds min)" if len(directions) == 2 else "(accuracy max)"
        raise UsageError(f"study {name!r} exists with other objectives than {wanted}: choose another --study-name")
    return study


def objective_values(study: optuna.Study, record: dict) -> list[float]:
    """A run's values in the study's objectives: accuracy and training seconds, or accuracy alone. The accuracy is
    the dev split's where the run had one (Optuna's sampler and pruner choose on it), else validation's."""
    from ablations.tuning import choice_accuracy
    values = [choice_accuracy(record), record["train_seconds"]]
    return values[:len(study.directions)]


@dataclass
class RunStatus:
    """What the storage knows about one run id, across all of its studies."""
    complete: list[FrozenTrial] = field(default_factory=list)
    live: list[FrozenTrial] = field(default_factory=list)
    failures: list[FrozenTrial] = field(default_factory=list)

    @property
    def record(self) -> dict | None:
        trained = [t for t in self.complete if not t.user_attrs.get("reused_from")] or self.complete
        return trained[0].user_attrs.get("record") if trained else None


class Ledger:
    """Reads and writes runs on one storage. Trials of every study count: a run id trains once per storage."""

    def __init__(self, storage: RDBStorage):
        self.storage = storage
        self._where: dict[int, str] = {}

    def fail_stale(self) -> None:
        for summary in self.storage.get_all_studies():
            optuna.storages.fail_stale_trials(optuna.load_study(study_name=summary.study_name, storage=self.storage))

    def scan(self) -> dict[str, RunStatus]:
        index: dict[str, RunStatus] = {}
        states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL)
        for summary in self.storage.get_all_studies():
            for trial in self.storage.get_all_trials(summary._study_id, deepcopy=False, states=states):
                self._where[trial._trial_id] = f"{summary.study_name}#{trial.number}"
                run_id = trial.user_attrs.get("run_id")
                if run_id is None:
                    continue
                status = index.setdefault(run_id, RunStatus())
                if trial.state == TrialState.COMPLETE:
                    status.complete.append(trial)
                elif trial.state == TrialState.RUNNING:
                    status.live.append(trial)
                elif fail_kind(trial) in COUNTED_FAILURES:
                    status.failures.append(trial)
        return index

    def where(self, trial: FrozenTrial) -> str:
        """'study#number' of a trial seen by the last scan."""
        return self._where.get(trial._trial_id, f"trial id {trial._trial_id}")

    def create_claim(self, study: optuna.Study, run_id: str, params: dict, distributions: dict) -> int | None:
        """Insert a RUNNING trial that carries the run id from its first moment (the claim); None if withdrawn."""
        now = datetime.datetime.now()
        template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, datetime_start=now,
                               datetime_complete=None, params=params, distributions=distributions,
                               user_attrs={"run_id": run_id, "claimed_at": time.time()}, system_attrs={},
                               intermediate_values={}, trial_id=-1)
        trial_id = self.storage.create_new_trial(study._study_id, template_trial=template)
        self.storage.record_heartbeat(trial_id)
        if time.time() - template.user_attrs["claimed_at"] > settle_seconds(self.storage) / 2:
            # A claim that landed late could be invisible to a rival that settled before it: withdraw it.
            self.finish_failed(study, trial_id, "claim_lost", "the claim took too long to land; retried")
            return None
        return trial_id

    def tag_claim(self, trial_id: int, run_id: str) -> None:
        """Turn a trial the sampler created (the search) into a claim of `run_id`."""
        claimed_at = time.time()
        self.storage.set_trial_user_attr(trial_id, "claimed_at", claimed_at)
        self.storage.set_trial_user_attr(trial_id, "run_id", run_id)
        if time.time() - claimed_at > settle_seconds(self.storage) / 2:
            # Landed late: move the claim time to now. A later claim time can only make this claim lose a tie.
            self.storage.set_trial_user_attr(trial_id, "claimed_at", time.time())
        self.storage.record_heartbeat(trial_id)

    def settle(self, trial_id: int, run_id: str) -> tuple[bool, RunStatus]:
        """Wait for concurrent claims to land, then tell whether this claim is the one that trains."""
        time.sleep(settle_seconds(self.storage))
        status = self.scan().get(run_id, RunStatus())
        if status.complete:
            return False, status
        order = sorted(status.live, key=lambda t: (t.user_attrs.get("claimed_at", 0.0), t._trial_id))
        return bool(order) and order[0]._trial_id == trial_id, status

    def give_up_claim(self, study: optuna.Study, trial_id: int, status: RunStatus) -> None:
        holder = next((t for t in status.complete + status.live if t._trial_id != trial_id), None)
        reason = f"run already {'done' if status.complete else 'claimed'} by {self.where(holder)}" if holder \
            else "claim lost"
        self.finish_failed(study, trial_id, "claim_lost", f"{reason}; nothing trained")

    def finish_complete(self, study: optuna.Study, trial_id: int, record: dict, reused_from: str | None = None) -> None:
        values = objective_values(study, record)
        try:
            self.storage.set_trial_user_attr(trial_id, "record", record)
            if reused_from:
                self.storage.set_trial_user_attr(trial_id, "reused_from", reused_from)
            study.tell(optuna.trial.Trial(study, trial_id), values=values)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Our heartbeats stalled and another worker failed the claim as stale: keep the finished work anyway.
            study.add_trial(optuna.trial.create_trial(
                params=self.storage.get_trial(trial_id).params, distributions=self.storage.get_trial(
                    trial_id).distributions, values=values, user_attrs={"run_id": record["run_id"],
                                                                        "record": record}))

    def finish_failed(self, study: optuna.Study, trial_id: int, kind: str, reason: str,
                      state: TrialState = TrialState.FAIL, record: dict | None = None) -> None:
        self.storage.set_trial_user_attr(trial_id, "fail_kind", kind)
        self.storage.set_trial_user_attr(trial_id, "fail_reason", reason[:2000])
        if record is not None:
            self.storage.set_trial_user_attr(trial_id, "record", record)
        study.tell(optuna.trial.Trial(study, trial_id), state=state)

    def copy_complete(self, study: optuna.Study, source: FrozenTrial, params: dict, distributions: dict) -> None:
        """Answer a run from an identical one that already ran (in this study or another on the storage)."""
        record = source.user_attrs["record"]
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, values=objective_values(study, record),
            user_attrs={"run_id": source.user_attrs["run_id"], "record": record, "reused_from": self.where(source)}))


class Heartbeat:
    """Tells the storage, every few seconds, that the worker holding `trial_id` is alive."""

    def __init__(self, storage: RDBStorage, trial_id: int):
        self.storage, self.trial_id, self.stop_event = storage, trial_id, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval() or 20
        while not self.stop_event.wait(interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a missed beat is retried next interval; the run itself must go on
                pass

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()


def load_runs(url: str, study_names: list[str] | None = None) -> list[dict]:
    """Every stored trial as a plain dict (the report's input), for the named studies or all of them."""
    storage = open_storage(url)
    names = [s.study_name for s in storage.get_all_studies()]
    for name in study_names or []:
        if name not in names:
            raise UsageError(f"study {name!r} is not in {url!r}: it holds {', '.join(names) or 'no studies'}")
    runs = []
    for name in study_names or names:
        for trial in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            runs.append({"study": name, "number": trial.number, "state": trial.state.name,
                         "run_id": trial.user_attrs.get("run_id"), "params": dict(trial.params),
                         "values": list(trial.values) if trial.values else None,
                         "fail_reason": trial.user_attrs.get("fail_reason") or (
                             "its worker stopped sending heartbeats" if fail_kind(trial) == "stale" else None),
                         "fail_kind": fail_kind(trial),
                         "reused_from": trial.user_attrs.get("reused_from"),
                         "record": trial.user_attrs.get("record")})
    return runs
