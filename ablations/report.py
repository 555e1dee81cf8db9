"""`python -m ablations.report`: the trade-off report (tables and figures) from the runs stored in an Optuna storage.

The work is `ablations.tradeoff`, imported when the command runs, so --help and a bad flag answer at once, before
pandas, scipy and matplotlib load. Its names (`write_report`, `run_table`, `tradeoff_table`, ...) are also reachable
here, as before.
"""
from __future__ import annotations

from pathlib import Path

from ablations.runner import add_output_arguments, default_output_dir, default_storage, split_names
from core.cli import ArgumentParser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m ablations.report",
                            description="Trade-off report (tables and figures) from the runs stored in an Optuna "
                                        "storage.")
    add_output_arguments(parser)
    parser.add_argument("--study-name", dest="study_names", action="extend", nargs="+", metavar="NAMES",
                        help="report only these studies, comma-separated, e.g. grid,search (default: every study "
                             "in the storage)")
    parser.add_argument("--baseline", default=None, metavar="KEY=VALUE[,...]",
                        help="fields that define each configuration's baseline; the others must match; one given "
                             "must match a stored configuration (default: freeze_depth=0, the full fine-tune, "
                             "where the studies hold one)")
    return parser


def main(args=None) -> int:
    args = args or build_parser().parse_args()
    from ablations.tradeoff import parse_baseline, usage_error, write_report

    # Not given, the baseline is the grid's and the search's own: rows without a full fine-tune say so.
    baseline = None if args.baseline is None else parse_baseline(args.baseline)
    names = split_names(args.study_names)
    output_dir = args.output_dir or default_output_dir(names[0] if names and len(names) == 1 else None)
    storage = args.storage or default_storage(args.output_dir)  # the grid's and the search's default ledger
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        if args.storage:
            raise usage_error(f"--storage {storage} is invalid: the SQLite file does not exist")
        if not args.output_dir:
            raise usage_error(f"no ledger at {storage}: run a grid or a search first, or pass --storage")
        ledger = default_storage()
        hint = f"; the grid's default ledger is {ledger}: pass it as --storage" \
            if Path(ledger.removeprefix("sqlite:///")).exists() else ""
        raise usage_error(f"no ledger at {storage}: with --output-dir and no --storage, the report reads the ledger "
                          f"in that folder{hint}")
    from ablations.storage import load_runs, storage_url  # load_runs names a missing study in one line
    from core.cli import check_output_dir

    runs = load_runs(storage_url(storage, output_dir), study_names=names)
    from ablations.tradeoff import completed_runs, tradeoff_table
    # A --baseline that matches nothing is refused before any file is written (else a fresh runs.csv stood beside
    # the folder's older tables); with nothing completed, write_report writes runs.csv alone and says why.
    table = tradeoff_table(runs, baseline) if completed_runs(runs) else None
    check_output_dir(output_dir)  # after the studies are found: a misspelt name leaves no folder behind
    paths = write_report(runs, output_dir, baseline, table)
    for path in paths.values():
        print(path)
    return 0


def __getattr__(name: str):  # `from ablations.report import write_report` keeps working, loading pandas then
    import ablations.tradeoff
    try:
        return getattr(ablations.tradeoff, name)
    except AttributeError:
        raise AttributeError(f"module 'ablations.report' has no attribute {name!r}") from None


if __name__ == "__main__":
    from core.cli import main_guard

    main_guard(main)
