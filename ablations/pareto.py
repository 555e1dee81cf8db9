"""Pareto fronts of stored runs: the choice score up, training seconds down.

Every choice here (the front, the knee, pruning, the best baseline) reads a run's choice score
(`ablations.tuning.choice_metric`): its dev accuracy, or its dev macro-F1 where the search runs with --select-by f1
(a search pins its fixed settings, --select-by among them, so its runs share one). Validation's values are reported
beside it and choose nothing (records from before dev splits, which have none, fall back to them).

The front and its knee, the dominance test that prunes a two-objective trial (Optuna has no pruner for
several objectives, optuna#3450), and the search's outputs: pareto.csv, importance.png, search_summary.md (its
text: `ablations.search_summary`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import optuna
import optuna.distributions as od
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from ablations.runner import SEARCHED
from ablations.stats import pareto_front
from ablations.ledger import Ledger
from ablations.storage import run_of
from ablations.tuning import CHOICE_LABELS, choice_metric, choice_value, record_metric, split_label
from core.errors import UsageError

if TYPE_CHECKING:
    from core.config import RunConfig

PARETO_COLUMNS = [*SEARCHED, "dev_accuracy", "accuracy", "train_seconds", "trainable_params", "run_id", "trial"]
MIN_IMPORTANCE_TRIALS = 4  # fANOVA on fewer runs ranks noise
SCORE_NAMES = {"accuracy": "accuracy", "f1": "macro-F1"}  # the choice metric in running text


def pareto_columns(metric: str = "accuracy") -> list[str]:
    """pareto.csv's columns: the score that chose (dev, then validation) first, accuracy beside macro-F1."""
    return PARETO_COLUMNS if metric == "accuracy" else [*SEARCHED, "dev_f1", "f1", *PARETO_COLUMNS[len(SEARCHED):]]


@dataclass(frozen=True)
class Point:
    """One finished run on the score–time plane (`choice_value`), and where it is stored ('study#number')."""
    score: float
    seconds: float
    where: str


def dominator(points: Iterable[Point], score: float, seconds: float) -> Point | None:
    """A point scoring at least as high and at least as fast as (score, seconds), strictly better in one."""
    for point in points:
        if point.score >= score and point.seconds <= seconds and (point.score > score or point.seconds < seconds):
            return point
    return None


def prune_reason(points: Iterable[Point], history: list[dict], margin: float, metric: str = "accuracy") -> str | None:
    """Why a two-objective trial should stop after the epochs in `history`, or None to let it go on.

    The trial's best reachable point is optimistic on both axes: the best score (`metric`) so far plus `margin`
    (later epochs may still improve it), reached in the seconds already spent (it can only get slower).
    If a finished run dominates even that point, the finished trial would be dominated too."""
    best = max(choice_value(entry, metric) for entry in history)
    spent = sum(entry["train_seconds"] for entry in history)
    hit = dominator(points, best + margin, spent)
    if hit is None:
        return None
    return (f"dominated after epoch {history[-1]['epoch']}: best {SCORE_NAMES[metric]} {best:.4f} + margin "
            f"{margin:g} in {spent:.2f} s already spent cannot beat {hit.where} ({hit.score:.4f} in "
            f"{hit.seconds:.2f} s)")


def fixed_fields(config: dict) -> dict:
    """What every run of one search shares: the config minus the searched parameters."""
    return {name: value for name, value in config.items() if name not in SEARCHED}


def changed_fixed(stored: dict, fixed: dict) -> list[str]:
    """The fixed settings (`fixed_fields`) in which `stored` differs from `fixed`, comparing the model and the data
    as run ids do, by their contents (`core.identity`): another spelling of a path, a copied data or model folder
    is no change."""
    from core.config import DATA_FIELDS
    from core.identity import model_fingerprint, same_data

    changed = [name for name in fixed if stored.get(name) != fixed[name]]
    # a model read nowhere here (a Hub id offline, a moved folder) is its name: only that name is the same model
    if "model" in changed and stored.get("model") and \
            model_fingerprint(stored["model"]) == model_fingerprint(fixed["model"]):
        changed.remove("model")
    if set(changed) & set(DATA_FIELDS) and \
            same_data(*(tuple(d.get(k) for k in DATA_FIELDS) for d in (stored, fixed))) is True:
        changed = [name for name in changed if name not in DATA_FIELDS]
    return changed


def same_fixed(config: dict, fixed: dict) -> bool:
    """Whether a stored run's config has these fixed settings (`changed_fixed`: a copied folder is the same)."""
    from core.config import DATA_FIELDS
    theirs = fixed_fields(config)
    differ = {name for name in {*theirs, *fixed} if theirs.get(name) != fixed.get(name)}
    # only a path can name the same contents: any other difference is another run, known without reading files
    return not differ or (differ <= {"model", *DATA_FIELDS} and not changed_fixed(theirs, fixed))


def _same_device(record: dict | None, device: str | None) -> bool:
    """Times compare only on one device; a run without a device name (or no device to match) is kept."""
    return record is None or device is None or record.get("device") in (None, device)


def _seconds(record: dict, sitting: dict | None) -> float:
    """A run's training seconds on the study's time axis: from its stored sitting where that times the run's shape
    (a search continued after a new sitting: the report reads every run's time from it, so pruning does too)."""
    from ablations.stored_sitting import on_axis
    return on_axis(record, sitting)["train_seconds"]


def study_points(study: optuna.Study, device: str | None = None, metric: str = "accuracy") -> list[Point]:
    """A study's finished runs; its trials share the fixed settings (checked when a search study opens), but runs
    merged in from another storage (`ablations.merge`) may have chosen by another metric: those are left out."""
    from ablations.stored_sitting import SITTING
    sitting = study.user_attrs.get(SITTING)
    return [Point(t.values[0], t.values[1] if record is None else _seconds(record, sitting),
                  f"{study.study_name}#{t.number}")
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if _same_device(record := t.user_attrs.get("record"), device)
            and (record is None or record_metric(record) == metric)]


def storage_points(ledger: Ledger, skip_study: str, fixed: dict, device: str | None = None,
                   sitting: dict | None = None) -> list[Point]:
    """Finished runs of the storage's other studies (a grid, say) with these fixed settings (`same_fixed`: a copy of
    the data or model is the same), timed by the searching study's stored `sitting` where it holds their shape."""
    points = []
    for status in ledger.scan().values():
        for trial in status.complete:
            record, where = trial.user_attrs.get("record"), ledger.where(trial)
            if record and not where.startswith(f"{skip_study}#") and _same_device(record, device) \
                    and same_fixed(record["config"], fixed):
                points.append(Point(choice_value(record, record_metric(record)), _seconds(record, sitting), where))
    return points


def run_rows(study_name: str, trials: Iterable[FrozenTrial], study_attrs: dict | None = None) -> pd.DataFrame:
    """One row per distinct run among the study's COMPLETE trials that carry a record, by the trade-off report's
    rule (`ablations.tradeoff.completed_runs`: a reused copy counts once), timed as the report times them (the
    study's stored timing sitting, where `study_attrs` hold one)."""
    from ablations.storage import with_sitting
    from ablations.tradeoff import completed_runs

    rows = []
    for run in completed_runs(with_sitting([run_of(study_name, trial) for trial in trials], study_attrs or {})):
        record, where = run["record"], f"{run['study']}#{run['number']}"
        rows.append({**{name: record["config"].get(name) for name in SEARCHED},
                     "dev_f1": record.get("dev_f1"), "f1": record.get("f1"),
                     "dev_accuracy": record.get("dev_accuracy"), "accuracy": record["accuracy"],
                     "choice": choice_value(record, record_metric(record)), "train_seconds": record["train_seconds"],
                     "trainable_params": record.get("trainable_params"), "run_id": record.get("run_id") or where,
                     "trial": where, "device": record.get("device"), "metric": record_metric(record),
                     "contended": record.get("contended") is True})
    return pd.DataFrame(rows, columns=[*pareto_columns("f1"), "choice", "device", "metric", "contended"])


def front_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows non-dominated on (choice score, seconds), fastest first."""
    if rows.empty:
        return rows
    mask = pareto_front(rows["choice"].tolist(), rows["train_seconds"].tolist())
    return rows[mask].sort_values(["train_seconds", "choice"], ascending=[True, False]).reset_index(drop=True)


def knee_index(front: pd.DataFrame) -> int:
    """The front point farthest above the chord from its fastest to its highest-scoring end.

    The score and time are min-max scaled over the front, so the chord runs from (0, 0) to (1, 1) and the
    distance above it is proportional to scaled score minus scaled time; ties go to the faster point."""
    def scaled(column: pd.Series) -> pd.Series:
        span = column.max() - column.min()
        return (column - column.min()) / span if span > 0 else column * 0.0

    gain = scaled(front["choice"]) - scaled(front["train_seconds"])
    return int(gain.idxmax())  # idxmax returns the first maximum; the front is sorted fastest first


def importance_plot(rows: pd.DataFrame, path: Path, metric: str = "accuracy") -> str:
    """fANOVA importances of the searched parameters for each objective (the choice score by `metric`, training
    seconds) as a bar chart; returns a note."""
    path.unlink(missing_ok=True)  # never leave a stale figure beside fresh tables
    varying = [name for name in SEARCHED if rows[name].astype(str).nunique() > 1] if len(rows) else []
    if len(rows) < MIN_IMPORTANCE_TRIALS or not varying:
        return (f"importance.png skipped: {len(rows)} complete run(s) and {len(varying)} varying parameter(s); "
                f"it needs at least {MIN_IMPORTANCE_TRIALS} runs and one parameter that varies.")
    # A private study holds each run once with its record's values, so copies of reused runs weigh nothing.
    study = optuna.create_study(directions=["maximize", "minimize"])
    distributions = {name: _distribution(rows[name]) for name in varying}
    for row in rows.itertuples(index=False):
        study.add_trial(optuna.trial.create_trial(
            params={name: _plain(getattr(row, name)) for name in varying}, distributions=distributions,
            values=[row.choice, row.train_seconds]))
    # fANOVA explains variance, so it needs no direction (Optuna 5's default evaluator ranks for low values).
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    panels: dict[str, dict | str] = {}
    on_dev = rows["dev_accuracy"].notna().all()  # a search without a dev split chose on validation
    for index, (column, objective) in enumerate({"choice": split_label(metric, on_dev),
                                                 "train_seconds": "training seconds"}.items()):
        panels[objective] = "the same in every run: nothing to explain"
        if rows[column].nunique() > 1:
            try:
                panels[objective] = optuna.importance.get_param_importances(
                    study, evaluator=evaluator, target=lambda t, i=index: t.values[i])
            except RuntimeError:  # fANOVA found no split that explains any variance
                panels[objective] = "no parameter explains any of its variance"
    if all(isinstance(panel, str) for panel in panels.values()):
        return (f"importance.png skipped: every complete run has the same {SCORE_NAMES[metric]} and the same "
                "training time.")
    from ablations import tuning_plots  # seaborn and matplotlib only when there is something to draw
    tuning_plots.importance(panels, varying, len(rows), path)
    return f"importance.png: fANOVA importances over {len(rows)} complete runs."


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _distribution(column: pd.Series) -> od.BaseDistribution:
    if column.name == "scheduler":
        return od.CategoricalDistribution(sorted(column.unique()))
    if column.name in ("freeze_depth", "epochs"):
        return od.IntDistribution(int(column.min()), int(column.max()))
    return od.FloatDistribution(float(column.min()), float(column.max()), log=column.name == "learning_rate")


def write_outputs(study: optuna.Study, ledger: Ledger, base: RunConfig, url: str, output_dir: str | Path,
                  report: bool = True) -> str:
    """pareto.csv, importance.png, search_summary.md and the shared trade-off report; returns the summary."""
    from ablations.tradeoff import tradeoff_table
    from ablations.runner import write_report
    from ablations.search_summary import summary_markdown
    from ablations.storage import load_runs

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    metric = choice_metric(base)  # the study's pinned --select-by: one for all its runs
    rows = run_rows(study.study_name, trials, study.user_attrs)
    other = rows[rows["metric"] != metric]  # merged in from a search of another --select-by (ablations.merge)
    rows = rows[rows["metric"] == metric].reset_index(drop=True)
    front = front_table(rows)
    front[pareto_columns(metric)].to_csv(output / "pareto.csv", index=False)
    states = {state: sum(t.state == state for t in trials) for state in TrialState}
    notes = [importance_plot(rows, output / "importance.png", metric)]
    if len(other):
        notes.append(f"{len(other)} complete run(s) of this study chose by {CHOICE_LABELS[other['metric'].iloc[0]]}, "
                     f"not this search's {CHOICE_LABELS[metric]} (merged from another storage?): left out of the "
                     "front, pareto.csv and importance.png.")
    url = url or ledger.storage.url
    runs, table, skipped = None, None, None
    try:  # loaded and built once, for this summary and the trade-off report: both state one speed-up
        runs = load_runs(url, [study.study_name])
        table = tradeoff_table(runs)
    except UsageError as error:
        skipped = error
    if report and runs is None:
        notes.append(f"Trade-off report skipped: {skipped}")
    elif report:
        try:  # with no table (nothing completed) the report writes runs.csv alone and says why
            write_report(url, [study.study_name], str(output_dir), runs, table)
        except UsageError as error:
            notes.append(f"Trade-off report skipped: {error}")
    counts = (f"{len(trials)} trials in study `{study.study_name}`: {states[TrialState.COMPLETE]} complete, "
              f"{states[TrialState.PRUNED]} pruned, {states[TrialState.FAIL]} failed, {states[TrialState.RUNNING]} "
              f"running; {len(rows) + len(other)} distinct complete runs. Model `{base.model}`, data "
              f"`{base.dataset}`, run seed {base.seed}.")
    text = summary_markdown(f"Search `{study.study_name}`", counts, front, table, notes, metric)
    (output / "search_summary.md").write_text(text)
    return text


def rewrite_search_outputs(url: str, study_name: str, output_dir: str | Path) -> str:
    """pareto.csv, importance.png and search_summary.md of a stored search again, from its runs alone (no
    trial is run; `results/reproduce.sh report` uses it after a change to how they are computed)."""
    from ablations.storage import open_storage
    from core.config import RunConfig

    ledger = Ledger(open_storage(url))
    study = optuna.load_study(study_name=study_name, storage=ledger.storage)
    fixed = study.user_attrs.get("search", {}).get("fixed", {})
    return write_outputs(study, ledger, RunConfig.from_dict(fixed), url, output_dir, report=False)
