"""Command-line plumbing shared by `python -m core` and the ablation commands: flags from `RunConfig` fields,
and bad input ending as one line on stderr with exit code 2.

Imports no torch, transformers or optuna: every command answers --help and argument errors before loading them.
The flags are read from RunConfig's fields by hand rather than by `transformers.HfArgumentParser`, which could not
express them (see add_run_arguments)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import signal
import sys
import threading
import typing
from itertools import takewhile
from pathlib import Path
from typing import Callable, Iterator

from core.config import RunConfig
from core.errors import Terminated, UsageError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, no usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_type(annotation):
    kind = {"int": int, "float": float, "str": str, "bool": bool}
    names = [part.strip() for part in str(annotation).split("|") if part.strip() != "None"]
    return kind[names[0]]


def add_run_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per RunConfig field, with its default and help; bools become --x/--no-x.

    Not HfArgumentParser (transformers 5.24, tried): it cannot leave fields out (the grid's --epochs is a list,
    not RunConfig's int: "conflicting option string"), gives a False-default bool `--x [X]` and no `--no-x`, names
    flags `--freeze_depth` in usage and errors, and importing it loads transformers (~4 s of --help here)."""
    for f in dataclasses.fields(RunConfig):
        if f.name in skip:
            continue
        kind = _parse_type(f.type)
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"{f.metadata['help']} (default: {'on' if f.default else 'off'})")
        else:
            default = "unset" if f.default is None else f.default
            parser.add_argument(_flag(f.name), type=kind, default=f.default,
                                help=f"{f.metadata['help']} (default: {default})")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-gb", type=float, default=4.0, help="host memory for frozen-prefix caches before "
                        "they spill to memory-mapped files (default: 4)")
    parser.add_argument("--cache-device-gb", type=float, default=4.0, help="GPU memory for frozen-prefix caches "
                        "(default: 4)")
    parser.add_argument("--timing-repeats", type=int, default=5, help="timed repeats of a work shape's steps, "
                        "taken alone on the machine, for train_seconds and its 95 %% interval; 1 = a quick look "
                        "without an interval, 0 = no timing pass (train_seconds as the loop ran) (default: 5)")


def make_session(args: argparse.Namespace):
    """The `core.session.Session` a command's runs share, with the cache budgets from the flags."""
    from core.session import Session
    for flag, budget in (("--cache-gb", args.cache_gb), ("--cache-device-gb", args.cache_device_gb)):
        # nan (every comparison with it is False) and inf were budgets without a limit: a cache could then fill
        # the host's memory or the GPU's, which the budget exists to prevent
        if not 0 <= budget < float("inf"):
            raise UsageError(f"{flag} {budget:g} is invalid: use 0 or more gigabytes, a finite number")
    if args.timing_repeats < 0:
        raise UsageError(f"--timing-repeats {args.timing_repeats} is invalid: use 0 (no timing), 1 or more")
    return Session(cache_device_gb=args.cache_device_gb, cache_host_gb=args.cache_gb,
                   timing_repeats=args.timing_repeats)


def config_from_args(args: argparse.Namespace, skip: tuple[str, ...] = (), **overrides) -> RunConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
              if hasattr(args, f.name) and f.name not in skip}
    values.update(overrides)
    return RunConfig(**values)


def main_guard(main: Callable[[], int | None]) -> typing.NoReturn:
    """Run a command: bad input is one line and exit 2, Ctrl-C exit 130 and SIGTERM exit 143 (each one line, after
    the claimed runs are recorded as interrupted), a closed output pipe exit 1, a training loss that became NaN (a
    learning rate of 1e4 typed for 1e-4) or a full disk one line and exit 1, never a traceback for any of them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    before = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        try:
            code = main() or 0
        finally:
            sys.stdout.flush()  # here, where a closed pipe is answered below, not at exit with a traceback
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as `Terminated`
        close_progress_bars()
        terminated = isinstance(stop, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        code = 128 + signal.SIGTERM if terminated else 130
    except FloatingPointError as error:  # core.train: "training loss became nan in epoch 1: lower the learning rate…"
        print(f"error: {error}", file=sys.stderr)
        code = 1
    except Exception as error:
        full = disk_full(error)
        if full is None:
            raise
        print(f"error: disk full: {full}; free some space and run the command again (finished runs are kept)",
              file=sys.stderr)
        code = 1
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)  # a test calling a command in its own process gets its own back
    sys.exit(code)


def close_progress_bars() -> None:
    """Close the bars a stopped command left open, so that the line saying why it stopped stands on a line of its
    own and last, not glued to the end of a bar that is drawn again after it."""
    if (tqdm := sys.modules.get("tqdm")) is None:
        return
    bars = list(getattr(tqdm.tqdm, "_instances", ()))
    # the innermost first (a run's bar below the search's): closing one moves the cursor back up to the bar above
    for bar in sorted(bars, key=lambda bar: -abs(getattr(bar, "pos", 0))):
        with contextlib.suppress(Exception):
            bar.close()


def _raise_terminated(signum, frame) -> typing.NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while the first is cleaned up ends it at once
    raise Terminated()


def disk_full(error: BaseException) -> str | None:
    """What could not be written when `error` (or an error it was raised from) is a full disk, else None.

    A full disk reaches us as OSError ENOSPC (a file, a PNG) or, through SQLAlchemy and Optuna, as SQLite's
    "database or disk is full" wrapped in errors whose own text says something else."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return f"could not write {error.filename!r}" if error.filename else "a write failed"
        if "database or disk is full" in str(error) or "No space left on device" in str(error):
            return "the run ledger could not be written"
        error = error.__cause__ or error.__context__
    return None


def _write_check(folder: Path, flag: str, path: str | Path, what: str) -> None:
    """Make `folder` and write a temporary file in it, or fail in one line naming the flag."""
    import tempfile
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {str(path)!r} cannot be written ({error.strerror or error}): give {what} you can "
                         "write to") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {str(path)!r} cannot be written: give {what} you can write to")


def check_output_file(path: str | Path, flag: str = "--output") -> None:
    """The file can be written: checked before training, so that a finished run is never lost to a bad path."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a folder: give a file name such as {str(target / 'run.json')!r}")
    existing = next(p for p in target.parents if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is under the file {str(existing)!r}: give a path in a folder")
    _write_check(target.parent, flag, path, "a path")
    if target.exists():
        try:
            with open(target, "a"):
                pass
        except OSError as error:
            raise UsageError(f"{flag} {str(path)!r} cannot be written ({error.strerror or error}): give a path you "
                             "can write to") from None


def check_output_dir(path: str | Path, flag: str = "--output-dir") -> None:
    """The folder exists or can be made, and a file can be written in it: fails in one line before training."""
    folder = Path(path).expanduser()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is under the file {str(existing)!r}"
        raise UsageError(f"{flag} {str(path)!r} {where}: give a folder")
    _write_check(folder, flag, path, "a folder")


@contextlib.contextmanager
def new_folders_removed_on_error(*paths: str | Path) -> Iterator[None]:
    """The block, and if it raises, every folder of `paths` (or above one) that did not exist when it began and is
    still empty removed again: a command checks, and so makes, its output folder before the model loads, and one
    refused after that (a depth beyond the model's layers) left an empty folder behind."""
    new: set[Path] = set()
    for path in paths:
        folder = Path(path).expanduser().absolute()
        new.update(takewhile(lambda p: not p.exists(), (folder, *folder.parents)))
    try:
        yield
    except BaseException:
        for folder in sorted(new, key=lambda p: len(p.parts), reverse=True):  # the deepest first
            with contextlib.suppress(OSError):  # not empty (a ledger, a report) or already gone: kept as it is
                folder.rmdir()
        raise
