"""Command-line plumbing shared by `python -m core` and the ablation commands: flags from `RunConfig` fields,
and bad input ending as one line on stderr with exit code 2."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import typing
from typing import Callable

from core.config import RunConfig
from core.errors import UsageError


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
    """One flag per RunConfig field, with its default and help; bools become --x/--no-x."""
    for f in dataclasses.fields(RunConfig):
        if f.name in skip:
            continue
        kind = _parse_type(f.type)
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(_flag(f.name), type=kind, default=f.default,
                                help=f"{f.metadata['help']} (default: {f.default})")


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-gb", type=float, default=4.0, help="host memory for frozen-prefix caches before "
                        "they spill to memory-mapped files (default: 4)")
    parser.add_argument("--cache-device-gb", type=float, default=4.0, help="GPU memory for frozen-prefix caches "
                        "(default: 4)")


def apply_cache_arguments(args: argparse.Namespace) -> None:
    from core.prefix_cache import set_budget
    if args.cache_gb < 0 or args.cache_device_gb < 0:
        raise UsageError("--cache-gb and --cache-device-gb must be 0 or more")
    set_budget(args.cache_device_gb, args.cache_gb)


def config_from_args(args: argparse.Namespace, skip: tuple[str, ...] = (), **overrides) -> RunConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
              if hasattr(args, f.name) and f.name not in skip}
    values.update(overrides)
    return RunConfig(**values)


def main_guard(main: Callable[[], int | None]) -> typing.NoReturn:
    """Run a command: bad input is one line and exit 2, Ctrl-C exit 130, never a traceback for either."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = main() or 0
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Exception as error:
        full = disk_full(error)
        if full is None:
            raise
        print(f"error: disk full: {full}; free some space and run the command again (finished runs are kept)",
              file=sys.stderr)
        code = 1
    sys.exit(code)


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
