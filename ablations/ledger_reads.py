"""What the run ledger reads (`ablations.ledger.Ledger` adds claims and outcomes on top): each run id's status in
`ablation_runs` with its trial's live state, a run's stored record, and every COMPLETE trial of the storage by run
id (`scan`, kept across calls: a finished trial never changes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

from ablations.runs_table import read_rows

__all__ = ["LedgerReads", "RunStatus", "StoredRuns"]


@dataclass
class RunStatus:
    """What the storage knows about one run id: its row in `ablation_runs` (or none)."""
    run_id: str
    state: str | None = None      # None: never claimed
    trial_id: int | None = None
    where: str = ""               # 'study#number' of that trial
    failures: int = 0
    live: bool = False            # RUNNING and its trial still alive

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE"


@dataclass
class StoredRuns:
    """The COMPLETE trials of one run id (the search's Pareto pruning reads records across studies)."""
    complete: list[FrozenTrial] = field(default_factory=list)


class LedgerReads:
    """The read side of the ledger on one storage; every study's trials count."""

    def __init__(self, storage: RDBStorage):
        self.storage = storage
        self._where: dict[int, str] = {}
        self._complete: dict[int, FrozenTrial] = {}   # COMPLETE trials read by `scan`, by trial id
        self._studies_read: set[int] = set()             # studies whose COMPLETE trials `scan` has read in a batch

    def _status(self, run_id: str, row: dict | None) -> RunStatus:
        if row is None:
            return RunStatus(run_id)
        where = f"{row['study']}#{row['number']}"
        self._where[row["trial_id"]] = where
        state, live = row["state"], False
        if state == "RUNNING":
            trial_state = self._trial_state(row["trial_id"])
            live = trial_state == TrialState.RUNNING
            if trial_state == TrialState.COMPLETE:   # told, and its row about to say so: done, never retaken
                state = "COMPLETE"
        return RunStatus(run_id, state, row["trial_id"], where, row["failures"], live)

    def _trial_state(self, trial_id: int) -> TrialState | None:
        trials = models.TrialModel.__table__
        with self.storage.engine.connect() as connection:
            return connection.execute(sa.select(trials.c.state).where(trials.c.trial_id == trial_id)).scalar()

    def lookup_ids(self, run_ids: list[str]) -> dict[str, RunStatus]:
        rows = read_rows(self.storage.engine, run_ids)
        return {run_id: self._status(run_id, rows.get(run_id)) for run_id in run_ids}

    def record(self, status: RunStatus) -> dict:
        return self.storage.get_trial(status.trial_id).user_attrs["record"]

    def complete_in_study(self, study: optuna.Study) -> set[str]:
        """Run ids with a COMPLETE trial in `study` (one light query: no records)."""
        trials, attrs = models.TrialModel.__table__, models.TrialUserAttributeModel.__table__
        query = sa.select(attrs.c.value_json).join(trials, trials.c.trial_id == attrs.c.trial_id).where(
            (trials.c.study_id == study._study_id) & (trials.c.state == TrialState.COMPLETE) &
            (attrs.c.key == "run_id"))
        with self.storage.engine.connect() as connection:
            return {value.strip('"') for value in connection.execute(query).scalars()}

    def where(self, trial: FrozenTrial) -> str:
        """'study#number' of a trial seen by the last look-up or scan."""
        return self._where.get(trial._trial_id, f"trial id {trial._trial_id}")

    def scan(self) -> dict[str, StoredRuns]:
        """Every COMPLETE trial with its record, by run id: the search's pruning reads these before each trial.
        A finished trial never changes, so the ledger keeps those it has read: a scan lists the COMPLETE trials in
        one light query (no records) and reads only those it has not seen, a study it meets first in one batch."""
        trials, studies = models.TrialModel.__table__, models.StudyModel.__table__
        query = sa.select(trials.c.trial_id, trials.c.number, trials.c.study_id, studies.c.study_name).join(
            studies, studies.c.study_id == trials.c.study_id).where(trials.c.state == TrialState.COMPLETE).order_by(
            trials.c.study_id, trials.c.trial_id)
        with self.storage.engine.connect() as connection:
            complete = connection.execute(query).all()
        for trial_id, _, study_id, _ in complete:
            if trial_id in self._complete:
                continue
            if study_id in self._studies_read:
                self._complete[trial_id] = self.storage.get_trial(trial_id)
            else:
                self._complete.update((trial._trial_id, trial) for trial in self.storage.get_all_trials(
                    study_id, deepcopy=False, states=(TrialState.COMPLETE,)))
                self._studies_read.add(study_id)
        index: dict[str, StoredRuns] = {}
        for trial_id, number, _, study_name in complete:
            self._where[trial_id] = f"{study_name}#{number}"
            trial = self._complete[trial_id]
            if (run_id := trial.user_attrs.get("run_id")) is not None:
                index.setdefault(run_id, StoredRuns()).complete.append(trial)
        return index
