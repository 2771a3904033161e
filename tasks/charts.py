"""The report's charts, drawn with matplotlib and handed over as PNG bytes (inlined as data: URIs).

Every function takes plain numbers and names and returns PNG bytes; nothing here reads files.
Names (family names come from params.yaml) are drawn as text by matplotlib, never placed into
the HTML, so the page's autoescaping is not bypassed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

# matplotlib's tab10, then tab20's light shades: twenty distinct colours before any repeats
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
          "#7f7f7f", "#aec7e8", "#ff9896", "#98df8a", "#c5b0d5", "#ffbb78", "#c49c94", "#f7b6d2", "#9edae5",
          "#dbdb8d", "#c7c7c7"]
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3,
                     "figure.dpi": 100, "savefig.bbox": "tight"})


@dataclass
class Point:
    """A value with an optional 95% interval."""

    name: str
    value: float
    low: float | None = None
    high: float | None = None


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def _errors(points: list[Point]) -> list[list[float]]:
    return [[p.value - p.low if p.low is not None else 0.0 for p in points],
            [p.high - p.value if p.high is not None else 0.0 for p in points]]


def palette(names: list[str]) -> dict[str, str]:
    """One colour per name, the same in every chart of a report."""
    return {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}


def precision_recall(points: list[tuple[Point, Point]], real: tuple[float, float] | None,
                     colors: dict[str, str]) -> bytes:
    """Precision (y) against recall (x), one point per family with both intervals; the real-data point."""
    figure, axes = plt.subplots(figsize=(5.2, 4.2))
    for precision, recall in points:
        color = colors[precision.name]
        axes.errorbar([recall.value], [precision.value], xerr=_errors([recall]), yerr=_errors([precision]),
                      fmt="o", color=color, capsize=3, label=precision.name)
    if real is not None:
        axes.plot([real[1]], [real[0]], marker="*", markersize=14, color="black", linestyle="none",
                  label="real data (floor)")
    axes.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="recall (diversity) →", ylabel="precision (fidelity) →",
             title="Precision against recall (k-NN, 95% intervals)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)  # beside the plot: no point hidden
    return _png(figure)


def bars_with_intervals(points: list[Point], colors: dict[str, str], *, title: str, label: str,
                        floor: float | None = None, log_scale: bool = False) -> bytes:
    """Horizontal bars with 95% interval whiskers, the first point at the top; an optional floor line."""
    figure, axes = plt.subplots(figsize=(6.0, 0.45 * len(points) + 1.2))
    positions = list(range(len(points)))[::-1]
    axes.barh(positions, [p.value for p in points], xerr=_errors(points), capsize=3,
              color=[colors[p.name] for p in points], alpha=0.85)
    axes.set_yticks(positions, [p.name for p in points])
    if floor is not None:
        axes.axvline(floor, color="black", linestyle="--", linewidth=1, label=f"real data (floor) {floor:.3g}")
        axes.legend(loc="lower right", fontsize=8)
    if log_scale and all(p.value > 0 for p in points):
        axes.set_xscale("log")
    axes.set(xlabel=label, title=title)
    return _png(figure)


def curves(series: dict[str, list[tuple[float, float]]], colors: dict[str, str], *, title: str, xlabel: str,
           ylabel: str, log_y: bool = False) -> bytes:
    """One line per name through its (x, y) points."""
    figure, axes = plt.subplots(figsize=(6.0, 3.6))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o", markersize=3, color=colors[name], label=name)
    if log_y and all(y > 0 for points in series.values() for _, y in points):
        axes.set_yscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if series:
        axes.legend(fontsize=8, ncol=2 if len(series) > 4 else 1)
    return _png(figure)


def loss_curves(series: dict[str, list[tuple[float, float]]], title: str) -> bytes:
    """A family's loss terms against training step: one panel per term, each with its own y-axis."""
    names = [name for name, points in series.items() if points]
    columns = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    figure, grid = plt.subplots(rows, columns, figsize=(3.0 * columns, 2.3 * rows), squeeze=False)
    for axes, name, color in zip(grid.flat, names, COLORS):
        xs, ys = zip(*series[name])
        axes.plot(xs, ys, color=color, linewidth=1.2)
        axes.set(title=name, xlabel="step")
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for axes in list(grid.flat)[len(names):]:
        axes.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _png(figure)


def trend(title: str, panels: dict[str, list[Point]], flagged: set[str]) -> bytes:
    """Small multiples: one panel per metric, its value (with 95% interval) over the last runs, oldest
    first, the last point this run's; a panel in ``flagged`` draws that last point in red."""
    figure, grid = plt.subplots(1, len(panels), figsize=(2.25 * len(panels), 2.1), squeeze=False)
    for axes, (label, points) in zip(grid.flat, panels.items()):
        xs = list(range(len(points)))
        axes.errorbar(xs, [p.value for p in points], yerr=_errors(points), fmt="-o", markersize=3, capsize=2,
                      color=COLORS[0], linewidth=1)
        if label in flagged:
            axes.plot([xs[-1]], [points[-1].value], marker="o", markersize=7, color="#d62728", linestyle="none")
        axes.set_xticks(xs, [p.name for p in points], rotation=60, ha="right", fontsize=6)
        axes.set_title(label, fontsize=8, color="#d62728" if label in flagged else "black")
        axes.tick_params(axis="y", labelsize=7)
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _png(figure)
