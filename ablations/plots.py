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
from matplotlib.transforms import Bbox

SIZE = (16, 10)   # inches; at DPI this is 1920 x 1200 px
DPI = 120
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
PERCENT = 100
SCHEDULER_SHORT = {"linear": "lin", "cosine": "cos", "constant": "const", "constant_with_warmup": "const-w",
                   "cosine_with_restarts": "cos-r", "polynomial": "poly", "inverse_sqrt": "isqrt"}


def point_label(fields: dict, extra: list[str]) -> str:
    """Short point label such as 'd4 cos 2ep', plus any other field that varies."""
    scheduler = SCHEDULER_SHORT.get(str(fields.get("scheduler")), str(fields.get("scheduler")))
    parts = [f"d{fields.get('freeze_depth')}", scheduler, f"{fields.get('epochs')}ep"]
    names = {"learning_rate": "lr", "max_train_samples": "n", "device": ""}
    parts += [f"{names.get(name, name + '=')}{fields.get(name):g}" if isinstance(fields.get(name), float)
              else f"{names.get(name, name + '=')}{fields.get(name)}" for name in extra]
    return " ".join(parts)


def varying_fields(table: pd.DataFrame) -> list[str]:
    """Configuration fields beyond depth, schedule and epochs that differ between rows (e.g. learning_rate)."""
    candidates = table.columns[3:table.columns.get_loc("label")].drop("learning_rate_choice", errors="ignore")
    return [name for name in candidates if table[name].astype(str).nunique() > 1]


def _style():
    return sns.plotting_context("talk", font_scale=1.15, rc={"legend.title_fontsize": 17})


def _depth_colours(depths: list) -> dict:
    """Sequential palette, darker = deeper freeze; the palest end is cut so every colour reads on white."""
    palette = sns.color_palette("viridis_r", len(depths) + 1)[1:] if len(depths) > 1 else ["#31688e"]
    return dict(zip(depths, palette))


def _title(about: dict[str, str]) -> str:
    """Model, data and sizes on one line, the hardware on the next: a CPU's name alone can fill a line."""
    return (f"{about['model']} on {about['data']} · {about['train']} training examples · "
            f"{about['validation']} validation\n{about['device']}")


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path


def _label_offsets() -> list[tuple[float, float]]:
    """Candidate label offsets in points: rings of growing radius around the point, 16 directions each,
    starting up-right (where the eye expects a label)."""
    angles = [math.radians(30 + 22.5 * k) for k in range(16)]
    return [(radius * math.cos(a), radius * math.sin(a)) for radius in (12, 26, 44, 66, 92, 122) for a in angles]


def _place_labels(figure: Figure, ax, xs: list[float], ys: list[float], labels: list[str]) -> None:
    """Put each label where it overlaps no marker and no label placed so far: the nearest free place on rings
    around its point (a thin leader line when it is not next to it), else the place of least overlap.

    Runs after the layout is final (the layout engine is switched off here), since it measures in pixels."""
    figure.draw_without_rendering()
    figure.set_layout_engine("none")
    renderer = FigureCanvasAgg(figure).get_renderer()
    axes_box = ax.get_window_extent(renderer)
    points = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    taken = [Bbox.from_bounds(px - 10, py - 10, 20, 20) for px, py in points]

    def overlap(box: Bbox) -> float:
        area = sum(max(0.0, min(box.x1, o.x1) - max(box.x0, o.x0)) * max(0.0, min(box.y1, o.y1) - max(box.y0, o.y0))
                   for o in taken)
        inside = axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
        return area + (0.0 if inside else 1e9)

    for x, y, label in sorted(zip(xs, ys, labels), key=lambda point: -point[1]):
        best = None
        for dx, dy in _label_offsets():
            text = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=14,
                               ha="left" if dx > 3 else "right" if dx < -3 else "center",
                               va="bottom" if dy > 3 else "top" if dy < -3 else "center",
                               bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
            box = text.get_window_extent(renderer).expanded(1.02, 1.06)
            text.remove()
            cost = overlap(box)
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box)
            if cost == 0:
                break
        _, dx, dy, box = best
        leader = {"arrowstyle": "-", "color": "0.45", "lw": 0.9, "shrinkA": 0, "shrinkB": 6} \
            if math.hypot(dx, dy) > 20 else None
        ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=14,
                    ha="left" if dx > 3 else "right" if dx < -3 else "center",
                    va="bottom" if dy > 3 else "top" if dy < -3 else "center", arrowprops=leader,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8}, zorder=5)
        taken.append(box)


def tradeoff(table: pd.DataFrame, about: dict[str, str], path: Path) -> Path:
    """Accuracy (%) against training seconds with CI bars, the Pareto front as a step line, the baseline ringed."""
    depths = sorted(table["freeze_depth"].unique())
    schedulers = sorted(table["scheduler"].unique())
    colours = _depth_colours(depths)
    markers = dict(zip(schedulers, MARKERS * 2))
    with _style(), sns.axes_style("whitegrid"):
        figure = Figure(figsize=SIZE, layout="constrained")
        ax = figure.subplots()
        for row in table.itertuples(index=False):
            mean = PERCENT * row.accuracy_mean
            error = [[mean - PERCENT * row.accuracy_low], [PERCENT * row.accuracy_high - mean]]
            colour = colours[row.freeze_depth]
            ax.errorbar(row.train_seconds_mean, mean, yerr=None if pd.isna(row.accuracy_low) else error,
                        fmt=markers[row.scheduler], color=colour, ecolor=colour, elinewidth=2, capsize=5,
                        markersize=14, markeredgecolor="white", markeredgewidth=1.2, zorder=3)
            if row.baseline:
                ax.plot(row.train_seconds_mean, mean, "o", markersize=30, markerfacecolor="none",
                        markeredgecolor="crimson", markeredgewidth=3, zorder=4)
        front = table[table["pareto"]].sort_values("train_seconds_mean")
        ax.step(front["train_seconds_mean"], PERCENT * front["accuracy_mean"], where="post", color="0.3",
                linestyle="--", linewidth=2, zorder=2)
        ax.margins(x=0.12, y=0.12)
        ax.set_xlabel("training time (s, mean over seeds)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title("Accuracy vs training time (error bars: 95 % CI)", fontsize=20)
        figure.suptitle(_title(about), fontsize=19)
        handles = [Line2D([], [], marker="o", linestyle="", markersize=13, color=colours[d], label=f"{d}")
                   for d in depths]
        ax.add_artist(ax.legend(handles=handles, title="freeze depth", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                                frameon=False))
        handles = [Line2D([], [], marker=markers[s], linestyle="", markersize=13, color="0.35", label=s)
                   for s in schedulers]
        ax.add_artist(ax.legend(handles=handles, title="schedule", loc="center left", bbox_to_anchor=(1.01, 0.42),
                                frameon=False))
        handles = [Line2D([], [], color="0.3", linestyle="--", linewidth=2, label="Pareto front"),
                   Line2D([], [], marker="o", linestyle="", markersize=18, markerfacecolor="none",
                          markeredgecolor="crimson", markeredgewidth=3, label="baseline")]
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(1.01, 0.0), frameon=False)
        _place_labels(figure, ax, list(table["train_seconds_mean"]), list(PERCENT * table["accuracy_mean"]),
                      list(table["label"]))
        return _save(figure, path)


def heatmap(table: pd.DataFrame, about: dict[str, str], path: Path) -> Path:
    """Mean validation accuracy, freeze depth x schedule, one panel per epoch count (best over other fields)."""
    epochs = sorted(table["epochs"].unique())
    others = varying_fields(table)
    values = table.assign(accuracy=PERCENT * table["accuracy_mean"])
    low, high = values["accuracy"].min(), values["accuracy"].max()
    with _style():
        figure = Figure(figsize=(max(SIZE[0], 6.5 * len(epochs)), SIZE[1]), layout="constrained")
        axes = figure.subplots(1, len(epochs), squeeze=False, sharey=True)[0]
        for i, (ax, epoch_count) in enumerate(zip(axes, epochs)):
            grid = values[values["epochs"] == epoch_count].pivot_table(
                index="freeze_depth", columns="scheduler", values="accuracy", aggfunc="max")
            sns.heatmap(grid, ax=ax, annot=True, fmt=".1f", annot_kws={"fontsize": 18}, cmap="viridis",
                        vmin=low, vmax=high, linewidths=1, linecolor="white", cbar=i == len(epochs) - 1,
                        cbar_kws={"label": "validation accuracy (%)"})
            ax.set_title(f"{epoch_count} epoch{'s' if epoch_count != 1 else ''}")
            ax.set_xlabel("schedule")
            ax.set_ylabel("freeze depth" if i == 0 else "")
            ax.tick_params(axis="y", rotation=0)
        best = f" (best over {', '.join(others)})" if others else ""
        figure.suptitle(f"Mean validation accuracy over seeds{best}\n{_title(about)}", fontsize=19)
        return _save(figure, path)


def curves(history: pd.DataFrame, about: dict[str, str], path: Path) -> Path:
    """Validation accuracy per epoch, mean over seeds, one line per configuration, one panel per schedule."""
    with _style(), sns.axes_style("whitegrid"):
        figure = Figure(figsize=SIZE, layout="constrained")
        if history.empty:
            figure.text(0.5, 0.5, "no per-epoch history stored", ha="center", va="center", fontsize=24)
            return _save(figure, path)
        schedulers = sorted(history["scheduler"].unique())
        axes = figure.subplots(1, len(schedulers), squeeze=False, sharey=True)[0]
        mean = (history.groupby(["label", "freeze_depth", "scheduler", "epochs", "epoch"], as_index=False)
                ["accuracy"].mean())
        mean["accuracy"] *= PERCENT
        mean = mean.rename(columns={"freeze_depth": "freeze depth", "epochs": "epochs trained"})
        depths = sorted(mean["freeze depth"].unique())
        style = "epochs trained" if mean["epochs trained"].nunique() > 1 else None
        markers = {"markers": True} if style else {"marker": "o"}  # a marker per epoch either way
        for i, (ax, scheduler) in enumerate(zip(axes, schedulers)):
            sns.lineplot(mean[mean["scheduler"] == scheduler], x="epoch", y="accuracy", hue="freeze depth",
                         style=style, units="label", estimator=None, palette=_depth_colours(depths),
                         hue_order=depths, markersize=11, **markers, linewidth=2.5, ax=ax,
                         legend=i == len(schedulers) - 1)
            ax.set_title(f"schedule: {scheduler}")
            ax.set_ylabel("validation accuracy (%)" if i == 0 else "")
            ax.set_xticks(sorted(mean["epoch"].unique()))  # whole epochs, also when there is only one
        legend = axes[-1].get_legend()
        if legend is not None:
            sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        figure.suptitle(f"Validation accuracy per epoch (mean over seeds)\n{_title(about)}", fontsize=19)
        return _save(figure, path)


def lr_curves(points: pd.DataFrame, about: dict[str, str], path: Path) -> Path:
    """Dev accuracy against the learning rate (log scale) of every tuned cell, one line per depth, one panel per
    schedule; the rate each cell chose is ringed. How sensitive each depth is to the rate, at a glance."""
    points = points.assign(dev_accuracy=points["dev_accuracy"] * PERCENT).rename(
        columns={"freeze_depth": "freeze depth", "epochs": "epochs trained"})
    schedulers = sorted(points["scheduler"].unique())
    depths = sorted(points["freeze depth"].unique())
    style = "epochs trained" if points["epochs trained"].nunique() > 1 else None
    with _style(), sns.axes_style("whitegrid"):
        figure = Figure(figsize=SIZE, layout="constrained")
        axes = figure.subplots(1, len(schedulers), squeeze=False, sharey=True)[0]
        for i, (ax, scheduler) in enumerate(zip(axes, schedulers)):
            mine = points[points["scheduler"] == scheduler].sort_values("learning_rate")
            sns.lineplot(mine, x="learning_rate", y="dev_accuracy", hue="freeze depth", style=style,
                         units=style and "freeze depth", estimator=None, palette=_depth_colours(depths),
                         hue_order=depths, marker="o", markersize=10, linewidth=2.5, ax=ax,
                         legend=i == len(schedulers) - 1)
            chosen = mine[mine["chosen"]]
            ax.scatter(chosen["learning_rate"], chosen["dev_accuracy"], s=420, facecolors="none",
                       edgecolors="black", linewidths=2.5, zorder=5, label="_chosen")
            ax.set_xscale("log")
            ax.set_xticks(sorted(points["learning_rate"].unique()))
            ax.set_xticklabels([f"{rate:g}" for rate in sorted(points["learning_rate"].unique())])
            ax.set(title=f"schedule: {scheduler}", xlabel="learning rate (log scale)",
                   ylabel="dev accuracy (%)" if i == 0 else "")
        if axes[-1].get_legend() is not None:
            sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        figure.suptitle(f"Dev accuracy vs learning rate (first seed; ringed: the rate each cell chose)\n"
                        f"{_title(about)}", fontsize=19)
        return _save(figure, path)
