"""Every cell tuned alike: each scientific cell's learning rate chosen on the dev split from one list of rates.

The learning rate is a nuisance parameter: comparing depths at one shared rate, or against a baseline tuned
harder than the other rows, measures the rate rather than the depth. So each cell (freeze depth × schedule ×
epochs; the full fine-tune baseline is one of them) trains the study's first seed at every rate, at the study's
own length and data size. The cell's rate is the one whose run ranks first by `tie_rule` on the dev split, and
its seeds train at that rate; the first seed's run at the chosen rate is the tuning run itself (the same run id,
so the ledger reuses it). A rate whose run failed (its loss diverged, say) is out of the running.

The report applies the same rule to the stored runs (`choose_configuration`), so its rows are the configurations
the grid chose, and the other rates show in runs.csv and in the metric-vs-rate figure (lr_curves.png) only.

What chooses across runs is one rule, `choice_metric`: dev macro-F1 for runs that chose their epoch by it
(`--select-by f1`), else dev accuracy. Every choice in `ablations` (the rate here and in `lr_choice`, the report's
baseline, the search's objective, pruning, front and knee) reads it through `choice_value` and names it with
`choice_label`.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from core.config import RunConfig

CELL = ("freeze_depth", "scheduler", "epochs")
CHOICE_LABELS = {"accuracy": "dev accuracy", "f1": "dev macro-F1"}


def choice_metric(config: RunConfig | dict[str, Any] | None) -> str:
    """The metric that compares runs of this config: "f1" where the run picked its epoch by dev macro-F1 (a user
    who asks for F1 does so because accuracy hides a class the model never predicts; a rate or a configuration
    chosen by accuracy would hide it again), else "accuracy". `--select-by loss` keeps accuracy across runs: loss
    picks the reference's epoch within one run, but across learning rates and depths it measures calibration
    (how confident the model is) more than how often it is right. Configs from before `select_by`: accuracy."""
    select_by = config.get("select_by") if isinstance(config, dict) else getattr(config, "select_by", None)
    return "f1" if select_by == "f1" else "accuracy"


def record_metric(record: dict[str, Any]) -> str:
    """`choice_metric` of a stored record's config."""
    return choice_metric(record.get("config") or {"select_by": record.get("selected_by")})


def choice_value(values: dict[str, Any], metric: str = "accuracy") -> float:
    """The value a choice is made on, for a record or one epoch of its history: `metric` on the dev split where
    the run had one, else (no dev split, or a record from before dev splits existed) on validation."""
    on_dev = values.get("dev_accuracy") is not None
    return values[f"dev_{metric}" if on_dev else metric]


def metrics_of(records: Iterable[dict[str, Any]]) -> tuple[str, ...]:
    """The choice metrics of these records, accuracy first: one, or both where runs of several `--select-by`
    values are reported together (each configuration is still chosen by its own)."""
    found = {record_metric(record) for record in records}
    return tuple(metric for metric in CHOICE_LABELS if metric in found) or ("accuracy",)


def choice_label(metrics: str | Iterable[str] = "accuracy") -> str:
    """'dev accuracy', 'dev macro-F1', or for a mix the rule that names each."""
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if len(metrics) == 1:
        return CHOICE_LABELS[metrics[0]]
    return "dev accuracy (dev macro-F1 for runs that chose their epoch by it, --select-by f1)"


def split_label(metric: str, on_dev: bool = True) -> str:
    """`metric`'s choice label on the split that chose: 'dev accuracy', or 'validation accuracy' for runs without a
    dev split (--dev-size 0), which `choice_value` reads on validation."""
    named = CHOICE_LABELS[metric]
    return named if on_dev else named.replace("dev ", "validation ", 1)


def tie_rule(metrics: str | Iterable[str] = "accuracy") -> str:
    return f"the higher {choice_label(metrics)}, then the lower dev loss, then the smaller learning rate"


TIE_RULE = tie_rule("accuracy")  # the rule of studies that select by accuracy or loss


def parse_rates(text: str, flag: str = "--learning-rates") -> tuple[float, ...]:
    """'1e-5,3e-5,1e-4' -> (1e-5, 3e-5, 1e-4): sorted, distinct, each in (0, 1)."""
    from core.errors import UsageError
    try:
        rates = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        rates = []
    if len(rates) < 2 or not all(0 < rate < 1 for rate in rates):
        raise UsageError(f"{flag} {text!r} is invalid: give at least two rates in (0, 1), such as "
                         "1e-5,3e-5,1e-4,3e-4,1e-3")
    return tuple(rates)


def rank(record: dict[str, Any]) -> tuple:
    """Sort key of `tie_rule` by the record's own `choice_metric`: the first record ranks best. Without a dev split,
    validation stands in. Records compared together share their metric: `select_by` is part of their config, which
    the compared candidates (one cell, one grid) share but for the learning rate."""
    on_dev = record.get("dev_accuracy") is not None
    loss = record.get("dev_loss") if on_dev else record.get("loss")
    return (-choice_value(record, record_metric(record)), loss if loss is not None else float("inf"),
            record["config"]["learning_rate"])


def cell_of(config: dict[str, Any]) -> tuple:
    return tuple(config[name] for name in CELL)


def tuning_configs(configs: list[RunConfig], rates: tuple[float, ...]) -> list[RunConfig]:
    """The tuning runs: every cell's first seed at every rate."""
    first = min(c.seed for c in configs)
    return [c.replace(learning_rate=rate) for c in configs if c.seed == first for rate in rates]


def choose_rates(tuning: list[RunConfig], records: dict[str, dict]) -> dict[tuple, dict[str, Any]]:
    """cell -> the chosen rate and what it was chosen on, from the completed tuning runs in `records` (by run id).

    A cell whose every tuning run failed gets no entry: it has no rate to train its seeds at."""
    by_cell: dict[tuple, list[dict]] = {}
    for config in tuning:
        if (record := records.get(config.run_id)) is not None:
            by_cell.setdefault(cell_of(config.to_dict()), []).append(record)
    choices = {}
    for cell, candidates in by_cell.items():
        best, metric = min(candidates, key=rank), record_metric(candidates[0])
        # each rate's value under the name of what chose (dev_accuracy, or dev_f1 under --select-by f1)
        choices[cell] = {**dict(zip(CELL, cell)), "learning_rate": best["config"]["learning_rate"],
                         "selected_on": best.get("selected_on") or "validation",
                         f"dev_{metric}": {f"{r['config']['learning_rate']:g}": choice_value(r, metric)
                                           for r in sorted(candidates, key=lambda r: r["config"]["learning_rate"])}}
    return choices


def choice_line(choice: dict[str, Any]) -> str:
    """A cell's choice as the grid prints it: the rate, and each rate's value named by what chose."""
    metric = "f1" if "dev_f1" in choice else "accuracy"
    named = " macro-F1" if metric == "f1" else ""  # accuracy's line is as it always was
    return (f"  freeze {choice['freeze_depth']} · {choice['scheduler']} · {choice['epochs']} ep: learning rate "
            f"{choice['learning_rate']:g} chosen on {choice['selected_on']}{named} ({choice[f'dev_{metric}']})")


def chosen_configs(configs: list[RunConfig], choices: dict[tuple, dict[str, Any]]) -> list[RunConfig]:
    """Every seed of every tuned cell at the rate the cell chose."""
    return [c.replace(learning_rate=choices[cell]["learning_rate"]) for c in configs
            if (cell := cell_of(c.to_dict())) in choices]


def _tuning_records(candidates: dict[str, list[dict]]) -> dict[str, dict]:
    """Each candidate's record at the seed all of them have (the tuning seed), else at its own first seed."""
    shared = set.intersection(*({r["config"]["seed"] for r in records} for records in candidates.values()))
    seed = min(shared) if shared else None
    return {key: min(records, key=lambda r: (seed is not None and r["config"]["seed"] != seed, r["config"]["seed"]))
            for key, records in candidates.items()}


def choose_configuration(candidates: dict[str, list[dict]]) -> str:
    """Of configurations (key -> their records over seeds) that differ only in nuisance settings, the one the grid
    would choose: ranked by `tie_rule` (their own `choice_metric`) on the tuning seed's records."""
    records = _tuning_records(candidates)
    return min(records, key=lambda key: rank(records[key]))


def _cells(groups: dict[str, tuple[dict, list[dict]]]) -> dict[str, dict[str, list[dict]]]:
    """Configurations that differ only in the learning rate, together: cell -> {config key: records}."""
    cells: dict[str, dict[str, list[dict]]] = {}
    for key, (fields, records) in groups.items():
        cell = json.dumps({k: v for k, v in fields.items() if k != "learning_rate"}, sort_keys=True, default=str)
        cells.setdefault(cell, {})[key] = records
    return cells


def tuned_cells(groups: dict[str, tuple[dict, list[dict]]]) -> dict[str, str]:
    """The report's rows among configurations grouped by `report._configurations`: config key -> how its learning
    rate was chosen. Configurations that differ only in the learning rate form one tuned cell, of which only the
    chosen one is a row; a configuration alone in its cell kept the rate it was given. A rate chosen by dev
    macro-F1 says so ("dev macro-F1, of 3 rates"); by accuracy it reads as it always did ("dev, of 3 rates")."""
    how = {}
    for candidates in _cells(groups).values():
        if len(candidates) == 1:
            how[next(iter(candidates))] = "given"
            continue
        chosen = choose_configuration(candidates)
        on = {r.get("selected_on") or "validation" for r in candidates[chosen]}
        named = " macro-F1" if record_metric(candidates[chosen][0]) == "f1" else ""
        how[chosen] = f"{'dev' if on == {'dev'} else 'validation'}{named}, of {len(candidates)} rates"
    return how


def rate_curve_rows(groups: dict[str, tuple[dict, list[dict]]]) -> list[dict[str, Any]]:
    """The metric-vs-rate points of every tuned cell (`cell`: which, one line each): its tuning seed's `choice_value`
    at each rate (`value`), named by `metric` and the `split` it was measured on (validation for runs without a dev
    split)."""
    rows = []
    for cell, candidates in enumerate(_cells(groups).values()):
        if len(candidates) < 2:
            continue
        chosen = choose_configuration(candidates)
        for key, record in _tuning_records(candidates).items():
            metric = record_metric(record)
            rows.append({"cell": cell, **{name: record["config"][name] for name in CELL},
                         "learning_rate": record["config"]["learning_rate"], "metric": metric,
                         "split": "dev" if record.get("dev_accuracy") is not None else "validation",
                         "value": choice_value(record, metric), "chosen": key == chosen})
    return rows


def caption(how: dict[str, str], metrics: tuple[str, ...] = ("accuracy",)) -> str:
    """The sentence that says how the rows' learning rates were chosen, by the report's `metrics_of`."""
    tuned = sorted({text for text in how.values() if text != "given"})
    if not tuned:
        return "Every row kept the learning rate it was given (no rates were compared)."
    return ("Learning rate chosen: each row's rate was picked among the rates its cell trained (first seed, same "
            f"length and data) by {tie_rule(metrics)}, on the dev split carved from the training data "
            "(\"validation\" marks runs without one); the other rates are in runs.csv and lr_curves.png, not in this "
            "table.")
