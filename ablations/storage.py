"""Opening an Optuna storage, and its faults as one line: unreachable, disk full, corrupt file.
Also a training trial's heartbeat, and every stored trial read back as a plain dict (`load_runs`, the report's
input).

A finished run whose record cannot be stored (the database is down) waits in a spool file beside the user's
cache and is stored the next time a ledger on that storage opens or looks runs up.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import optuna
import sqlalchemy as sa
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from core.errors import UsageError, first_line

# Seconds between attempts to store a finished run while the database does not answer (about a minute in all).
RETRY_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
DISK_FULL = ("database or disk is full", "No space left on device", "could not extend file")
CORRUPT = ("file is not a database", "database disk image is malformed", "file is encrypted or is not a database")
# What the database says when workers started together on an empty one race to create a table (Optuna's or the
# ledger's `ablation_runs`) or its first rows: the losers retry.
RACING = ("duplicate key", "already exists", "UNIQUE constraint", "IntegrityError", "database is locked")

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(url: str | None, output_dir: str | Path) -> str:
    if url and "://" not in url:  # a file path: SQLAlchemy's "Could not parse SQLAlchemy URL" named no way out
        raise UsageError(f"--storage {url!r} is not a storage URL: for a SQLite file give sqlite:///{url}, for "
                         "PostgreSQL postgresql://user:password@host/db")
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


def existing_storage(url: str, flag: str = "--storage") -> str:
    """The URL of a storage a command only reads (lr_choice, timing_passes, merge's sources): a file path is refused
    as by `storage_url`, and a SQLite file must exist: opened, a missing one is created empty, and the command
    answered about an empty ledger ("it holds no studies"; merge copied nothing and said nothing)."""
    url = storage_url(url, ".")
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise UsageError(f"{flag} {url} is invalid: the SQLite file does not exist")
    return url


def mask_url(url: str) -> str:
    """The URL with its password as ***: error messages and logs must not show it."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _hide(text: str, url: str) -> str:
    """`text` (an error message) with the URL's password masked wherever the URL or the password appears."""
    try:
        password = sa.engine.make_url(url).password
    except Exception:
        password = None
    text = text.replace(url, mask_url(url))
    if password:
        text = text.replace(f":{password}@", ":***@").replace(f"password={password}", "password=***")
        if password not in mask_url(url):   # not also part of the user or host name: mask it everywhere
            text = text.replace(password, "***")
    return text


def describe(error: BaseException, url: str) -> str:
    """One line for a storage fault, naming the file or the (masked) server and what to do."""
    text, where = str(error), mask_url(url)
    if url.startswith("sqlite:///"):
        where = url[len("sqlite:///"):]
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or any(t in text for t in DISK_FULL):
        line = f"the disk holding the storage {where!r} is full: free space and start again (stored runs are kept)"
    elif any(t in text for t in CORRUPT):
        line = f"storage file {where!r} is corrupt ({first_line(getattr(error, 'orig', None) or error)}): restore " \
               "it from a copy, or start a new one with another --storage"
    else:
        reason = first_line(getattr(error, "orig", None) or error, 200)
        line = f"cannot use storage {where!r}: {reason}"
    return _hide(line, url)


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn a storage fault into a UsageError of one line (main_guard prints it, exit 2)."""
    try:
        yield
    except (sa.exc.SQLAlchemyError, OSError) as error:
        if isinstance(error, OSError) and error.errno != errno.ENOSPC:
            raise
        raise UsageError(describe(error, url)) from None


def open_storage(url: str, heartbeat_seconds: int = 20) -> RDBStorage:
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                              grace_period=3 * heartbeat_seconds)
        except Exception as error:
            if racing(error) and attempt < 4:
                time.sleep(0.5 + random.random())
                continue
            if isinstance(error, (sa.exc.SQLAlchemyError, OSError)) and any(
                    t in str(error) for t in DISK_FULL + CORRUPT):
                raise UsageError(describe(error, url)) from None
            reason = _hide(first_line(error, 200), url)
            raise UsageError(f"cannot open storage {mask_url(url)!r}: {reason}") from None
    raise UsageError(f"cannot open storage {mask_url(url)!r}: its tables could not be created")


def racing(error: BaseException) -> bool:
    """Whether `error` is another worker creating the same table or row at the same moment (see RACING)."""
    return any(text in str(error) for text in RACING)


def retrying(store: Callable[[], None]) -> None:
    """Call `store`, retrying with back-off while the database is unreachable; the last error is raised."""
    for delay in (*RETRY_SECONDS, None):
        try:
            return store()
        except sa.exc.OperationalError as error:
            if delay is None or any(t in str(error) for t in DISK_FULL + CORRUPT):
                raise
            time.sleep(delay)


class Spool:
    """Finished runs waiting for their storage: one JSON line each, removed once stored."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def for_url(cls, url: str) -> "Spool":
        home = Path(os.environ.get("ABLATIONS_SPOOL_DIR") or Path.home() / ".cache" / "freeze-ablations" / "spool")
        return cls(home / f"{hashlib.sha256(mask_url(url).encode()).hexdigest()[:16]}.jsonl")

    def add(self, study: str, trial_id: int, run_id: str, params: dict, distributions: dict, record: dict) -> Path:
        entry = {"study": study, "trial_id": trial_id, "run_id": run_id, "params": params, "record": record,
                 "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in distributions.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        return self.path

    def flush(self, store: Callable[[dict], None]) -> int:
        """Hand every waiting run to `store`; those it stores leave the file. Returns how many were stored."""
        if not self.path.is_file():
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        left, stored = [], 0
        for line in lines:
            entry = json.loads(line)
            entry["distributions"] = {k: optuna.distributions.json_to_distribution(d)
                                      for k, d in entry["distributions"].items()}
            try:
                store(entry)
                stored += 1
            except sa.exc.OperationalError:
                left.append(line)
        if left:
            self.path.write_text("\n".join(left) + "\n")
        else:
            self.path.unlink()
        return stored


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


def fail_kind(trial: FrozenTrial) -> str | None:
    """Why a trial failed; a FAIL without our own tag was failed by Optuna's stale-heartbeat check."""
    if trial.state != TrialState.FAIL:
        return None
    return trial.user_attrs.get("fail_kind", "stale")


def load_runs(url: str, study_names: list[str] | None = None, retime: bool = True) -> list[dict]:
    """Every stored trial as a plain dict (the report's input), for the named studies or all of them. A study
    that holds a timing sitting (`ablations.stored_sitting.store_sitting`) has its runs' times taken from it
    (`retime=False`: as stored)."""
    with storage_errors(url):
        storage = open_storage(url)
        runs = []
        for name in named_studies(storage, url, study_names):
            study = optuna.load_study(study_name=name, storage=storage)
            found = [run_of(name, trial) for trial in study.get_trials(deepcopy=False)]
            runs += with_sitting(found, study.user_attrs) if retime else found
        return runs


def with_sitting(runs: list[dict], study_attrs: dict) -> list[dict]:
    """`runs` of one study (`run_of`) with their times from the study's stored timing sitting, where it holds one
    (`python -m ablations.timing_passes --interleave --store`); the runs are changed in place and returned."""
    from ablations.stored_sitting import SITTING, on_axis
    if (sitting := study_attrs.get(SITTING)) is None:
        return runs
    for run in runs:
        if run["record"]:
            run["record"] = on_axis(run["record"], sitting)
    return runs


def named_studies(storage: RDBStorage, url: str, wanted: list[str] | None) -> list[str]:
    """The studies to read: those `wanted`, each of which the storage must hold (one line names what it holds), or
    every study in it."""
    names = [s.study_name for s in storage.get_all_studies()]
    for name in wanted or []:
        if name not in names:
            raise UsageError(f"study {name!r} is not in {mask_url(url)!r}: it holds {', '.join(names) or 'no studies'}")
    return wanted or names


def run_of(study_name: str, trial: FrozenTrial) -> dict:
    """One stored trial as a plain dict: a row of `load_runs`."""
    return {"study": study_name, "number": trial.number, "state": trial.state.name,
            "run_id": trial.user_attrs.get("run_id"), "params": dict(trial.params),
            "values": list(trial.values) if trial.values else None,
            "fail_reason": trial.user_attrs.get("fail_reason") or (
                "its worker stopped sending heartbeats" if fail_kind(trial) == "stale" else None),
            "fail_kind": fail_kind(trial),
            "reused_from": trial.user_attrs.get("reused_from"),
            "record": trial.user_attrs.get("record")}
