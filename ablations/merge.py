"""`python -m ablations.merge`: copy the completed runs of other storages into one.

For workers that could not share a database (one SQLite file per GPU process, a Colab session, a cluster node
without access to PostgreSQL): merge their files afterwards, then report, resume or extend the grid on the
merged storage. A run id already complete in the target study is skipped, so merging twice copies nothing new; a
run complete in another study of the target is copied as a reuse of it, as the ledger itself stores one.
"""
from __future__ import annotations

from pathlib import Path

from ablations.runner import default_storage, split_names
from core.cli import ArgumentParser, main_guard
from core.config import RunConfig
from core.errors import UsageError


def merge(target_url: str, source_urls: list[str], study_names: list[str] | None = None,
          rename: str | None = None) -> dict[str, int]:
    """Copy COMPLETE runs of the named studies (default: all) into same-named studies, or into `rename`.
    Returns {target study: runs copied}. Every source is read in full before the target is written, so a
    source that cannot be read leaves nothing behind."""
    import optuna  # optuna and the ledger load here, not for --help

    from ablations.ledger import Ledger, open_study
    from ablations.storage import mask_url, open_storage, storage_errors
    from ablations.runs_table import read_rows
    sources = [(url, _read(url, study_names)) for url in source_urls]
    with storage_errors(target_url):
        ledger = Ledger(open_storage(target_url))
        copied: dict[str, int] = {}
        for url, studies in sources:
            for name, (directions, attrs, trials) in studies.items():
                into = open_study(ledger.storage, rename or name, directions)
                for key, value in attrs.items():
                    if key not in into.user_attrs:
                        into.set_user_attr(key, value)
                copied.setdefault(into.study_name, 0)
                wanted = {trial._trial_id: _ids(trial) for trial in trials}
                stored = read_rows(ledger.storage.engine, [i for ids in wanted.values() for i in ids])
                in_study = ledger.complete_in_study(into)
                for trial in trials:
                    run_id, legacy = wanted[trial._trial_id]
                    if run_id is None or {run_id, legacy} & in_study:
                        continue
                    # A run one study reused from another (a tuned grid's runs from its learning-rate sweep) is in
                    # both: the first copy holds the run id's row, a later one is a reuse of it, as on the source.
                    holder = next((stored[i] for i in (run_id, legacy) if stored.get(i, {}).get("state") == "COMPLETE"),
                                  None)
                    attrs = {key: value for key, value in trial.user_attrs.items() if key != "reused_from"}
                    if holder is not None:
                        attrs["reused_from"] = f"{holder['study']}#{holder['number']}"
                    copy = optuna.trial.create_trial(
                        params=trial.params, distributions=trial.distributions, values=trial.values,
                        user_attrs={**attrs, "run_id": run_id, "merged_from": f"{mask_url(url)} {name}#{trial.number}"})
                    trial_id = ledger.storage.create_new_trial(into._study_id, template_trial=copy)
                    if holder is None:
                        stored[run_id] = ledger._mark_complete(run_id, trial_id)
                    in_study.add(run_id)
                    copied[into.study_name] += 1
    return copied


def _read(url: str, study_names: list[str] | None) -> dict[str, tuple]:
    """{study: (directions, user attrs, COMPLETE trials)} of one source storage."""
    import optuna
    from optuna.trial import TrialState

    from ablations.storage import named_studies, open_storage, storage_errors
    with storage_errors(url):
        source = open_storage(url)
        studies = {}
        for name in named_studies(source, url, study_names):
            study = optuna.load_study(study_name=name, storage=source)
            studies[name] = (tuple(d.name.lower() for d in study.directions), study.user_attrs,
                             study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        return studies


def _ids(trial) -> tuple[str | None, str | None]:
    """(run id, legacy id) of a stored trial. One written before fingerprints carries its legacy id: its id
    now is computed from its recorded config, so that merges de-duplicate across machines and spellings."""
    run_id, config = trial.user_attrs.get("run_id"), (trial.user_attrs.get("record") or {}).get("config")
    if run_id is None or not config:
        return run_id, None
    try:
        config = RunConfig.from_dict(config)
    except Exception:  # a record of another version's settings: keep the id it was stored under
        return run_id, None
    return (config.run_id if run_id == config.legacy_run_id else run_id), config.legacy_run_id


def main() -> int:
    parser = ArgumentParser(prog="python -m ablations.merge", description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="storage URLs or SQLite files to copy from")
    parser.add_argument("--into", default=None, metavar="URL", help="target storage URL or SQLite file, created if "
                        f"missing (default: {default_storage()}, where the report looks)")
    parser.add_argument("--study-name", dest="study_names", action="extend", nargs="+", metavar="NAMES",
                        help="copy only these studies, comma-separated, e.g. grid,search (default: all)")
    parser.add_argument("--as", dest="rename", default=None, metavar="NAME",
                        help="put every copied run into this study instead (default: the same names)")
    args = parser.parse_args()
    urls = [_url(s, must_exist=True) for s in args.sources]
    into = _url(args.into) if args.into else default_storage()
    itself = [source for source, url in zip(args.sources, urls) if _same_storage(url, into)]
    if itself and args.rename is None:  # with --as, studies of one storage are gathered into one: a real copy
        raise UsageError(f"SOURCE {itself[0]!r} is the --into storage itself: its studies would be copied onto "
                         "themselves; name the other workers' storages (or --as NAME to gather studies into one)")
    if into.startswith("sqlite:///"):
        try:
            Path(into.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--into {args.into or into!r} cannot be written ({error.strerror or error}): give a "
                             "SQLite file in a folder you can write to") from None
    copied = merge(into, urls, split_names(args.study_names), args.rename)
    from ablations.storage import mask_url
    for name, count in copied.items():
        print(f"merge: {count} run(s) copied into study {name!r} of {mask_url(into)}")
    return 0


def _same_storage(url: str, other: str) -> bool:
    """Whether two storage URLs name one database: SQLite files compared by their resolved paths."""
    def place(text: str) -> str:
        return str(Path(text.removeprefix("sqlite:///")).resolve()) if text.startswith("sqlite:///") else text
    return place(url) == place(other)


def _url(text: str, must_exist: bool = False) -> str:
    """A storage URL as given, or a SQLite file path turned into one."""
    if "://" in text:
        from ablations.storage import existing_storage, storage_url
        return existing_storage(text, "SOURCE") if must_exist else storage_url(text, ".")
    path = Path(text).expanduser().resolve()
    if must_exist and not path.is_file():
        raise UsageError(f"storage file {text!r} does not exist")
    return f"sqlite:///{path}"


if __name__ == "__main__":
    main_guard(main)
