"""Every cell tuned alike: each scientific cell's learning rate chosen on the dev split from one list of rates.

The learning rate is a nuisance parameter: comparing depths at one shared rate, or against a baseline tuned
harder than the other rows, measures the rate rather than the depth. So each cell (freeze depth × schedule ×
epochs; the full fine-tune baseline is one of them) trains the study's first seed at every rate, at the study's
own length and data size. The cell's rate is the one whose run ranks first by `TIE_RULE` on the dev split, and
its seeds train at that rate; the first seed's run at the chosen rate is the tuning run itself (the same run id,
so the ledger reuses it). A rate whose run failed (its loss diverged, say) is out of the running.

The report applies the same rule to the stored runs (`choose_configuration`), so its rows are the configurations
the grid chose, and the other rates show in runs.csv and in the accuracy-vs-rate figure only.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.config import RunConfig

TIE_RULE = "the higher dev accuracy, then the lower dev loss, then the smaller learning rate"
CELL = ("freeze_depth", "scheduler", "epochs")


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


def choice_accuracy(values: dict[str, Any]) -> float:
    """The accuracy a choice is made on, for a record or one epoch of its history: the dev split's where the run
    had one, else (no dev split, or a record from before dev splits existed) validation's."""
    dev = values.get("dev_accuracy")
    return values["accuracy"] if dev is None else dev


def rank(record: dict[str, Any]) -> tuple:
    """Sort key of `TIE_RULE`: the first record ranks best. Without a dev split, validation stands in."""
    on_dev = record.get("dev_accuracy") is not None
    loss = record.get("dev_loss") if on_dev else record.get("loss")
    return (-choice_accuracy(record), loss if loss is not None else float("inf"),
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
        best = min(candidates, key=rank)
        choices[cell] = {**dict(zip(CELL, cell)), "learning_rate": best["config"]["learning_rate"],
                         "selected_on": best.get("selected_on") or "validation",
                         "dev_accuracy": {f"{r['config']['learning_rate']:g}": choice_accuracy(r)
                                          for r in sorted(candidates, key=lambda r: r["config"]["learning_rate"])}}
    return choices


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
    would choose: ranked by `TIE_RULE` on the tuning seed's records."""
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
    chosen one is a row; a configuration alone in its cell kept the rate it was given."""
    how = {}
    for candidates in _cells(groups).values():
        if len(candidates) == 1:
            how[next(iter(candidates))] = "given"
            continue
        chosen = choose_configuration(candidates)
        on = {r.get("selected_on") or "validation" for r in candidates[chosen]}
        how[chosen] = f"{'dev' if on == {'dev'} else 'validation'}, of {len(candidates)} rates"
    return how


def rate_curve_rows(groups: dict[str, tuple[dict, list[dict]]]) -> list[dict[str, Any]]:
    """The accuracy-vs-rate points of every tuned cell: its tuning seed's dev accuracy at each rate."""
    rows = []
    for candidates in _cells(groups).values():
        if len(candidates) < 2:
            continue
        chosen = choose_configuration(candidates)
        for key, record in _tuning_records(candidates).items():
            rows.append({**{name: record["config"][name] for name in CELL},
                         "learning_rate": record["config"]["learning_rate"], "dev_accuracy": choice_accuracy(record),
                         "chosen": key == chosen})
    return rows


def caption(how: dict[str, str]) -> str:
    """The sentence that says how the rows' learning rates were chosen."""
    tuned = sorted({text for text in how.values() if text != "given"})
    if not tuned:
        return "Every row kept the learning rate it was given (no rates were compared)."
    return ("Learning rate chosen: each row's rate was picked among the rates its cell trained (first seed, same "
            f"length and data) by {TIE_RULE}, on the dev split carved from the training data (\"validation\" marks "
            "runs without one); the other rates are in runs.csv and lr_curves.png, not in this table.")
