"""Figures of the trade-off report, drawn from the trade-off table and the per-epoch history.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so drawing a report
needs no display and leaves no global figure state behind in the grid or search command that asked for it.
Sizes and fonts are chosen to stay legible at half size (1920 x 1200 px at full size).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ablations.baselines import data_groups
from ablations.label_placement import place_labels
from ablations.plot_labels import reported, time_axis_label, varying_fields

SIZE = (16, 10)   # inches; at DPI this is 1920 x 1200 px
DPI = 120
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
PERCENT = 100


def _style():
    return sns.plotting_context("talk", font_scale=1.15, rc={"legend.title_fontsize": 17})


def _depth_colours(depths: list) -> dict:
    """A colour per freeze depth that tells neighbours apart up to 13 depths: hue runs red -> purple with depth
    (so order still reads), lightness alternates dark/light (so adjacent depths never share a shade), and the
    light shade stays dark enough to read on white."""
    ramp = len(depths) + 1  # one spare step, so the first and last hue do not meet around the wheel
    palette = [sns.husl_palette(ramp, h=0.01, s=0.95, l=0.38 if i % 2 == 0 else 0.68)[i] for i in range(len(depths))]
    return dict(zip(depths, palette))


def _title(about: dict[str, str]) -> str:
    """Model, data and sizes on one line, the hardware on the next: a CPU's name alone can fill a line."""
    return (f"{about['model']} on {about['data']} · {about['train']} training examples · "
            f"{about['validation']} validation\n{about['device']}")


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path


def _time_error(row) -> list[list[float]] | None:
    """x error bar from the configuration's 95 % timing interval; none for runs timed before intervals were."""
    low, high = getattr(row, "train_seconds_lo", math.nan), getattr(row, "train_seconds_hi", math.nan)
    if pd.isna(low) or pd.isna(high):
        return None
    return [[max(0.0, row.train_seconds - low)], [max(0.0, high - row.train_seconds)]]


def tradeoff(table: pd.DataFrame, about: dict[str, str], path: Path) -> Path:
    """Accuracy (%) against training seconds with CI bars, the Pareto front as a step line, the baseline ringed;
    macro-F1 instead where the table compares it (`reported`)."""
    column, name = reported(table)
    depths = sorted(table["freeze_depth"].unique())
    schedulers = sorted(table["scheduler"].unique())
    colours = _depth_colours(depths)
    markers = dict(zip(schedulers, MARKERS * 2))
    with _style(), sns.axes_style("whitegrid"):
        figure = Figure(figsize=SIZE, layout="constrained")
        ax = figure.subplots()
        bars = []  # each point's error bars, which a label should not cover
        for row in table.itertuples(index=False):
            mean, low, high = (PERCENT * getattr(row, f"{column}_{part}") for part in ("mean", "low", "high"))
            colour, spread = colours[row.freeze_depth], _time_error(row)
            ax.errorbar(row.train_seconds, mean, yerr=None if pd.isna(low) else [[mean - low], [high - mean]],
                        xerr=spread, fmt=markers[row.scheduler], color=colour, ecolor=colour,
                        elinewidth=2, capsize=5, markersize=14, markeredgecolor="white", markeredgewidth=1.2,
                        zorder=3)
            if not pd.isna(low):
                bars.append(((row.train_seconds, low), (row.train_seconds, high)))
            if spread is not None:
                bars.append(((row.train_seconds - spread[0][0], mean), (row.train_seconds + spread[1][0], mean)))
            if row.baseline:
                ax.plot(row.train_seconds, mean, "o", markersize=30, markerfacecolor="none",
                        markeredgecolor="crimson", markeredgewidth=3, zorder=4)
        for rows in data_groups(table):  # one front per dataset: accuracies on other sentences do not compare
            front = rows[rows["pareto"]].sort_values("train_seconds")
            ax.step(front["train_seconds"], PERCENT * front[f"{column}_mean"], where="post", color="0.3",
                    linestyle="--", linewidth=2, zorder=2)
        ax.margins(x=0.12, y=0.12)
        axis = time_axis_label(table)  # wider than the axes, one line ran off the figure's left edge
        ax.set_xlabel(axis.replace(" (s; ", "\n(s; ", 1) if len(axis) > 70 else axis)
        ax.set_ylabel(f"validation {name} (%)")
        ax.set_title(f"{name[0].upper()}{name[1:]} vs training time (error bars: 95 % CI)", fontsize=20)
        figure.suptitle(_title(about), fontsize=19)
        handles = [Line2D([], [], marker="o", linestyle="", markersize=13, color=colours[d], label=f"{d}")
                   for d in depths]
        ax.add_artist(ax.legend(handles=handles, title="freeze depth", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                                frameon=False))
        handles = [Line2D([], [], marker=markers[s], linestyle="", markersize=13, color="0.35", label=s)
                   for s in schedulers]
        ax.add_artist(ax.legend(handles=handles, title="schedule", loc="center left", bbox_to_anchor=(1.01, 0.42),
                                frameon=False))
        from ablations.markdown import contended as marked
        contended = table["contended"].map(marked) if "contended" in table.columns else \
            pd.Series(False, index=table.index)
        handles = [Line2D([], [], color="0.3", linestyle="--", linewidth=2, label="Pareto front ★")]
        if table["baseline"].any():  # a study without a full fine-tune draws no ring
            handles.append(Line2D([], [], marker="o", linestyle="", markersize=18, markerfacecolor="none",
                                  markeredgecolor="crimson", markeredgewidth=3, label="baseline"))
        if contended.any():
            handles.append(Line2D([], [], linestyle="", label="⚠ timed under load"))
        shared = table["group_share"].map(marked) if "group_share" in table.columns else \
            pd.Series(False, index=table.index)  # untimed, its share of a stacked group's loop (tradeoff.md's ‡)
        if shared.any():
            handles.append(Line2D([], [], linestyle="", label="‡ share of a stacked group's loop"))
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(1.01, 0.0), frameon=False)
        # The marks the table carries (★ Pareto, ⚠ contended): a front of one point draws no line, and a time
        # taken under load looked like one taken alone.
        labels = [label + (" ★" if pareto else "") + (" ⚠" if loaded else "") + (" ‡" if share else "")
                  for label, pareto, loaded, share in zip(table["label"], table["pareto"], contended, shared)]
        place_labels(figure, ax, list(table["train_seconds"]), list(PERCENT * table[f"{column}_mean"]), labels, bars)
        return _save(figure, path)


def heatmap(table: pd.DataFrame, about: dict[str, str], path: Path) -> Path:
    """Mean validation accuracy (macro-F1 where the table compares it), freeze depth x schedule, one panel per epoch
    count (best over other fields)."""
    column, name = reported(table)
    epochs = sorted(table["epochs"].unique())
    # "best over" only what varies inside one cell: a tuned grid's rows differ in rate from cell to cell, one each
    within = table.groupby(["freeze_depth", "scheduler", "epochs"])
    others = [name for name in varying_fields(table) if (within[name].nunique(dropna=False) > 1).any()]
    values = table.assign(accuracy=PERCENT * table[f"{column}_mean"])
    low, high = values["accuracy"].min(), values["accuracy"].max()
    # Every panel indexes the same depths and schedules: the panels share one y axis, so a panel with its own
    # rows would be labelled with another panel's depths. A cell no run filled stays blank.
    depths = sorted(values["freeze_depth"].unique())
    schedulers = sorted(values["scheduler"].unique())
    with _style():
        figure = Figure(figsize=(max(SIZE[0], 6.5 * len(epochs)), SIZE[1]), layout="constrained")
        axes = figure.subplots(1, len(epochs), squeeze=False, sharey=True)[0]
        for i, (ax, epoch_count) in enumerate(zip(axes, epochs)):
            grid = values[values["epochs"] == epoch_count].pivot_table(
                index="freeze_depth", columns="scheduler", values="accuracy", aggfunc="max"
            ).reindex(index=depths, columns=schedulers)
            sns.heatmap(grid, ax=ax, annot=True, fmt=".1f", annot_kws={"fontsize": 18}, cmap="viridis",
                        vmin=low, vmax=high, linewidths=1, linecolor="white", cbar=i == len(epochs) - 1,
                        cbar_kws={"label": f"validation {name} (%)"})
            ax.set_title(f"{epoch_count} epoch{'s' if epoch_count != 1 else ''}")
            ax.set_xlabel("schedule")
            ax.set_ylabel("freeze depth" if i == 0 else "")
            ax.tick_params(axis="y", rotation=0)
        best = f" (best over {', '.join(others)})" if others else ""
        figure.suptitle(f"Mean validation {name} over seeds{best}\n{_title(about)}", fontsize=19)
        return _save(figure, path)


LINESTYLES = ["-", "--", ":", "-."]
DODGE = 0.5  # the share of an epoch's width over which the configurations of one panel are spread


def _dodge(count: int) -> list[float]:
    """x offsets (in epochs) for `count` configurations drawn at the same epochs, centred on the epoch: two
    configurations with the same accuracy at the same epoch stay two visible markers."""
    if count < 2:
        return [0.0] * count
    step = DODGE / (count - 1)
    return [-DODGE / 2 + k * step for k in range(count)]


def curves(history: pd.DataFrame, about: dict[str, str], path: Path, metric: str = "accuracy") -> Path:
    """Validation accuracy (or `metric`: "macro-F1", the history's `f1`) per epoch, mean over seeds, one line per
    configuration, one panel per schedule.

    The configurations of a panel are spread a little around each whole epoch (deeper freeze to the right), so
    none hides another; each line carries its configuration's label as its gid."""
    with _style(), sns.axes_style("whitegrid"):
        figure = Figure(figsize=SIZE, layout="constrained")
        if history.empty:
            figure.text(0.5, 0.5, "no per-epoch history stored", ha="center", va="center", fontsize=24)
            return _save(figure, path)
        schedulers = sorted(history["scheduler"].unique())
        axes = figure.subplots(1, len(schedulers), squeeze=False, sharey=True)[0]
        column = "f1" if metric == "macro-F1" else "accuracy"
        mean = (history.groupby(["label", "freeze_depth", "scheduler", "epochs", "epoch"], as_index=False)
                [column].mean().rename(columns={column: "accuracy"}))
        depths = sorted(mean["freeze_depth"].unique())
        colours = _depth_colours(depths)
        trained = sorted(mean["epochs"].unique())
        styles = dict(zip(trained, LINESTYLES * 4))
        for i, (ax, scheduler) in enumerate(zip(axes, schedulers)):
            panel = mean[mean["scheduler"] == scheduler]
            configs = panel[["freeze_depth", "epochs", "label"]].drop_duplicates().sort_values(
                ["freeze_depth", "epochs", "label"])
            for offset, config in zip(_dodge(len(configs)), configs.itertuples(index=False)):
                line = panel[panel["label"] == config.label].sort_values("epoch")
                ax.plot(line["epoch"] + offset, PERCENT * line["accuracy"], marker="o", markersize=11,
                        linewidth=2.5, linestyle=styles[config.epochs], color=colours[config.freeze_depth],
                        markeredgecolor="white", markeredgewidth=1.0, gid=config.label)
            ax.set_title(f"schedule: {scheduler}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"validation {metric} (%)" if i == 0 else "")
            ax.set_xticks(sorted(mean["epoch"].unique()))  # whole epochs, also when there is only one
            ax.set_xlim(mean["epoch"].min() - 0.5, mean["epoch"].max() + 0.5)
        handles = [Line2D([], [], marker="o", linestyle="-", markersize=11, linewidth=2.5, color=colours[d],
                          label=f"{d}") for d in depths]
        legend = axes[-1].legend(handles=handles, title="freeze depth", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                                 frameon=False)
        if len(trained) > 1:
            axes[-1].add_artist(legend)  # a second legend() call would replace it
            handles = [Line2D([], [], color="0.35", linestyle=styles[e], linewidth=2.5, label=f"{e}") for e in trained]
            axes[-1].legend(handles=handles, title="epochs trained", loc="lower left", bbox_to_anchor=(1.02, 0.0),
                            frameon=False)
        figure.suptitle(f"Validation {metric} per epoch (mean over seeds)\n{_title(about)}", fontsize=19)
        return _save(figure, path)

