"""Every figure is read back and checked against the table it was drawn from: tick labels, annotation texts, point
positions, bar lengths and legend entries. A figure that shows a wrong number must fail here."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from test_report import make_run

from ablations import plot_labels, plots, tuning_plots
from ablations.report import tradeoff_table

ABOUT = {"model": "m", "data": "d", "train": "2,000", "validation": "200", "device": "cpu"}


def drawn(monkeypatch, draw, *args):
    """The Figure a plot function saves, laid out as it would be written."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or path)
    draw(*args, ABOUT, Path("not-written.png"))
    figures[0].draw_without_rendering()
    return figures[0]


def lab(colour) -> np.ndarray:
    """CIE L*a*b* (D65) of an sRGB colour, for perceptual distances."""
    c = np.array(to_rgb(colour))
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    f = [t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116 for t in xyz / np.array([0.95047, 1.0, 1.08883])]
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_heatmap_labels_each_cell_with_its_own_depth_when_panels_hold_different_depths(monkeypatch):
    # 1 epoch ran depths 0, 2, 4; 2 epochs ran depths 1, 5, 6: the panels share one y axis.
    cells = [(depth, scheduler, 1) for depth in (0, 2, 4) for scheduler in ("cosine", "linear")]
    cells += [(depth, scheduler, 2) for depth in (1, 5, 6) for scheduler in ("cosine", "linear")]
    runs = [make_run(d, s, e, 42, 0.50 + 0.05 * d + (0.01 if s == "linear" else 0) + 0.002 * e, 60.0 - 5 * d,
                     number=i) for i, (d, s, e) in enumerate(cells)]
    table = tradeoff_table(runs)
    expected = {(str(r.freeze_depth), r.scheduler, r.epochs): f"{100 * r.accuracy_mean:.1f}"
                for r in table.itertuples()}
    figure = drawn(monkeypatch, plots.heatmap, table)
    seen = {}
    panels = [ax for ax in figure.axes if ax.get_title().endswith(("epoch", "epochs"))]
    # The row labels a reader sees are the left panel's; the panels share its y axis.
    first = panels[0]
    rows = {round(tick): label.get_text() for tick, label in zip(first.get_yticks() - 0.5, first.get_yticklabels())}
    assert sorted(rows.values(), key=int) == ["0", "1", "2", "4", "5", "6"]
    assert (first.get_ylabel(), first.get_xlabel()) == ("freeze depth", "schedule")  # the axes their ticks name
    for ax in panels:
        assert first.get_shared_y_axes().joined(first, ax)
        epochs = int(ax.get_title().split()[0])
        columns = {round(tick): label.get_text() for tick, label in zip(ax.get_xticks() - 0.5, ax.get_xticklabels())}
        for text in ax.texts:
            x, y = text.get_position()
            cell = (rows[round(y - 0.5)], columns[round(x - 0.5)], epochs)
            assert text.get_text() == expected.get(cell), f"{cell} shows {text.get_text()}"
            seen[cell] = text.get_text()
    assert seen == expected  # every cell shown once; a depth a panel did not run stays blank


def test_tradeoff_points_labels_and_legend_match_the_table(monkeypatch):
    runs = [make_run(d, s, 1, 42, 0.80 + 0.01 * d + (0.005 if s == "linear" else 0), 50.0 - 6 * d, number=i,
                     learning_rate=7.42921e-05 * (1 + d), warmup_ratio=0.16777 if d == 2 else 0.1)
            for i, (d, s) in enumerate(itertools.product(range(4), ("cosine", "linear")))]
    runs[2]["record"]["contended"] = True  # depth 1, cosine: timed while other processes loaded the machine
    table = tradeoff_table(runs)
    figure = drawn(monkeypatch, plots.tradeoff, table)
    ax = figure.axes[0]
    points = {(round(line.get_xdata()[0], 6), round(line.get_ydata()[0], 6)): line for line in ax.lines
              if len(line.get_xdata()) == 1 and line.get_marker() in plots.MARKERS
              and line.get_markerfacecolor() != "none"}
    assert len(points) == len(table)
    colour, marker = {}, {}
    for row in table.itertuples():
        point = points[(round(row.train_seconds, 6), round(100 * row.accuracy_mean, 6))]
        assert colour.setdefault(row.freeze_depth, point.get_color()) == point.get_color()
        assert marker.setdefault(row.scheduler, point.get_marker()) == point.get_marker()
    assert len(set(colour.values())) == len(colour) and len(set(marker.values())) == len(marker)
    labels = {text.get_text(): text.xy for text in ax.texts}
    # The table's marks ride on the labels: ★ Pareto-optimal (a front of one point draws no line), ⚠ contended.
    assert labels == {row.label + (" ★" if row.pareto else "") + (" ⚠" if row.contended is True else ""):
                      (row.train_seconds, 100 * row.accuracy_mean) for row in table.itertuples()}
    pareto = table[table["pareto"]]
    assert list(pareto["freeze_depth"]) == [3] and [t for t in labels if "★" in t] == [pareto["label"].iloc[0] + " ★"]
    assert [t for t in labels if "⚠" in t] == ["d1 cos 1ep lr 0.00015 warmup 0.1 ⚠"]
    assert "d2 lin 1ep lr 0.00022 warmup 0.17" in labels  # lr 0.000222876..., warmup 0.16777
    assert "d0 cos 1ep lr 7.4e-05 warmup 0.1" in labels
    legends = {legend.get_title().get_text(): legend for legend in [*ax.artists, ax.get_legend()]
               if hasattr(legend, "get_title")}
    depth_legend = legends["freeze depth"]
    assert [t.get_text() for t in depth_legend.get_texts()] == [str(d) for d in sorted(colour)]
    assert [h.get_color() for h in depth_legend.legend_handles] == [colour[d] for d in sorted(colour)]
    schedule_legend = legends["schedule"]
    assert {t.get_text(): h.get_marker() for t, h in zip(schedule_legend.get_texts(),
                                                          schedule_legend.legend_handles)} == marker
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Pareto front ★", "baseline", "⚠ timed under load"]
    assert ax.get_xlabel().replace("\n", " ") == plot_labels.time_axis_label(table)  # wrapped to the axes, not cut
    assert ax.get_ylabel() == "validation accuracy (%)"  # the held-out split the points are, not dev
    rings = [line for line in ax.lines if line.get_markerfacecolor() == "none"]
    assert sorted((line.get_xdata()[0], line.get_ydata()[0]) for line in rings) == sorted(
        (row.train_seconds, 100 * row.accuracy_mean) for row in table.itertuples() if row.baseline)


def test_curves_keep_two_configurations_at_one_point_apart(monkeypatch):
    # Two configurations with the same accuracy at the only epoch: both markers must be visible.
    history = pd.DataFrame([{"label": label, "freeze_depth": depth, "scheduler": "linear", "epochs": 1, "seed": seed,
                             "epoch": 1, "accuracy": accuracy}
                            for label, depth in (("d0 lin 1ep", 0), ("d1 lin 1ep", 1), ("d3 lin 1ep", 3))
                            for seed, accuracy in ((42, 0.80), (43, 0.82))])
    figure = drawn(monkeypatch, plots.curves, history)
    ax = figure.axes[0]
    lines = {line.get_gid(): line for line in ax.lines if line.get_gid()}
    assert set(lines) == set(history["label"])
    positions = []
    for label, line in lines.items():
        assert list(line.get_ydata()) == pytest.approx([81.0])  # mean over seeds, in %
        assert abs(line.get_xdata()[0] - 1) < 0.5  # still read as epoch 1
        positions.append(tuple(ax.transData.transform((line.get_xdata()[0], line.get_ydata()[0]))))
    closest = min(np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in itertools.combinations(positions, 2))
    assert closest > 2 * lines["d0 lin 1ep"].get_markersize()  # pixels apart: no marker hides another
    legend = ax.get_legend()
    assert legend.get_title().get_text() == "freeze depth"
    by_depth = {t.get_text(): h.get_color() for t, h in zip(legend.get_texts(), legend.legend_handles)}
    assert by_depth == {label.split()[0][1:]: line.get_color() for label, line in lines.items()}


def test_curves_of_several_epochs_join_each_configurations_mean_per_epoch(monkeypatch):
    history = pd.DataFrame([{"label": f"d{d} cos 2ep", "freeze_depth": d, "scheduler": "cosine", "epochs": 2,
                             "seed": seed, "epoch": epoch, "accuracy": 0.6 + 0.1 * epoch + 0.01 * seed + 0.05 * d}
                            for d in (0, 2) for seed in (0, 1) for epoch in (1, 2)])
    figure = drawn(monkeypatch, plots.curves, history)
    lines = {line.get_gid(): line for line in figure.axes[0].lines if line.get_gid()}
    for label, line in lines.items():
        depth = int(label.split()[0][1:])
        assert list(np.round(line.get_xdata())) == [1, 2]
        assert list(line.get_ydata()) == pytest.approx([100 * (0.6 + 0.1 * e + 0.005 + 0.05 * depth) for e in (1, 2)])


def test_importance_bars_match_the_importances(monkeypatch):
    parameters = ["freeze_depth", "scheduler", "learning_rate"]
    panels = {"validation accuracy": {"freeze_depth": 0.62, "learning_rate": 0.3, "scheduler": 0.08},
              "training seconds": "the same in every run: nothing to explain"}
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or path)
    tuning_plots.importance(panels, parameters, 9, Path("not-written.png"))
    figure = figures[0]
    figure.draw_without_rendering()
    left = figure.axes[0]  # the panels share its y axis and its parameter names
    names = {round(tick): label.get_text() for tick, label in zip(left.get_yticks(), left.get_yticklabels())}
    for ax, (objective, found) in zip(figure.axes, panels.items()):
        assert ax.get_title() == objective and left.get_shared_y_axes().joined(left, ax)
        bars = {names[round(bar.get_y() + bar.get_height() / 2)]: bar.get_width() for bar in ax.patches}
        wanted = found if isinstance(found, dict) else dict.fromkeys(parameters, 0.0)
        assert bars == pytest.approx(wanted)
        assert [t.get_text() for t in ax.texts] == ([] if isinstance(found, dict) else [found])
    assert "9 complete runs" in figure.get_suptitle()


@pytest.mark.parametrize("count", range(2, 14))
def test_depth_colours_tell_neighbours_apart_and_read_on_white(count):
    colours = [lab(c) for c in plots._depth_colours(list(range(count))).values()]
    neighbours = [np.linalg.norm(a - b) for a, b in zip(colours, colours[1:])]
    assert min(neighbours) >= 30  # CIE76 ΔE: clearly different side by side and in a legend
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)) >= 20
    assert max(c[0] for c in colours) <= 70  # L*: no pale marker vanishing on white


def test_point_labels_round_floats():
    fields = {"freeze_depth": 3, "scheduler": "cosine", "epochs": 2, "learning_rate": 7.42921e-05,
              "warmup_ratio": 0.16777, "max_train_samples": 2000}
    assert plot_labels.point_label(fields, ["learning_rate", "warmup_ratio", "max_train_samples"]) == \
        "d3 cos 2ep lr 7.4e-05 warmup 0.17 n 2000"


def test_the_time_axis_says_whether_its_times_were_taken_alone():
    import pandas as pd

    from ablations.plot_labels import time_axis_label
    nan = float("nan")
    timed = pd.DataFrame({"train_seconds_lo": [1.0, 2.0]})
    untimed = pd.DataFrame({"train_seconds_lo": [nan, nan], "timed_at": [None, None]})
    mixed = pd.DataFrame({"train_seconds_lo": [1.0, nan], "timed_at": ["2026-01-01T10:00:00Z", None]})
    assert time_axis_label(timed).startswith("training time alone")
    sitting = timed.assign(timed_at="2026-01-01T10:00:00Z", sitting=3)
    assert "from one sitting of 3 work shapes timed together" in time_axis_label(sitting)
    passes = timed.assign(timed_at=["2026-01-01T10:00:00Z", "2026-01-01T13:00:00Z"], sitting=1)
    assert "from 2 timing passes" in time_axis_label(passes)
    assert "not timed alone" in time_axis_label(untimed) and "alone (" not in time_axis_label(untimed)
    assert "1 of 2 timed alone; the others as they ran" in time_axis_label(mixed)
    # --timing-repeats 1: timed alone in one round, so no interval; it was labelled "not timed alone".
    once = sitting.assign(train_seconds_lo=nan)
    assert time_axis_label(once) == ("training time alone, from one sitting of 3 work shapes timed together "
                                     "(s; one timing round: no interval)")


def tuned_runs() -> list[dict]:
    """Depths 0 and 4, each tuned over two rates on its first seed (no dev split: validation chose), both choosing
    1e-4, so the rows' labels do not name the rate; the rejected 1e-3 scored far lower."""
    runs = []
    for depth, (chosen, rejected) in {0: ((0.90, 0.88), 0.50), 4: ((0.85, 0.83), 0.60)}.items():
        runs += [make_run(depth, "linear", 1, seed, accuracy, 30.0 - 5 * depth, learning_rate=1e-4)
                 for seed, accuracy in enumerate(chosen)]
        runs.append(make_run(depth, "linear", 1, 0, rejected, 30.0 - 5 * depth, learning_rate=1e-3))
    return [run | {"number": number} for number, run in enumerate(runs)]


def drawn_report(monkeypatch, runs, folder) -> dict:
    from ablations.report import write_report
    figures = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.setdefault(path.name, figure) and path)
    write_report(runs, folder)
    return figures


def test_curves_draw_the_tables_configurations_not_the_rates_a_cell_rejected(monkeypatch, tmp_path):
    runs = tuned_runs()
    table = tradeoff_table(runs)
    assert list(table["learning_rate"]) == [1e-4, 1e-4] and list(table["accuracy_mean"]) == [0.89, 0.84]
    ax = drawn_report(monkeypatch, runs, tmp_path)["curves.png"].axes[0]
    lines = {line.get_gid(): list(line.get_ydata()) for line in ax.lines if line.get_gid()}
    # The mean over the chosen rate's seeds, as the table says; the rejected rate's run was averaged in (76.0, 76.0).
    assert lines == {row.label: pytest.approx([100 * row.accuracy_mean]) for row in table.itertuples()}


def test_lr_curves_name_validation_where_the_runs_had_no_dev_split_and_keep_tick_labels_apart(monkeypatch,
                                                                                              tmp_path):
    runs = tuned_runs()  # no dev split: each rate was chosen on validation, and its points are validation's
    figure = drawn_report(monkeypatch, runs, tmp_path)["lr_curves.png"]
    ax = [ax for ax in figure.axes if ax.get_title()][0]
    assert ax.get_ylabel() == "validation accuracy (%)"
    assert figure._suptitle.get_text().startswith("Validation accuracy vs learning rate")
    rings = ax.collections[-1].get_offsets().tolist()
    assert sorted(map(tuple, rings)) == [(1e-4, 85.0), (1e-4, 90.0)]  # validation accuracy of the first seed
    assert [label.get_text() for label in ax.get_xticklabels()] == ["1e-4", "1e-3"]
    from ablations.tuning_plots import _rate_text
    assert [_rate_text(rate) for rate in (1e-5, 3e-5, 2.5e-4, 1e-2, 0.5)] == ["1e-5", "3e-5", "2.5e-4", "1e-2", "5e-1"]


def test_the_heatmap_says_best_over_a_field_only_where_one_cell_holds_several_values_of_it(monkeypatch):
    runs = [make_run(0, "linear", 1, 42, 0.9, 30.0, number=0, learning_rate=1e-4),
            make_run(4, "linear", 1, 42, 0.8, 20.0, number=1, learning_rate=1e-3)]
    figure = drawn(monkeypatch, plots.heatmap, tradeoff_table(runs))  # one row a cell, at its own rate
    assert figure._suptitle.get_text().startswith("Mean validation accuracy over seeds\n")
    runs.append(make_run(4, "linear", 1, 42, 0.7, 20.0, number=2, learning_rate=1e-3, warmup_ratio=0.2))
    figure = drawn(monkeypatch, plots.heatmap, tradeoff_table(runs))  # depth 4 holds two warmups: 80.0 shown
    assert figure._suptitle.get_text().startswith("Mean validation accuracy over seeds (best over warmup_ratio)\n")


def test_the_tradeoff_legend_names_a_baseline_only_where_one_is_drawn(monkeypatch):
    runs = [make_run(d, "linear", 1, 42, 0.8 + 0.01 * d, 30.0 - 5 * d, number=d) for d in (2, 4)]  # no depth 0
    table = tradeoff_table(runs)
    assert not table["baseline"].any()
    ax = drawn(monkeypatch, plots.tradeoff, table).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Pareto front ★"]
    assert not [line for line in ax.lines if line.get_markerfacecolor() == "none"]  # no ring drawn


def test_lr_curves_draw_one_line_per_cell_and_label_only_the_rates_tried(monkeypatch, tmp_path):
    # Depth 0 tuned twice over 1e-3 and 3e-3: once with warmup 0.1, once with 0.0 (two cells, one depth).
    runs = [make_run(0, "linear", 1, 42, accuracy, 30.0, number=i, learning_rate=rate, warmup_ratio=warmup)
            for i, (rate, warmup, accuracy) in enumerate([(1e-3, 0.1, 0.9), (3e-3, 0.1, 0.6),
                                                            (1e-3, 0.0, 0.6), (3e-3, 0.0, 0.9)])]
    ax = [ax for ax in drawn_report(monkeypatch, runs, tmp_path)["lr_curves.png"].axes if ax.get_title()][0]
    lines = sorted(tuple(line.get_ydata()) for line in ax.get_lines() if len(line.get_xdata()) == 2)
    assert lines == [(60.0, 90.0), (90.0, 60.0)]  # was one zigzag through all four points
    ax.figure.draw_without_rendering()
    shown = [label.get_text() for label in ax.get_xticklabels(minor=True) if label.get_text()]
    assert shown == []  # a minor tick read 2×10⁻³ between 1e-3 and 3e-3
    assert [label.get_text() for label in ax.get_xticklabels()] == ["1e-3", "3e-3"]
