"""The figures of tuning and search: what drives each objective (`importance`, the search's importance.png) and how
each depth's chosen metric moves with the learning rate (`lr_curves`, the report's lr_curves.png). They draw as
`ablations.plots` does (its style, colours and saving) and live apart from the trade-off figures.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ablations import plots
from ablations.tuning import CHOICE_LABELS, split_label

def importance(panels: dict[str, dict | str], parameters: list[str], runs: int, path: Path) -> Path:
    """fANOVA importance of each searched parameter, one panel per objective; a panel given as text (nothing to
    explain) shows that text over empty bars."""
    with sns.plotting_context("talk"):
        figure = Figure(figsize=(14, 6), layout="constrained")
        for ax, (objective, found) in zip(figure.subplots(1, 2, sharey=True), panels.items()):
            values = [float(found.get(name, 0.0)) if isinstance(found, dict) else 0.0 for name in parameters]
            sns.barplot(x=values, y=parameters, order=parameters, color="#31688e", ax=ax)
            if isinstance(found, str):
                ax.text(0.5, 0.5, found, transform=ax.transAxes, ha="center", va="center", wrap=True)
            ax.set(title=objective, xlim=(0, 1), xlabel="fANOVA importance", ylabel="")
        figure.suptitle(f"What drives each objective ({runs} complete runs)")
        return plots._save(figure, path)


def _rate_text(rate: float) -> str:
    """A rate as mantissa and power of ten (3e-4, 2.5e-5): exact and short, so neighbouring ticks one half-decade
    apart do not run together as 0.0001 and 0.0003 did."""
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _named(metric: str, splits: set[str]) -> str:
    """What a panel's values are: the choice metric on the dev split, or on validation where the runs had none."""
    named = split_label(metric, splits != {"validation"})
    return named if len(splits) == 1 else f"{named} (validation's without a dev split)"


def lr_curves(points: pd.DataFrame, about: dict[str, str], path: Path) -> Path:
    """The metric each cell chose its rate by (`ablations.tuning.rate_curve_rows`: dev accuracy, or dev macro-F1 under
    --select-by f1) against the learning rate (log scale), one line per depth, one panel per schedule (and per
    metric where cells chose by different ones); the rate each cell chose is ringed. How sensitive each depth is to
    the rate, at a glance."""
    points = points.assign(value=points["value"] * plots.PERCENT).rename(
        columns={"freeze_depth": "freeze depth", "epochs": "epochs trained"})
    panels = sorted({(s, m) for s, m in zip(points["scheduler"], points["metric"])},
                    key=lambda panel: (panel[0], list(CHOICE_LABELS).index(panel[1])))
    mixed = points["metric"].nunique() > 1
    depths = sorted(points["freeze depth"].unique())
    style = "epochs trained" if points["epochs trained"].nunique() > 1 else None
    with plots._style(), sns.axes_style("whitegrid"):
        figure = Figure(figsize=plots.SIZE, layout="constrained")
        axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
        for i, (ax, (scheduler, metric)) in enumerate(zip(axes, panels)):
            mine = points[(points["scheduler"] == scheduler) & (points["metric"] == metric)]
            mine = mine.sort_values("learning_rate")
            # one line per cell: two cells of one depth (another dev split, warmup, ...) are not joined into one
            sns.lineplot(mine, x="learning_rate", y="value", hue="freeze depth", style=style,
                         units="cell", estimator=None, palette=plots._depth_colours(depths),
                         hue_order=depths, marker="o", markersize=10, linewidth=2.5, ax=ax,
                         legend=i == len(panels) - 1)
            chosen = mine[mine["chosen"]]
            ax.scatter(chosen["learning_rate"], chosen["value"], s=420, facecolors="none",
                       edgecolors="black", linewidths=2.5, zorder=5, label="_chosen")
            ax.set_xscale("log")
            ax.set_xticks(sorted(points["learning_rate"].unique()))
            ax.set_xticklabels([_rate_text(rate) for rate in sorted(points["learning_rate"].unique())])
            ax.xaxis.set_minor_formatter(NullFormatter())  # a log axis labels minor ticks (2×10⁻³): no rate tried
            named = _named(metric, set(mine["split"]))
            ax.set(title=f"schedule: {scheduler}" + (f", by {named}" if mixed else ""),
                   xlabel="learning rate (log scale)", ylabel=f"{named} (%)" if i == 0 or mixed else "")
        if axes[-1].get_legend() is not None:
            sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        named = "Dev accuracy or macro-F1 (each cell's own)" if mixed else \
            _named(points["metric"].iloc[0], set(points["split"]))
        figure.suptitle(f"{named[0].upper()}{named[1:]} vs learning rate (first seed; ringed: the rate each cell "
                        f"chose)\n{plots._title(about)}", fontsize=19)
        return plots._save(figure, path)
