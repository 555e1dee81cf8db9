"""Where the commands write by default, and the check that they can, before anything trains.

Examples never touch tracked results: each study writes its tables and plots to `runs/<study>/` and every study
shares one ledger, `runs/ablations.db` (a run trained by the grid answers the search). `runs/` is git-ignored;
`results/` is written only by `results/reproduce.sh`, which names its paths explicitly.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.errors import UsageError

RUNS = Path("runs")


def default_output_dir(study: str) -> str:
    return str(RUNS / study)


def default_storage() -> str:
    return f"sqlite:///{(RUNS / 'ablations.db').resolve()}"


def storage_and_output(storage: str | None, output_dir: str | None, study: str) -> tuple[str | None, str]:
    """--storage and --output-dir as given, else the defaults: with --output-dir alone the ledger stays in it
    (ablations.db there), as it always has; with neither, both go under runs/."""
    if output_dir is None:
        return storage or default_storage(), default_output_dir(study)
    return storage, output_dir


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> None:
    """The folder exists or can be made, and a file can be written in it: fails in one line before training."""
    folder = Path(path).expanduser()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"is under the file {str(existing)!r}"
        raise UsageError(f"{flag} {str(path)!r} {where}: give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {str(path)!r} cannot be written ({error.strerror or error}): give a folder you "
                         "can write to") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {str(path)!r} cannot be written: give a folder you can write to")
