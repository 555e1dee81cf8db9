"""What the commands share (grid, search, report, merge, lr_choice): where results go, the study flags, the trainer,
the report at the end. Commands are siblings over this module; none imports another.

Importing it loads no torch, transformers, optuna or pandas, so every command answers --help and argument errors
at once; what a command needs to run is imported when it runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from core.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

    from core.config import RunConfig

STORAGE_FILE = "ablations.db"
# What a search varies; its runs share every other field of the config (ablations.pareto.fixed_fields).
SEARCHED = ("freeze_depth", "scheduler", "epochs", "learning_rate", "warmup_ratio")


RUNS = Path("runs")  # git-ignored: examples never touch tracked results (results/ is reproduce.sh's alone)


def default_output_dir(study_name: str | None) -> str:
    """The folder a command writes to when --output-dir is not given: runs/<study>/, so the grid and the search
    never overwrite each other's tables; runs/ for a report over several studies or all of them."""
    return str(RUNS / study_name) if study_name else str(RUNS)


def default_storage(output_dir: str | Path | None = None) -> str:
    """The ledger when --storage is not given: runs/ablations.db, one for every study (a run the grid trained
    answers the search), or ablations.db in --output-dir when only that is given."""
    return f"sqlite:///{(Path(output_dir) if output_dir else RUNS).resolve() / STORAGE_FILE}"


def locations(storage: str | None, output_dir: str | None, study_name: str | None) -> tuple[str, str]:
    """(storage URL, output folder) from --storage and --output-dir, each defaulted as above; a default SQLite
    file's folder is made, and a PostgreSQL URL gets the installed driver."""
    from ablations.storage import storage_url
    from core.cli import check_output_dir

    url = storage or default_storage(output_dir)
    if url.startswith("sqlite:///") and storage is None:  # a file where the folder goes was a FileExistsError
        check_output_dir(output_dir or RUNS, "--output-dir" if output_dir else "the ledger's folder")
    output = output_dir or default_output_dir(study_name)
    return storage_url(url, output), output


def split_names(values: list[str] | str | None) -> list[str] | None:
    """Study names as a comma-separated list ('grid,search'); separate words ('grid search') are still accepted."""
    if values is None:
        return None
    names = [name.strip() for value in ([values] if isinstance(values, str) else values)
             for name in value.split(",") if name.strip()]
    return names or None


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--storage and --output-dir, with the defaults every command shares."""
    parser.add_argument("--storage", default=None, metavar="URL", help="Optuna storage URL (sqlite:///x.db, "
                        f"postgresql://user:pass@host/db) (default: {RUNS / STORAGE_FILE}, one ledger for every "
                        f"study; {STORAGE_FILE} in --output-dir when only that is given)")
    parser.add_argument("--output-dir", default=None, metavar="DIR", help="where tables and plots go (default: "
                        f"{default_output_dir('STUDY')})")


def add_study_arguments(parser: argparse.ArgumentParser, default_study: str | None) -> None:
    """Flags the grid and the search share: where runs are stored and how a worker behaves."""
    from core.cli import add_cache_arguments

    add_output_arguments(parser)
    parser.add_argument("--study-name", default=default_study, metavar="NAME",
                        help=f"Optuna study name (default: {default_study or 'see --objective'})")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--heartbeat", type=int, default=20, metavar="SECONDS", help="seconds between a worker's "
                        "heartbeats; a run whose worker is silent for 3 beats is failed and reclaimed (default: 20)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")
    parser.add_argument("--no-report", action="store_true", help="skip the trade-off report at the end "
                        "(default: written)")
    parser.add_argument("--compile", action="store_true", help="run models through torch.compile (default: off)")
    parser.add_argument("--engine", default="auto", help="auto, eager, stacked or captured: how runs train (auto: "
                        "on CUDA the captured step if a probe captures the model, else stacked for a group of "
                        "several runs, else eager; see README, Engines) (default: auto)")
    parser.add_argument("--exact-dropout", action="store_true", help="stacked runs draw the dropout masks each "
                        "would draw alone, bit for bit (slower: a draw per run at every dropout; steps not captured) "
                        "(default: one draw over the group's rows, equal to alone in distribution)")
    add_cache_arguments(parser)


def make_trainer(args: argparse.Namespace, pass_as: str, session=None, engine: str = "eager"
                 ) -> Callable[[RunConfig, Any], dict]:
    """One run with the command's device, progress and compile flags, returning the record as stored: `core.run`
    (the eager engine, and the automatic one where it would stack: it stacks groups of several runs only), or a
    group of one run (`core.group.run_group`, its step captured where `engine` is
    "captured"). The trainer's second argument is the command's own (the grid's schedule siblings, the search's
    per-epoch callback), passed to `run` as `pass_as`; a group takes only a per-epoch callback."""
    from core import run
    from core.cli import make_session

    session = session or make_session(args)  # the command's runs share one session: data, checkpoint, caches
    if engine == "stacked" and args.engine == "auto":
        engine = "eager"  # auto stacks groups of several runs; a run alone takes the solo step (and shared steps)
    if engine == "eager":
        return lambda config, extra: run(config, device=args.device, progress=not args.no_progress,
                                         compile=args.compile, session=session, **{pass_as: extra}).to_dict()
    from core.captured import CapturedStep
    from core.group import run_group

    def one_group(config: RunConfig, extra: Any) -> dict:  # a group of one: siblings do not apply in a group
        result = run_group([config], session, args.device, on_epoch=[extra] if pass_as == "on_epoch" else None,
                           capture=CapturedStep if engine == "captured" else None,
                           exact_dropout=args.exact_dropout)[0]
        if isinstance(result, Exception):
            raise result
        return result.to_dict()
    return one_group


def make_group_trainer(args: argparse.Namespace, session, engine: str
                       ) -> Callable[[list[RunConfig], list | None], list]:
    """Runs of one work shape trained as one stacked group (`core.group.run_group`, captured where `engine` is
    "captured") over the command's session: (configs, per-run epoch callbacks or None) -> per run its record as
    stored, or the error that failed it.

    The automatic group size is an estimate (`core.group.bytes_per_run`). A group that runs out of device memory
    before any of its runs ended an epoch (while capturing its step too: `core.captured`) is trained again as two
    halves, and later groups of the command are
    held to that size, with one line saying so; a group of one, or one that had ended an epoch (its callbacks
    have seen results), fails as before."""
    import torch

    from core.captured import CapturedStep
    from core.group import run_group

    capture = CapturedStep if engine == "captured" else None
    fits: list[int] = []  # the size a group was halved to after running out of memory, once one has

    def group(configs: list[RunConfig], on_epoch: list | None = None) -> list:
        callbacks = on_epoch or [None] * len(configs)
        if fits and len(configs) > fits[-1]:
            return [r for start in range(0, len(configs), fits[-1])
                    for r in group(configs[start:start + fits[-1]], callbacks[start:start + fits[-1]])]
        ended: list[int] = []

        def noting(callback):
            def on_end(entry: dict):
                ended.append(entry["epoch"])
                return callback(entry) if callback is not None else None
            return on_end
        try:
            results = run_group(configs, session, args.device, on_epoch=[noting(c) for c in callbacks],
                                capture=capture, exact_dropout=args.exact_dropout)
        except torch.cuda.OutOfMemoryError:
            if len(configs) == 1 or ended:
                raise
            results = None  # retried below: inside this block the error's traceback still holds the group's tensors
        if results is None:
            free_accelerator_memory()
            fits.append((len(configs) + 1) // 2)
            print(f"a group of {len(configs)} runs ran out of device memory: training groups of at most {fits[-1]} "
                  "from here (--max-parallel-runs to choose)")
            return group(configs, callbacks)
        return [r if isinstance(r, Exception) else r.to_dict() for r in results]
    return group


def add_parallel_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """--max-parallel-runs; `what` says what the command trains at once."""
    parser.add_argument("--max-parallel-runs", default="auto", metavar="N", help=f"{what} (auto: 1 on a CPU, on "
                        "CUDA as many as fit in the free memory; 1: one at a time) (default: auto)")


def parallel_runs(args: argparse.Namespace, base: RunConfig, most: int | None = None) -> tuple[str, int]:
    """(engine, group size) from --engine and --max-parallel-runs; `most` caps the automatic size (the search's
    batch of trials). Bad values are a UsageError."""
    from core.group import group_size
    if args.max_parallel_runs == "auto":  # sized for captured graphs wherever capture may be chosen
        size = group_size(base, args.device, captured=args.engine in ("auto", "captured"),
                          reserved=int(args.cache_device_gb * 2**30))
        size = min(size, most) if most else size
    elif args.max_parallel_runs.isdigit() and int(args.max_parallel_runs) >= 1:
        size = int(args.max_parallel_runs)
    else:
        raise UsageError(f"--max-parallel-runs {args.max_parallel_runs!r} is invalid: use auto or a whole number "
                         "of at least 1")
    engine = choose_engine(args, base, size)
    return engine, size if engine != "eager" else 1


def choose_engine(args: argparse.Namespace, config: RunConfig, group_size: int) -> str:
    """--engine resolved for this machine and model (`core.group.choose_engine`); --compile needs eager."""
    from core.device import default_device
    from core.group import choose_engine as choose
    if args.compile and args.engine == "auto":
        return "eager"  # --compile is the eager step's option: asking for it picks that engine
    if args.exact_dropout and args.engine == "captured":
        raise UsageError("--exact-dropout draws each run's masks from the host, which a captured graph cannot: "
                         "use --engine stacked or auto")
    engine = choose(args.engine, args.device or default_device(), group_size, config.model, config.max_length,
                    config.precision)
    if engine == "captured" and args.exact_dropout:
        engine = "stacked"  # --engine auto: a graph cannot set each run's random state between draws
    if engine != "eager" and args.compile:
        raise UsageError("--compile applies to the eager engine: drop it, or use --engine eager")
    return engine


def write_report(url: str, study_names: list[str], output_dir: str | Path, runs: list[dict] | None = None,
                 table: pd.DataFrame | None = None) -> dict[str, Path]:
    """The trade-off report of these studies into output_dir; prints where it went. `runs` (`load_runs`) and
    `table` (`tradeoff_table`) are read from the storage and built from them unless the caller has them already."""
    from ablations.tradeoff import write_report as report
    from ablations.storage import load_runs

    paths = report(load_runs(url, study_names) if runs is None else runs, output_dir, table=table)
    print(f"report: {', '.join(str(p) for p in paths.values())}")
    return paths


def free_accelerator_memory() -> None:
    """After a failed run (CUDA out of memory, say), hand the cached blocks back before the next one: first collect
    what only reference cycles still hold (a stacked group and its captured step refer to each other), so that
    empty_cache can give their blocks back."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
