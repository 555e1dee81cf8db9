"""Where each point's label goes on a scatter plot: the nearest place, on rings around its point, that overlaps no
marker, error bar or label placed before it and, without a leader line, is clearly nearer its own point than any
other (`place_labels`, the trade-off figure's point labels).

A reader takes a label without a line for the label of the point nearest it, so such a label must be clearly
nearest its own: every other point at least `CLEAR` times as far from the label as its own, and `SLACK` points
more. A label farther than `LEADER_BEYOND` from its point gets a line to it — long enough to be seen (a line of a
few pixels under a marker's edge says nothing)."""
from __future__ import annotations

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

LEADER_BEYOND = 14  # points between a label's box and its point beyond which a thin leader line joins them
CLEAR, SLACK = 1.5, 6  # without a line: every other point >= CLEAR x the own point's distance + SLACK points
BAR_WIDTH = 4  # pixels: an error bar's width, as an obstacle a label should not cover


def _label_offsets() -> list[tuple[float, float]]:
    """Candidate label offsets in points: rings of growing radius around the point, 16 directions each,
    starting up-right (where the eye expects a label)."""
    angles = [math.radians(30 + 22.5 * k) for k in range(16)]
    return [(radius * math.cos(a), radius * math.sin(a)) for radius in (12, 26, 44, 66, 92, 122) for a in angles]


def place_labels(figure: Figure, ax, xs: list[float], ys: list[float], labels: list[str],
                 bars: list[tuple[tuple[float, float], tuple[float, float]]] = ()) -> None:
    """Put each label where it overlaps no marker, no error bar (`bars`: segments in data coordinates) and no label
    placed so far, clearly nearer its own point than any other: the nearest such place on rings around its point
    (a thin leader line when it is not next to it), else the place of least overlap — but never, without a leader
    line, where another point is about as near (a reader would take it for that point's label).

    Runs after the layout is final (the layout engine is switched off here), since it measures in pixels."""
    figure.draw_without_rendering()
    figure.set_layout_engine("none")
    renderer = FigureCanvasAgg(figure).get_renderer()
    pixels = figure.dpi / 72  # per point
    axes_box = ax.get_window_extent(renderer)
    points = [ax.transData.transform((x, y)) for x, y in zip(xs, ys)]
    taken = [Bbox.from_bounds(px - 10, py - 10, 20, 20) for px, py in points]
    for start, end in bars:
        (x0, y0), (x1, y1) = ax.transData.transform(start), ax.transData.transform(end)
        taken.append(Bbox.from_extents(min(x0, x1) - BAR_WIDTH / 2, min(y0, y1) - BAR_WIDTH / 2,
                                       max(x0, x1) + BAR_WIDTH / 2, max(y0, y1) + BAR_WIDTH / 2))

    def overlap(box: Bbox) -> tuple[bool, float]:
        """(whether the box leaves the axes, the area it shares with markers, bars and labels placed so far)."""
        area = sum(max(0.0, min(box.x1, o.x1) - max(box.x0, o.x0)) * max(0.0, min(box.y1, o.y1) - max(box.y0, o.y0))
                   for o in taken)
        inside = axes_box.x0 <= box.x0 and box.x1 <= axes_box.x1 and axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
        return not inside, area

    def gap(box: Bbox, px: float, py: float) -> float:
        return math.hypot(max(box.x0 - px, 0.0, px - box.x1), max(box.y0 - py, 0.0, py - box.y1))

    def others(box: Bbox, own: int) -> list[float]:
        return [gap(box, px, py) for i, (px, py) in enumerate(points) if i != own]

    for own in sorted(range(len(labels)), key=lambda i: -ys[i]):
        x, y, label = xs[own], ys[own], labels[own]
        best = None
        for dx, dy in _label_offsets():
            text = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=14,
                               ha="left" if dx > 3 else "right" if dx < -3 else "center",
                               va="bottom" if dy > 3 else "top" if dy < -3 else "center",
                               bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
            box = text.get_window_extent(renderer).expanded(1.02, 1.06)
            text.remove()
            # In this order: inside the axes; without a leader line, clearly nearer its own point than any other (a
            # reader takes the nearest point for the label's: a mislabel is worse than a clash); no overlap; and
            # with a leader line, preferably nearer its own point too.
            outside, area = overlap(box)
            mine, theirs = gap(box, *points[own]), others(box, own)
            led = mine > LEADER_BEYOND * pixels
            unclear = any(other < CLEAR * mine + SLACK * pixels for other in theirs)
            cost = (outside, not led and unclear, area, led and any(other < mine for other in theirs))
            if best is None or cost < best[0]:
                best = (cost, dx, dy, box, led)
            if not any(cost):
                break
        _, dx, dy, box, led = best
        leader = {"arrowstyle": "-", "color": "0.35", "lw": 1.1, "shrinkA": 0, "shrinkB": 5} if led else None
        ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=14,
                    ha="left" if dx > 3 else "right" if dx < -3 else "center",
                    va="bottom" if dy > 3 else "top" if dy < -3 else "center", arrowprops=leader,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8}, zorder=5)
        taken.append(box)
