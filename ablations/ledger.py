"""The run ledger on an Optuna storage: claim a run, train it once, record it, reuse it, retry it.

Every run is an Optuna trial whose user attributes hold its `run_id` and full record; values are (dev accuracy,
or dev macro-F1 under --select-by f1, and training seconds: `objective_values`). A run id is trained at most once
per storage, across workers, invocations and studies. The claim protocol uses the database alone, never a
worker's clock:

1. Beside Optuna's tables the storage holds `ablation_runs` (`ablations.runs_table`): one row per run id
   (primary key) naming the trial that holds or completed it, its study and number, its state and its counted
   failures.
2. A worker claims a run by inserting that row for its RUNNING trial, in one transaction. The key is unique,
   so of two concurrent inserts one fails: the loser ends its trial as FAIL `claim_lost` (grid) or waits for
   the winner and reuses its record (search). A look-up reads the rows of the wanted run ids only.
3. The holder sends Optuna heartbeats while training (`ablations.storage.Heartbeat`). A worker that dies
   (kill -9) stops sending them and `optuna.storages.fail_stale_trials` turns its trial into FAIL ("stale") by
   the database's clock; a row whose trial is no longer RUNNING, or that a failed attempt released, is taken
   over by a compare-and-set update on (run id, trial id), which again only one worker can win.
4. A finished run is retried with back-off while the storage is unreachable, then kept in a local spool file
   and stored the next time the storage answers (this invocation's next loop, or the next one).
Storages written before the table existed are indexed once on open (one light query, no records); their runs
keep the ids of that time (`RunConfig.legacy_run_id`), which a look-up also tries.
The read side (a run id's status, its record, every COMPLETE trial by run id) is `ablations.ledger_reads`.
Optuna's GridSampler is deliberately not used: it counts FAIL cells as done and can hand one cell to two
workers (optuna#2039, #5489).
"""
from __future__ import annotations

import datetime

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from ablations.ledger_reads import LedgerReads, RunStatus, StoredRuns
from ablations.runs_table import COUNTED_FAILURES, RUNS, create_runs_table, insert_row, read_rows
from ablations.storage import Spool, mask_url, retrying
from core.errors import UsageError

DIRECTIONS = ("maximize", "minimize")  # dev accuracy (or macro-F1), training seconds
__all__ = ["DIRECTIONS", "Ledger", "RunStatus", "StoredRuns", "open_study"]


def open_study(storage: RDBStorage, name: str, directions: tuple[str, ...] = DIRECTIONS) -> optuna.Study:
    """Open or create a study; ("maximize",) is the accuracy-only study of `--objective accuracy`."""
    study = optuna.create_study(storage=storage, study_name=name, directions=list(directions), load_if_exists=True)
    if [d.name.lower() for d in study.directions] != list(directions):
        wanted = "(accuracy max, seconds min)" if len(directions) == 2 else "(accuracy max)"
        raise UsageError(f"study {name!r} exists with other objectives than {wanted}: choose another --study-name")
    return study


def objective_values(study: optuna.Study, record: dict) -> list[float]:
    """A run's values in the study's objectives: its choice score and training seconds, or the score alone. The
    score (`ablations.tuning.choice_metric`: dev accuracy, or dev macro-F1 for a run selected by it; both maximized)
    is the dev split's where the run had one (Optuna's sampler and pruner choose on it), else validation's."""
    from ablations.tuning import choice_value, record_metric
    values = [choice_value(record, record_metric(record)), record["train_seconds"]]
    return values[:len(study.directions)]


class Ledger(LedgerReads):
    """Reads and writes runs on one storage. Trials of every study count: a run id trains once per storage."""

    def __init__(self, storage: RDBStorage, spool: Spool | None = None):
        super().__init__(storage)
        self.spool = spool or Spool.for_url(str(storage.engine.url))
        self._params: dict[int, tuple[dict, dict]] = {}
        create_runs_table(storage.engine)
        self.flush_spool()

    # -- look-ups (the rest of the read side: `ablations.ledger_reads`) --------------------------------------
    def lookup(self, configs: list) -> dict[str, RunStatus]:
        """The status of each config's run id. A run stored under its legacy id (storages written before
        fingerprints) counts as done: the new id is recorded as an alias of that trial."""
        self.flush_spool()
        ids = [c.run_id for c in configs]  # each id hashes the config and stats the model and data files: once
        rows = read_rows(self.storage.engine, ids)
        missing = [(run_id, c.legacy_run_id) for run_id, c in zip(ids, configs) if run_id not in rows]
        legacy = read_rows(self.storage.engine, [old_id for _, old_id in missing]) if missing else {}
        for run_id, old_id in missing:
            old = legacy.get(old_id)
            if old and old["state"] == "COMPLETE" and insert_row(self.storage.engine, {**old, "run_id": run_id}):
                rows[run_id] = {**old, "run_id": run_id}
        return {run_id: self._status(run_id, rows.get(run_id)) for run_id in ids}

    # -- claims ----------------------------------------------------------------------------------------------
    def claim(self, study: optuna.Study, run_id: str, trial_id: int) -> RunStatus | None:
        """Make `trial_id` the holder of `run_id`: None if it now is, else the status of the run as it stands."""
        trials = models.TrialModel.__table__
        with self.storage.engine.connect() as connection:
            number = connection.execute(sa.select(trials.c.number).where(trials.c.trial_id == trial_id)).scalar_one()
        row = {"run_id": run_id, "trial_id": trial_id, "study": study.study_name, "number": number,
               "state": "RUNNING", "failures": 0}
        for _ in range(3):
            current = read_rows(self.storage.engine, [run_id]).get(run_id)
            if current is None:
                if insert_row(self.storage.engine, row):
                    return None
                continue
            status = self._status(run_id, current)
            if status.complete or status.live:
                return status
            # Released by a failure, or held by a trial that went stale: take it over unless a rival did first.
            with self.storage.engine.begin() as connection:
                taken = connection.execute(RUNS.update().where(
                    (RUNS.c.run_id == run_id) & (RUNS.c.trial_id == current["trial_id"]) &
                    (RUNS.c.state == current["state"])).values(
                    trial_id=trial_id, study=study.study_name, number=number, state="RUNNING")).rowcount
            if taken == 1:
                return None
        return self.lookup_ids([run_id])[run_id]

    def new_claim(self, study: optuna.Study, run_id: str, params: dict, distributions: dict) -> int | None:
        """Create a RUNNING trial for `run_id` and claim the run with it; None (a FAIL `claim_lost`) if lost."""
        # datetime_start is for display (the dashboard's durations); no claim decision reads a worker's clock.
        template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None,
                               datetime_start=datetime.datetime.now(), datetime_complete=None, params=params,
                               distributions=distributions,
                               user_attrs={"run_id": run_id}, system_attrs={}, intermediate_values={}, trial_id=-1)
        trial_id = self.storage.create_new_trial(study._study_id, template_trial=template)
        self.storage.record_heartbeat(trial_id)
        self._params[trial_id] = (params, distributions)
        holder = self.claim(study, run_id, trial_id)
        if holder is not None:
            state = "done" if holder.complete else "claimed"
            self.finish_failed(study, trial_id, "claim_lost", f"run already {state} by {holder.where}; nothing trained")
            return None
        return trial_id

    def tag_claim(self, study: optuna.Study, trial_id: int, config) -> RunStatus | None:
        """Claim `config`'s run with a trial the sampler created (the search); see `claim`."""
        run_id = config.run_id
        self.lookup([config])   # a run stored under its legacy id is found (and aliased) first
        self.storage.set_trial_user_attr(trial_id, "run_id", run_id)
        trial = self.storage.get_trial(trial_id)
        self._params[trial_id] = (trial.params, trial.distributions)
        return self.claim(study, run_id, trial_id)

    def fail_stale(self) -> None:
        for summary in self.storage.get_all_studies():
            optuna.storages.fail_stale_trials(optuna.load_study(study_name=summary.study_name, storage=self.storage))

    def _release(self, trial_id: int, state: str, failed: bool = False) -> None:
        with self.storage.engine.begin() as connection:
            connection.execute(RUNS.update().where((RUNS.c.trial_id == trial_id) & (RUNS.c.state != "COMPLETE"))
                               .values(state=state, failures=RUNS.c.failures + int(failed)))

    # -- outcomes --------------------------------------------------------------------------------------------
    def finish_complete(self, study: optuna.Study, trial_id: int, record: dict, reused_from: str | None = None,
                        run_id: str | None = None) -> None:
        """Store a finished run; while the storage is unreachable retry, then keep it in the spool."""
        values = objective_values(study, record)
        run_id = run_id or record["run_id"]

        def store() -> None:
            try:
                self.storage.set_trial_user_attr(trial_id, "record", record)
                if reused_from:
                    self.storage.set_trial_user_attr(trial_id, "reused_from", reused_from)
                study.tell(optuna.trial.Trial(study, trial_id), values=values)
                stored_as = trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                # Our heartbeats stalled and another worker failed the claim as stale: keep the finished work.
                params, distributions = self._params.get(trial_id) or (
                    self.storage.get_trial(trial_id).params, self.storage.get_trial(trial_id).distributions)
                stored_as = self._add_complete(study, run_id, params, distributions, record)
            if not reused_from:
                self._mark_complete(run_id, stored_as)

        try:
            retrying(store)
        except sa.exc.OperationalError as error:
            params, distributions = self._params.get(trial_id, ({}, {}))
            path = self.spool.add(study.study_name, trial_id, run_id, params, distributions, record)
            print(f"storage unreachable ({mask_url(str(self.storage.engine.url))}: {type(error.orig).__name__}): "
                  f"finished run {run_id} kept in {path}; it is stored when the storage answers again")

    def _add_complete(self, study: optuna.Study, run_id: str, params: dict, distributions: dict, record: dict,
                      **attrs) -> int:
        trial = optuna.trial.create_trial(params=params, distributions=distributions,
                                          values=objective_values(study, record),
                                          user_attrs={"run_id": run_id, "record": record, **attrs})
        return self.storage.create_new_trial(study._study_id, template_trial=trial)

    def _mark_complete(self, run_id: str, trial_id: int) -> dict:
        """Point the run id's row at `trial_id`, COMPLETE (a row already COMPLETE is left alone); returns the
        values written."""
        trials, studies = models.TrialModel.__table__, models.StudyModel.__table__
        with self.storage.engine.connect() as connection:
            number, study = connection.execute(sa.select(trials.c.number, studies.c.study_name).join(
                studies, studies.c.study_id == trials.c.study_id).where(trials.c.trial_id == trial_id)).one()
        values = {"trial_id": trial_id, "study": study, "number": number, "state": "COMPLETE"}
        if not insert_row(self.storage.engine, {"run_id": run_id, "failures": 0, **values}):
            with self.storage.engine.begin() as connection:
                connection.execute(RUNS.update().where((RUNS.c.run_id == run_id) & (RUNS.c.state != "COMPLETE"))
                                   .values(**values))
        return values

    def flush_spool(self) -> None:
        """Store the runs a storage outage left in the spool (one line says how many)."""
        stored = self.spool.flush(self._store_spooled)
        if stored:
            print(f"stored {stored} finished run(s) kept in {self.spool.path} while the storage was unreachable")

    def _store_spooled(self, entry: dict) -> None:
        study = optuna.load_study(study_name=entry["study"], storage=self.storage)
        status = self.lookup_ids([entry["run_id"]])[entry["run_id"]]
        trial_id = self._add_complete(study, entry["run_id"], entry["params"], entry["distributions"],
                                      entry["record"], **({"reused_from": status.where} if status.complete else {}))
        if not status.complete:
            self._mark_complete(entry["run_id"], trial_id)
        try:  # the trial that trained it is still RUNNING: end it, or it would hold the claim until it goes stale
            self.storage.set_trial_state_values(entry["trial_id"], state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
            pass

    def finish_failed(self, study: optuna.Study, trial_id: int, kind: str, reason: str,
                      state: TrialState = TrialState.FAIL, record: dict | None = None) -> None:
        self.storage.set_trial_user_attr(trial_id, "fail_kind", kind)
        self.storage.set_trial_user_attr(trial_id, "fail_reason", reason[:2000])
        if record is not None:
            self.storage.set_trial_user_attr(trial_id, "record", record)
        if kind != "claim_lost":  # released first: a rival may take it over only once the failure is counted
            self._release(trial_id, "FREE", failed=kind in COUNTED_FAILURES)
        study.tell(optuna.trial.Trial(study, trial_id), state=state)

    def copy_complete(self, study: optuna.Study, status: RunStatus, params: dict, distributions: dict) -> None:
        """Answer a run from an identical one that already ran (in this study or another on the storage)."""
        record = self.record(status)
        self._add_complete(study, status.run_id, params, distributions, record, reused_from=status.where)

