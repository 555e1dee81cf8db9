"""The `ablation_runs` table the ledger keeps beside Optuna's tables: one row per run id (primary key) naming the
trial that holds or completed it, its study and number, its state and its counted failures.

A row's state is RUNNING (a trial holds the claim), COMPLETE, or FREE (an attempt failed and released it). The key
is unique, so of two concurrent inserts one fails: that is what makes a claim atomic (`ablations.ledger`).
Storages written before the table existed (or by hand) are indexed once when it is created: one light query over
Optuna's trials, no records.
"""
from __future__ import annotations

import json
import random
import time

import sqlalchemy as sa
from optuna.storages._rdb import models

from ablations.storage import racing

COUNTED_FAILURES = ("error",)           # claim_lost, stale and interrupted attempts are not the run's fault
TABLES = sa.MetaData()
RUNS = sa.Table("ablation_runs", TABLES,
                sa.Column("run_id", sa.String(64), primary_key=True),
                sa.Column("trial_id", sa.Integer, nullable=False),
                sa.Column("study", sa.String(512), nullable=False),
                sa.Column("number", sa.Integer, nullable=False),
                sa.Column("state", sa.String(16), nullable=False),   # RUNNING, COMPLETE or FREE (failed, retry)
                sa.Column("failures", sa.Integer, nullable=False, default=0))


def create_runs_table(engine: sa.engine.Engine) -> None:
    """Create the table where it is missing or empty, and index the trials the storage already holds."""
    for attempt in range(5):
        try:
            with engine.begin() as connection:
                if sa.inspect(connection).has_table(RUNS.name) and connection.execute(
                        sa.select(sa.func.count()).select_from(RUNS)).scalar():
                    return
                RUNS.create(connection, checkfirst=True)
            break
        except sa.exc.SQLAlchemyError as error:   # two workers creating it at once: the loser retries
            if attempt == 4 or not racing(error):
                raise
            time.sleep(0.2 + random.random())
    _index_existing_trials(engine)


def _index_existing_trials(engine: sa.engine.Engine) -> None:
    """Rows for a storage written before the index (or by hand), stored in one transaction."""
    rows = _rows_of(_tagged_trials(engine))
    try:  # one transaction: a commit per row is minutes on a large SQLite file
        with engine.begin() as connection:
            if rows:
                connection.execute(RUNS.insert(), list(rows.values()))
    except sa.exc.IntegrityError:   # another worker indexed some of them meanwhile
        for row in rows.values():
            insert_row(engine, row)


def _tagged_trials(engine: sa.engine.Engine) -> dict[int, dict]:
    """One light query: each tagged trial's number, state, study and its run_id, fail_kind and reused_from tags."""
    trials, attrs = models.TrialModel.__table__, models.TrialUserAttributeModel.__table__
    studies = models.StudyModel.__table__
    query = sa.select(trials.c.trial_id, trials.c.number, trials.c.state, studies.c.study_name, attrs.c.key,
                      attrs.c.value_json).join(studies, studies.c.study_id == trials.c.study_id).join(
        attrs, attrs.c.trial_id == trials.c.trial_id).where(attrs.c.key.in_(("run_id", "fail_kind", "reused_from")))
    found: dict[int, dict] = {}
    with engine.connect() as connection:
        for trial_id, number, state, study, key, value in connection.execute(query):
            entry = found.setdefault(trial_id, {"number": number, "state": getattr(state, "name", state),
                                                "study": study})
            entry[key] = json.loads(value)
    return found


def _rows_of(found: dict[int, dict]) -> dict[str, dict]:
    """A row per run id naming its best trial: COMPLETE (one that trained before one that reused), else RUNNING,
    else FREE; `failures` counts its FAIL trials of a kind in `COUNTED_FAILURES`."""
    rows: dict[str, dict] = {}
    rank = {"COMPLETE": 0, "RUNNING": 1, "FREE": 2}
    for trial_id, entry in sorted(found.items()):
        if "run_id" not in entry or entry["state"] not in ("COMPLETE", "RUNNING", "FAIL"):
            continue
        state = "FREE" if entry["state"] == "FAIL" else entry["state"]
        row = rows.setdefault(entry["run_id"], {"run_id": entry["run_id"], "trial_id": trial_id,
                                                "study": entry["study"], "number": entry["number"],
                                                "state": state, "failures": 0})
        if entry["state"] == "FAIL" and entry.get("fail_kind", "stale") in COUNTED_FAILURES:
            row["failures"] += 1
        better = rank[state] < rank[row["state"]] or (
            state == "COMPLETE" and row["state"] == "COMPLETE" and row.get("reused") and not entry.get(
                "reused_from"))
        if better:
            row.update(trial_id=trial_id, study=entry["study"], number=entry["number"], state=state,
                       reused=bool(entry.get("reused_from")))
    for row in rows.values():
        row.pop("reused", None)
    return rows


def insert_row(engine: sa.engine.Engine, row: dict) -> bool:
    """Insert one row; False if its run id has one already (a rival's claim, or a record)."""
    try:
        with engine.begin() as connection:
            connection.execute(RUNS.insert().values(**row))
        return True
    except sa.exc.IntegrityError:
        return False


def read_rows(engine: sa.engine.Engine, run_ids: list[str]) -> dict[str, dict]:
    """The rows of the given run ids (those that have one), by run id."""
    rows = {}
    with engine.connect() as connection:
        for start in range(0, len(run_ids), 500):
            chunk = run_ids[start:start + 500]
            for row in connection.execute(sa.select(RUNS).where(RUNS.c.run_id.in_(chunk))).mappings():
                rows[row["run_id"]] = dict(row)
    return rows
