"""Where each point's label goes on a scatter plot: the nearest place, on rings around its point, that overlaps no
marker and no label placed before it (`place_labels`, the trade-off figure's point labels)."""
from __future__ import annotations

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox


def _label_offsets() -> list[tuple[float, float]]:
    """Candidate label offsets in points: rings of growing radius around the point, 16 directions each,
    starting up-right (where the eye expects a label)."""
    angles = [math.radians(30 + 22.5 * k) for k in range(16)]
    return [(radius * math.cos(a), radius * math.sin(a)) for radius in (12, 26, 44, 66, 92, 122) for a in angles]


def place_labels(figure: Figure, ax, xs: list[float], ys: list[float], labels: list[str]) -> None:
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
