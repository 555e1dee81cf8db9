"""The trade-off table as GitHub-flavoured Markdown, with a caption that names the data and every method used."""
from __future__ import annotations

from typing import Any

import pandas as pd

DEFAULT_BASELINE: dict[str, Any] = {"freeze_depth": 0}


def _seconds(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _percent(value: float) -> str:
    return "—" if value is None or pd.isna(value) else f"{100 * value:.1f} %"


def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):  # None becomes NaN
        return "—"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _p_value(p: float) -> str:
    return "—" if pd.isna(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def markdown(table: pd.DataFrame, about: dict[str, str], baseline: dict | None = None) -> str:
    """A GitHub-flavoured table with a caption that names the data and every method used."""
    shown = list(table.columns[:table.columns.get_loc("label")])
    names = {"freeze_depth": "freeze depth", "scheduler": "schedule", "learning_rate": "learning rate"}
    header = [names.get(c, c.replace("_", " ")) for c in shown] + [
        "seeds", "val. accuracy [95 % CI]", "test accuracy", "train s", "speed-up", "trainable params", "Pareto",
        "vs baseline (Δ, McNemar p, b/c)"]
    align = ["---"] * len(shown) + ["--:"] * 6 + [":-:", "---"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in table.itertuples(index=False):
        cells = [_cell(getattr(row, c)) for c in shown]
        if row.baseline:
            cells = [f"**{cell}**" for cell in cells]
        accuracy = _percent(row.accuracy_mean)
        if not pd.isna(row.accuracy_low):
            accuracy += f" [{100 * row.accuracy_low:.1f}, {100 * row.accuracy_high:.1f}]"
        if row.baseline:
            versus = "**baseline**"
        elif pd.isna(row.accuracy_delta):
            versus = "no baseline run"
        else:
            pairs = f"{row.mcnemar_b}/{row.mcnemar_c}" if row.mcnemar_pairs else "no shared seeds"
            delta = f"{100 * row.accuracy_delta:+.1f}".replace("-", "−")
            versus = f"{delta} pp, p {_p_value(row.p_value)}, {pairs}"
        cells += [str(row.seeds), accuracy, _percent(row.test_accuracy_mean), _seconds(row.train_seconds_mean),
                  "—" if pd.isna(row.speedup) else f"{row.speedup:.2f}×",
                  "—" if pd.isna(row.trainable_params) else f"{int(row.trainable_params):,}",
                  "★" if row.pareto else "", versus]
        lines.append("| " + " | ".join(cells) + " |")
    target = ", ".join(f"{k} = {v}" for k, v in (DEFAULT_BASELINE if baseline is None else baseline).items())
    caption = (f"**Accuracy–time trade-off.** Model `{about['model']}`, data `{about['data']}`, "
               f"{about['train']} training examples, {about['validation']} validation examples, "
               f"device: {about['device']}.")
    methods = (
        "Validation accuracy is the mean over seeds with a 95 % Student-t interval (scipy.stats.t); a configuration "
        "with one seed gets a 95 % Wilson binomial interval over its validation examples. Train s is the mean "
        f"training time; speed-up = baseline time / configuration time. Baseline (**bold**): {target}, every other "
        "scientific and fixed field equal; learning rate, warmup and weight decay are nuisance settings, so among "
        "baselines that differ only in them the most accurate one is used. The p-value is an exact McNemar test on "
        "per-example validation correctness, pairing seed s "
        "with baseline seed s and pooling the discordant counts over seeds (b = right only here, c = right only in "
        "the baseline; two-sided scipy.stats.binomtest of b against Bin(b + c, ½)). ★ = Pareto-optimal: no other "
        "configuration is at least as accurate and at least as fast.")
    if "learning_rate_choice" in table.columns:  # some rows' rates were tuned (ablations.tuning)
        from ablations.tuning import caption as rate_caption
        methods += " " + rate_caption(dict(enumerate(table["learning_rate_choice"])))
    return "\n".join([caption, "", *lines, "", methods, ""])
