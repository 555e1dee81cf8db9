"""`python -m ablations.merge`: copy the completed runs of other storages into one.

For workers that could not share a database (one SQLite file per GPU process, a Colab session, a cluster node
without access to PostgreSQL): merge their files afterwards, then report, resume or extend the grid on the
merged storage. A run id already complete in the target is skipped, so merging twice copies nothing new.
"""
from __future__ import annotations

from pathlib import Path

from ablations.runner import default_output_dir, default_storage, split_names
from core.cli import ArgumentParser, main_guard
from core.errors import UsageError


def merge(target_url: str, source_urls: list[str], study_names: list[str] | None = None,
          rename: str | None = None) -> dict[str, int]:
    """Copy COMPLETE runs of the named studies (default: all) into same-named studies, or into `rename`.
    Returns {target study: runs copied}."""
    import optuna
    from optuna.trial import TrialState

    from ablations.study import Ledger, open_storage, open_study

    target = open_storage(target_url)
    ledger = Ledger(target)
    done = {run_id for run_id, status in ledger.scan().items() if status.complete}
    copied: dict[str, int] = {}
    for url in source_urls:
        source = open_storage(url)
        names = [s.study_name for s in source.get_all_studies()]
        for name in study_names or names:
            if name not in names:
                raise UsageError(f"study {name!r} is not in {url!r}: it holds {', '.join(names) or 'no studies'}")
            study = optuna.load_study(study_name=name, storage=source)
            into = open_study(target, rename or name, tuple(d.name.lower() for d in study.directions))
            for key, value in study.user_attrs.items():
                if key not in into.user_attrs:
                    into.set_user_attr(key, value)
            copied.setdefault(into.study_name, 0)
            for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                run_id = trial.user_attrs.get("run_id")
                if run_id is None or run_id in done:
                    continue
                into.add_trial(optuna.trial.create_trial(
                    params=trial.params, distributions=trial.distributions, values=trial.values,
                    user_attrs={**trial.user_attrs, "merged_from": f"{url} {name}#{trial.number}"}))
                done.add(run_id)
                copied[into.study_name] += 1
    return copied


def main() -> int:
    parser = ArgumentParser(prog="python -m ablations.merge", description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="storage URLs or SQLite files to copy from")
    parser.add_argument("--into", default=None, metavar="URL", help="target storage URL or SQLite file, created if "
                        f"missing (default: {default_storage(default_output_dir(None))}, where the report looks)")
    parser.add_argument("--study-name", dest="study_names", action="extend", nargs="+", metavar="NAMES",
                        help="copy only these studies, comma-separated, e.g. grid,search (default: all)")
    parser.add_argument("--as", dest="rename", default=None, metavar="NAME",
                        help="put every copied run into this study instead (default: the same names)")
    args = parser.parse_args()
    urls = [_url(s, must_exist=True) for s in args.sources]
    into = _url(args.into) if args.into else default_storage(default_output_dir(None))
    if into.startswith("sqlite:///"):
        Path(into.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    copied = merge(into, urls, split_names(args.study_names), args.rename)
    for name, count in copied.items():
        print(f"merge: {count} run(s) copied into study {name!r} of {into}")
    return 0


def _url(text: str, must_exist: bool = False) -> str:
    """A storage URL as given, or a SQLite file path turned into one."""
    if "://" in text:
        from ablations.study import storage_url
        return storage_url(text, ".")
    path = Path(text).expanduser().resolve()
    if must_exist and not path.is_file():
        raise UsageError(f"storage file {text!r} does not exist")
    return f"sqlite:///{path}"


if __name__ == "__main__":
    main_guard(main)
