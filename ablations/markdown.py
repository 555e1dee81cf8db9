"""The trade-off table as GitHub-flavoured Markdown, with a caption that names the data and every method used."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ablations.stats import F1_ONE_SEED, LABELS_UNKNOWN, MCNEMAR, TOO_FEW_SEEDS

DEFAULT_BASELINE: dict[str, Any] = {"freeze_depth": 0}


def _seconds(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _percent(value: float) -> str:
    return "—" if value is None or pd.isna(value) else f"{100 * value:.1f} %"


# What a configuration field left unset means, where a dash would read as "none": no dev split is dev_size 0, and
# an unset dev_size is the default one (10 % of the training rows, at most 1,000).
UNSET = {"dev_size": "default", "max_train_samples": "all", "text_column": "detected", "label_column": "detected"}


def _cell(value: Any, field: str = "") -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):  # None becomes NaN
        return UNSET.get(field, "—")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _p_value(p: float) -> str:
    return "—" if pd.isna(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _versus(row: Any, metric: str = "accuracy") -> str:
    """Δ of `metric`, the Holm-adjusted p and the test that gave it (or why there is none) for a non-baseline row."""
    difference = row.f1_delta if metric == "macro-F1" else row.accuracy_delta
    if pd.isna(difference):
        return "no baseline run"
    tested = getattr(row, "tested_delta", math.nan)  # over the seed pairs, what p is about (tables before it: none)
    difference = difference if pd.isna(tested) else tested
    delta = f"{100 * difference:+.1f}".replace("-", "−") + " pp"
    if row.test == LABELS_UNKNOWN:
        return f"{delta}, no test ({LABELS_UNKNOWN})"
    if row.test == TOO_FEW_SEEDS or pd.isna(row.p_value):
        return f"{delta}, {TOO_FEW_SEEDS} ({row.seed_pairs} shared)"
    test = {MCNEMAR: "McNemar, 1 seed", F1_ONE_SEED: "jackknife t, 1 seed"}.get(row.test, f"t, {row.seed_pairs} seeds")
    return f"{delta}, p {_p_value(row.p_value)} ({test})"


def _interval_cell(mean: float, low: float, high: float) -> str:
    cell = _percent(mean)
    return cell if pd.isna(low) else cell + f" [{100 * low:.1f}, {100 * high:.1f}]"


def time_methods(metric: str = "accuracy") -> str:
    """The caption's times, speed-ups and ★, the front on `metric` (the table's `compared_on`)."""
    as_good, better = ("at least as accurate", "is more accurate") if metric == "accuracy" else \
        ("at least as high in validation macro-F1", "has a higher one")
    return (
        "Train s is what training the configuration costs alone on this hardware (mean over seeds) with its 95 % "
        "interval over timing repeats (README: How training time is measured); ⚠ = timed while "
        "other processes loaded the machine (evidence in tradeoff.csv, column `contention`), so the time may be "
        "inflated. Speed-up = baseline time / configuration time, bounded by the two time intervals (exactly 1 where "
        "both read one timing: the same work shape and steps). ★ = Pareto-"
        f"optimal: no other configuration on the same data is {as_good} and clearly faster (its time interval lies "
        f"entirely below this one's), and none with the same measured time {better}; a time difference "
        "inside the timing noise decides nothing.")


def _time_cell(row) -> str:
    cell = _seconds(row.train_seconds)
    if not pd.isna(row.train_seconds_lo) and not pd.isna(row.train_seconds_hi):
        cell += f" [{_seconds(row.train_seconds_lo)}, {_seconds(row.train_seconds_hi)}]"
    return cell + (" ⚠" if contended(getattr(row, "contended", None)) else "") + \
        (" ‡" if contended(getattr(row, "group_share", None)) else "")


def contended(value) -> bool:
    """A row's `contended` cell: True only where its timing saw foreign load (empty: not known, not marked)."""
    return not pd.isna(value) and bool(value)


def _speedup_cell(row) -> str:
    if pd.isna(row.speedup):
        return "—"
    if pd.isna(row.speedup_lo) or pd.isna(row.speedup_hi) or row.baseline:
        return f"{row.speedup:.2f}×"
    high = "∞" if math.isinf(row.speedup_hi) else f"{row.speedup_hi:.2f}"  # a time interval reaching 0
    return f"{row.speedup:.2f}× [{row.speedup_lo:.2f}, {high}]"


def timed_alone(table: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per row: (timed alone, has a time interval). A row was timed alone when it names its timing pass
    (`timed_at`); it has an interval only when that pass had two rounds or more (`--timing-repeats 1` times alone,
    once). Tables from before `timed_at` existed: a row with an interval was timed alone."""
    interval = table["train_seconds_lo"].notna() if "train_seconds_lo" in table.columns \
        else pd.Series(False, index=table.index)
    return (table["timed_at"].notna() if "timed_at" in table.columns else interval), interval


def timing_passes(table: pd.DataFrame) -> tuple[list[str], int]:
    """The timing passes the table's times come from (their UTC stamps, sorted) and the most work shapes any of
    them timed together (1: each shape alone; more: a sitting, `core.sitting`)."""
    cells = table["timed_at"].dropna() if "timed_at" in table.columns else []
    sitting = table["sitting"].dropna() if "sitting" in table.columns else pd.Series(dtype=float)
    return sorted({at for cell in cells for at in str(cell).split("; ")}), int(sitting.max()) if len(sitting) else 1


def passes_sentence(table: pd.DataFrame) -> str:
    """Whether the rows' times come from one sitting (every shape timed together: their ratios are fair) or from
    timing passes taken at different times (a shared machine drifts between them): said beside the table."""
    passes, shapes = timing_passes(table)
    when = [at.replace("T", " ").rstrip("Z") for at in passes]
    if len(passes) == 1 and shapes > 1:
        return (f" Every timed row comes from one sitting: its {shapes} work shapes timed together, "
                f"round-robin, at {when[0]} UTC, so machine drift between passes does not enter the speed-ups.")
    if len(passes) < 2:
        return ""
    return (f" The times come from {len(passes)} timing passes taken from {when[0]} "
            f"to {when[-1]} UTC; a shared machine drifts between passes and a "
            "speed-up across two passes carries that drift (`python -m ablations.timing_passes` lists them; "
            "`--interleave --store` times every shape again in one sitting and the report then uses it).")


MACRO_F1_METHODS = (
    " Val. macro-F1 is the F1 of each class on the validation examples averaged with every class weighted alike "
    "(a class the examples lack and the run never predicts is left out, as scikit-learn does; at the reported "
    "epoch, mean over seeds; — where the runs did not record it): unlike accuracy it drops when "
    "a small class is missed. Its 95 % interval is Student t over seeds, or with one seed a t interval from the "
    "jackknife standard error over the validation examples")  # then what Δ and the test compare
F1_TEST_METHODS = (
    "Every run chose its epoch by dev macro-F1 (--select-by f1), as did every choice between runs (learning rate, "
    "baseline), so macro-F1 is what is compared: Δ = macro-F1 − baseline macro-F1 (over the seeds both "
    "have where a test ran), ★ and the figures use it too. The "
    "test pairs seed s with baseline seed s on the same validation examples, on macro-F1's jackknife pseudo-values "
    "(n·F − (n − 1)·F without example i, each seed's shifted to its F: macro-F1 is no mean over examples, its pseudo-"
    "values act as one). With two or more seed pairs (t, n seeds) it counts both noises: the larger p of the paired t"
    " over the per-seed macro-F1 differences (n − 1 degrees of freedom) and a t whose squared standard error adds the"
    " per-seed and the per-example spreads (Clark's min F′, Welch–Satterthwaite degrees of freedom); with one seed on"
    " each side it is the t over the examples' pseudo-values alone (jackknife t, example noise only); otherwise the "
    "row says too few seeds. p is two-sided and Holm-adjusted over the tested rows of this table (tradeoff.csv: "
    "p_value adjusted, p_value_raw not; accuracy_delta is there too).")


def markdown(table: pd.DataFrame, about: dict[str, str], baseline: dict | None = None, *,
             macro_f1: bool = False, chosen_by: tuple[str, ...] = ("accuracy",), left_out: str = "") -> str:
    """A GitHub-flavoured table with a caption that names the data and every method used; with `macro_f1`
    (`ablations.tradeoff.f1_informs`) a validation macro-F1 column beside accuracy. `chosen_by`: the metrics that
    ranked the runs' nuisance settings (`ablations.tuning.metrics_of`). Δ and the test are on the table's
    `compared_on` metric (`ablations.baselines.compared_on`): accuracy, or macro-F1 where every run chose by it.
    `left_out` (`failed_runs_note`) closes the caption: the runs asked for that no row holds."""
    from ablations.tuning import choice_label, caption as rate_caption
    metric = compared_metric(table)
    macro_f1 = macro_f1 or metric == "macro-F1"
    shown = list(table.columns[:table.columns.get_loc("label")])
    names = {"freeze_depth": "freeze depth", "scheduler": "schedule", "learning_rate": "learning rate"}
    f1_header = "val. macro-F1 [95 % CI]" if "f1_low" in table.columns else "val. macro-F1"
    header = [names.get(c, c.replace("_", " ")) for c in shown] + [
        "seeds", "val. accuracy [95 % CI]", *([f1_header] if macro_f1 else []), "test accuracy", "train s",
        "speed-up", "trainable params", "Pareto",
        "vs baseline (Δ macro-F1, Holm p, test)" if metric == "macro-F1" else "vs baseline (Δ, Holm p, test)"]
    align = ["---"] * len(shown) + ["--:"] * (7 if macro_f1 else 6) + [":-:", "---"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in table.itertuples(index=False):
        cells = [_cell(getattr(row, c), c) for c in shown]
        if row.baseline:
            cells = [f"**{cell}**" for cell in cells]
        accuracy = _interval_cell(row.accuracy_mean, row.accuracy_low, row.accuracy_high)
        versus = "**baseline**" if row.baseline else _versus(row, metric)
        f1 = [_interval_cell(*(getattr(row, f"f1_{part}", None) for part in ("mean", "low", "high")))] \
            if macro_f1 else []  # tables from before f1_mean: —
        cells += [str(row.seeds), accuracy, *f1, _percent(row.test_accuracy_mean), _time_cell(row), _speedup_cell(row),
                  "—" if pd.isna(row.trainable_params) else f"{int(row.trainable_params):,}",
                  "★" if row.pareto else "", versus]
        lines.append("| " + " | ".join(cells) + " |")
    target = ", ".join(f"{k} = {v}" for k, v in (DEFAULT_BASELINE if baseline is None else baseline).items())
    title = "Macro-F1" if metric == "macro-F1" else "Accuracy"
    caption = (f"**{title}–time trade-off.** Model `{about['model']}`, data `{about['data']}`, "
               f"{about['train']} training examples, {about['validation']} validation examples, "
               f"device: {about['device']}.")
    methods = (
        "Validation accuracy is the mean over seeds with a 95 % Student-t interval over seeds (scipy.stats.t: the "
        "spread of training runs on these validation examples, not the examples' own sampling noise, which the test "
        "adds); a configuration with one seed gets a 95 % Wilson binomial interval over its validation examples. "
        "Baseline (**bold**): "
        f"{target}, every other scientific and fixed field equal; learning rate, warmup and weight decay are "
        "nuisance settings, so among baselines that differ only in them the one ranked first on the dev split is "
        f"used (higher {choice_label(chosen_by)}, then lower dev loss, then the smaller rate; runs without a dev "
        "split are ranked "
        "on validation, the set they are reported on). ")
    accuracy_test = (
        "Δ = accuracy − baseline accuracy, over the seeds both have where a test ran (what it compares). The test "
        "pairs seed s with "
        "baseline seed s on the same validation examples. With two or more seed pairs (t, n seeds) it counts both "
        "noises: "
        "the larger p of the paired t over the per-seed differences (n − 1 degrees of freedom) and a t whose squared "
        "standard error adds the per-seed and the per-example spreads (Clark's min F′, Welch–Satterthwaite degrees "
        "of freedom); with one seed on each side it is an exact McNemar test on that pair (example noise only); "
        "otherwise the row says too few seeds. p is two-sided and Holm-adjusted over the tested rows of this table "
        "(tradeoff.csv: p_value adjusted, p_value_raw not).")
    if metric == "macro-F1":
        methods += F1_TEST_METHODS + MACRO_F1_METHODS + ". " + time_methods(metric)
    else:
        f1_methods = MACRO_F1_METHODS + "; Δ and the test compare accuracy." if macro_f1 else ""
        methods += accuracy_test + f1_methods + " " + time_methods()
    if "train_seconds_lo" in table.columns:
        timed, interval = timed_alone(table)
        if (~timed).any():
            methods += (" Rows without a timing pass were not timed alone (runs recorded before timing passes, or "
                        "with --timing-repeats 0): their train s is the training loop as it ran, possibly beside "
                        "other work on the machine.")
            if "group_share" in table.columns and table["group_share"].map(contended).any():
                methods += (" ‡ = trained in a stacked group (--max-parallel-runs) without a timing pass: its train s "
                            "is its share of the group's loop (the loop divided by the runs trained together), not "
                            "what it costs alone; compare it only with rows trained alike.")
        if (timed & ~interval).any():
            methods += (" Rows timed alone in a single round (--timing-repeats 1) have no time interval.")
    methods += passes_sentence(table)
    if "learning_rate_choice" in table.columns:  # some rows' rates were tuned (ablations.tuning)
        methods += " " + rate_caption(dict(enumerate(table["learning_rate_choice"])), chosen_by)
    return "\n".join([caption, "", *lines, "", methods + (" " + left_out if left_out else ""), ""])


def _first_words(text: str, most: int = 80) -> str:
    return text if len(text) <= most else text[:most - 1].rstrip() + "…"


def failed_runs_note(ledger: pd.DataFrame, most: int = 5) -> str:
    """The runs that failed and never completed (a retry that completed is in the table), which no row holds: a
    configuration whose every seed failed (a NaN loss at a high rate) would otherwise be absent without a word.
    `ledger` is `ablations.tradeoff.run_table`."""
    from ablations.plot_labels import point_label
    done = set(ledger.loc[ledger["state"] == "COMPLETE", "run_id"].dropna())
    failed = ledger[(ledger["state"] == "FAIL") & ~ledger["run_id"].isin(done)]
    key = failed["run_id"].fillna(failed["study"].astype(str) + "#" + failed["number"].astype(str))
    failed = failed.assign(key=key).drop_duplicates("key", keep="last")  # a run failed on each retry counts once
    if failed.empty:
        return ""
    named = [f"{point_label(row._asdict(), ['learning_rate'] if pd.notna(row.learning_rate) else [])} "
             f"seed {_cell(row.seed)} "
             f"({_first_words(str(row.fail_reason or 'no reason stored').splitlines()[0])})"
             for row in failed.itertuples(index=False)]
    more = f"; and {len(named) - most} more" if len(named) > most else ""
    runs = "1 run" if len(named) == 1 else f"{len(named)} runs"
    return (f"Not in the table: {runs} that failed and did not complete on a retry — {'; '.join(named[:most])}"
            f"{more} (runs.csv: state FAIL, fail_reason).")


def compared_metric(table: pd.DataFrame) -> str:
    """The metric a trade-off table's Δ, test and ★ are on: its `compared_on` column (tables from before it
    existed: accuracy)."""
    if "compared_on" in table.columns and len(table) and table["compared_on"].iloc[0] == "macro-F1":
        return "macro-F1"
    return "accuracy"
