"""The words on the trade-off report's figures: each point's short label (also the Markdown table's name for a
configuration), the fields that vary between rows, the metric drawn, and what the time axis measures. Text only:
no matplotlib here (`ablations.plots` draws, `ablations.label_placement` places the labels).
"""
from __future__ import annotations

import pandas as pd

SCHEDULER_SHORT = {"linear": "lin", "cosine": "cos", "constant": "const", "constant_with_warmup": "const-w",
                   "cosine_with_restarts": "cos-r", "polynomial": "poly", "inverse_sqrt": "isqrt"}


LABEL_NAMES = {"learning_rate": "lr", "warmup_ratio": "warmup", "weight_decay": "wd", "max_train_samples": "n",
               "batch_size": "batch", "device": "", "dev_size": "dev"}


def _value_text(value) -> str:
    """Two significant digits for a float (7.42921e-05 -> 7.4e-05, 0.16777 -> 0.17): a label names a point, the
    table holds the exact value."""
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def point_label(fields: dict, extra: list[str]) -> str:
    """Short point label such as 'd4 cos 2ep', plus any other field that varies ('lr 7.4e-05 warmup 0.17')."""
    scheduler = SCHEDULER_SHORT.get(str(fields.get("scheduler")), str(fields.get("scheduler")))
    parts = [f"d{fields.get('freeze_depth')}", scheduler, f"{fields.get('epochs')}ep"]
    from ablations.markdown import UNSET
    for name in extra:
        short, value = LABEL_NAMES.get(name, name), fields.get(name)
        parts.append(f"{short} {UNSET.get(name, value) if value is None else _value_text(value)}".strip())
    return " ".join(parts)


def varying_fields(table: pd.DataFrame) -> list[str]:
    """Configuration fields beyond depth, schedule and epochs that differ between rows (e.g. learning_rate)."""
    candidates = table.columns[3:table.columns.get_loc("label")].drop("learning_rate_choice", errors="ignore")
    return [name for name in candidates if table[name].astype(str).nunique() > 1]


def reported(table: pd.DataFrame) -> tuple[str, str]:
    """The metric the figures draw (the table's `compared_on`: accuracy, or macro-F1 where every run chose by it)
    as (column prefix, name): ("accuracy", "accuracy") or ("f1", "macro-F1")."""
    from ablations.markdown import compared_metric
    return ("f1", "macro-F1") if compared_metric(table) == "macro-F1" else ("accuracy", "accuracy")


def time_axis_label(table: pd.DataFrame) -> str:
    """What the x axis measures: the solo cost where every row was timed alone, else says which were not
    (`ablations.markdown.timed_alone`: a single timing round is alone, without an interval)."""
    from ablations.markdown import timed_alone, timing_passes
    timed, interval = timed_alone(table)

    def bars(over: str) -> str:
        if interval[timed].all():
            return f"x bars: 95 % interval over {over}"
        if not interval[timed].any():
            return "one timing round: no interval"
        return f"x bars: 95 % interval over {over}; none: one timing round"
    if timed.all():
        passes, shapes = timing_passes(table)
        if len(passes) == 1 and shapes > 1:
            return (f"training time alone, from one sitting of {int(shapes)} work shapes timed together "
                    f"(s; {bars('its rounds')})")  # the sitting's shapes: a search times depths it may not draw
        if len(passes) > 1:
            return f"training time alone, from {len(passes)} timing passes (s; {bars('repeats')})"
        return f"training time alone (s; {bars('timing repeats')})"
    if not timed.any():
        return "training time as it ran (s; not timed alone, other work may have shared the machine)"
    return f"training time (s; {int(timed.sum())} of {len(table)} timed alone; the others as they ran)"
