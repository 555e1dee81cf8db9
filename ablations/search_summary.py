"""search_summary.md: the search in a few lines — its Pareto front (by the choice score), the knee, and the knee's
speed-up read from the trade-off report's table (`ablations.pareto.write_outputs` writes it).
"""
from __future__ import annotations

import pandas as pd

from ablations.pareto import knee_index
from ablations.tuning import split_label


def _row_text(row, metric: str = "accuracy") -> str:
    score = f"accuracy {row.accuracy:.4f}{_dev_text(row.dev_accuracy)}" if metric == "accuracy" else \
        f"macro-F1 {_accuracy(row.f1)}{_dev_text(row.dev_f1)}, accuracy {row.accuracy:.4f}"
    return (f"freeze {row.freeze_depth}, {row.scheduler}, {row.epochs} epoch(s), lr {row.learning_rate:.3g}, "
            f"warmup {row.warmup_ratio:.3g}: {score} in {row.train_seconds:.1f} s ({row.trial})")


def knee_comparison(table: pd.DataFrame | None, knee: pd.Series, metric: str = "accuracy", on_dev: bool = True) -> str:
    """The knee against its baseline, read from the trade-off report's table (`ablations.tradeoff.tradeoff_table`)
    so that search_summary.md and tradeoff.md state one speed-up for one configuration."""
    if table is None:
        return "**Speed-up**: no trade-off table (no complete run to report)."
    config = {"freeze_depth": knee.freeze_depth, "scheduler": knee.scheduler, "epochs": knee.epochs,
              "learning_rate": knee.learning_rate, "warmup_ratio": knee.warmup_ratio, "device": knee.device}
    mask = pd.Series(True, index=table.index)
    for name, value in config.items():
        if name in table.columns:  # a field the table does not show is the same in every configuration
            mask &= table[name] == value
    rows = table[mask]
    rule = ("the report's rule (tradeoff.md): the freeze_depth 0 configuration of this study with the knee's "
            f"schedule and epochs and the highest {split_label(metric, on_dev)}, learning rate and warmup tuned "
            "away, timed on the same device")
    if len(rows) != 1 or pd.isna(rows.iloc[0]["speedup"]):
        return f"**Full fine-tune baseline**: none by {rule}; no speed-up is stated."
    row = rows.iloc[0]
    # the difference the report states: macro-F1's where every run chose by it (`ablations.baselines.compared_on`)
    on_f1 = row.get("compared_on") == "macro-F1"
    delta = f"{100 * row['f1_delta' if on_f1 else 'accuracy_delta']:+.1f} pp {'macro-F1' if on_f1 else 'accuracy'}"
    return (f"**Full fine-tune baseline** by {rule}: the knee ({row['label']}, mean over {row['seeds']} seed(s)) is "
            f"{row['speedup']:.2f}× as fast, {delta}.")


SUMMARY_SCORES = {  # the front's score columns in search_summary.md: the one that chose first
    "accuracy": ("dev accuracy vs training seconds; validation accuracy reported",
                 {"dev accuracy": "dev_accuracy", "val. accuracy": "accuracy"},
                 "highest dev accuracy end, with dev accuracy"),
    "f1": ("dev macro-F1 vs training seconds; validation macro-F1 and accuracy reported",
           {"dev macro-F1": "dev_f1", "val. macro-F1": "f1", "val. accuracy": "accuracy"},
           "highest dev macro-F1 end, with dev macro-F1")}
NO_DEV_SCORES = {  # runs without a dev split (--dev-size 0) chose on validation: no dev column, no "dev" heading
    "accuracy": ("validation accuracy vs training seconds: no dev split, validation chose",
                 {"val. accuracy": "accuracy"}, "highest validation accuracy end, with validation accuracy"),
    "f1": ("validation macro-F1 vs training seconds: no dev split, validation chose; accuracy reported",
           {"val. macro-F1": "f1", "val. accuracy": "accuracy"},
           "highest validation macro-F1 end, with validation macro-F1")}


def summary_markdown(title: str, counts: str, front: pd.DataFrame, table: pd.DataFrame | None,
                     notes: list[str], metric: str = "accuracy") -> str:
    """The search in a few lines: the front (by `metric`'s score), its knee and, from the report's table, the
    knee's speed-up."""
    lines = [f"# {title}", "", counts, ""]
    if front.empty:
        return "\n".join(lines + ["No complete run yet: no front.", "", *notes, ""])
    on_dev = front["dev_accuracy"].notna().all()  # a search pins --dev-size: its runs all have a dev split or none
    heading, scores, end = (SUMMARY_SCORES if on_dev else NO_DEV_SCORES)[metric]
    lines += [f"## Pareto front ({heading})", "",
              f"| freeze depth | schedule | epochs | learning rate | warmup | {' | '.join(scores)} | train s "
              "| trainable params | trial |", "|--:|---|--:|--:|--:|" + "--:|" * len(scores) + "--:|--:|---|"]
    lines += [f"| {r.freeze_depth} | {r.scheduler} | {r.epochs} | {r.learning_rate:.3g} | {r.warmup_ratio:.3g} | "
              + "".join(f"{_accuracy(getattr(r, column))} | " for column in scores.values())
              + f"{r.train_seconds:.1f}{' ⚠' if getattr(r, 'contended', False) else ''} | "
              f"{_count(r.trainable_params)} | {r.trial} |" for r in front.itertuples(index=False)]
    if "contended" in front.columns and front["contended"].any():  # as tradeoff.md marks it: never dropped
        lines += ["", "⚠ = timed while other processes loaded the machine, so the time may be inflated (evidence in "
                      "tradeoff.csv, column `contention`)."]
    knee = front.iloc[knee_index(front)]
    lines += ["", f"**Knee point**: {_row_text(knee, metric)}. It is the front point farthest above the line from "
                  f"the front's fastest to its {end} and time min-max scaled over the front.", ""]
    lines.append(knee_comparison(table, knee, metric, on_dev))
    return "\n".join(lines + ["", *notes, ""])


def _accuracy(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.4f}"


def _dev_text(value) -> str:
    return "" if value is None or pd.isna(value) else f" (dev {value:.4f})"


def _count(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{int(value):,}"
