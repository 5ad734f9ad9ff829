"""Plotting helpers shared by the benchmark commands: a grid of line panels (times or
efficiencies against a size) and a column of horizontal bar panels (speed ratios per case).

matplotlib is optional (``pip install ringflash[bench]``); ``have_matplotlib()`` says
whether it is installed, and the commands skip their plots when it is not. Figures are
built with ``matplotlib.figure.Figure`` on an Agg canvas, not through ``pyplot``: no
display is needed, no global figure state builds up over a long benchmark, and the
process's matplotlib backend is left alone.

Every figure carries a title, axis labels with units, a legend shared by its panels (so an
implementation keeps its colour across panels) and a note naming the device and timer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

#: Colours (matplotlib's tab10) and markers, cycled over series in the order given, so
#: that series stay distinguishable in greyscale and beyond ten series.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (it is in the ``bench`` and ``test`` extras)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class LinePanel:
    """One panel of a line grid: ``series`` maps a label to its (x, y) points (points with
    y None are left out, so a line stops where a case was not measured); ``note`` is a small
    text in the panel's corner (for example which points are missing and why)."""

    title: str
    series: dict[str, list[tuple[float, Optional[float]]]] = field(default_factory=dict)
    note: str = ""


@dataclass
class BarPanel:
    """One panel of horizontal bars: one group of bars per category (a benchmark case), one
    bar per series in each group; a None value leaves its bar out."""

    title: str
    categories: list[str]
    series: dict[str, list[Optional[float]]]


#: Fixed margins in inches: title (two lines) above the panels, legend and x label below,
#: y tick labels and label to the left, and the gaps between panels. A fixed layout rather
#: than matplotlib's constrained layout, which measured every tick label again and took
#: ~2 s per figure on the CPU runners.
TOP_IN, BOTTOM_IN, LEFT_IN, RIGHT_IN = 0.85, 0.7, 0.85, 0.25
LEGEND_ROW_IN = 0.25


def _figure(n_rows: int, n_cols: int, panel_w: float, panel_h: float, legend_labels: Sequence[str],
            left_in: float = LEFT_IN, gap_w_in: float = 0.6, gap_h_in: float = 0.65):
    """(figure, axes[row][col], legend columns): the figure sized around fixed panel sizes,
    with room below for a legend of ``legend_labels`` in as many columns as fit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = left_in + RIGHT_IN + panel_w * n_cols + gap_w_in * (n_cols - 1)
    # A legend entry is about 0.07 in per character at 9 pt plus ~0.8 in of handle and padding.
    entry_in = 0.8 + 0.07 * max((len(label) for label in legend_labels), default=0)
    ncol = max(1, min(len(legend_labels), int((width - 0.2) // entry_in)))
    bottom_in = BOTTOM_IN + LEGEND_ROW_IN * math.ceil(len(legend_labels) / ncol)
    height = TOP_IN + bottom_in + panel_h * n_rows + gap_h_in * (n_rows - 1)
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fig.subplots_adjust(left=left_in / width, right=1 - RIGHT_IN / width, top=1 - TOP_IN / height,
                        bottom=bottom_in / height, wspace=gap_w_in / panel_w, hspace=gap_h_in / panel_h)
    return fig, axes, ncol


def _style(index: int) -> dict:
    return dict(color=COLORS[index % len(COLORS)], marker=MARKERS[index % len(MARKERS)])


def _size_label(x: float) -> str:
    """Compact tick labels for powers of two: 512, 1k, 64k, 1M."""
    x = int(round(x))
    if x >= 2**20 and x % 2**20 == 0:
        return f"{x // 2**20}M"
    if x >= 1024 and x % 1024 == 0:
        return f"{x // 1024}k"
    return str(x)


def _finish(fig, title: str, note: str, path: str, handles, labels, ncol: int) -> str:
    fig.suptitle(title, fontsize=12, y=1 - 0.12 / fig.get_figheight())
    if note:
        fig.text(0.5, 1 - 0.45 / fig.get_figheight(), note, ha="center", va="top", fontsize=8, color="0.25")
    if handles:
        # Anchored 0.08 in above the bottom edge (in inches, so that tall figures keep the
        # legend clear of the x labels).
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.08 / fig.get_figheight()), ncol=ncol,
                   fontsize=9, frameon=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def line_grid(
    path: str,
    panels: Sequence[Sequence[LinePanel]],
    title: str,
    xlabel: str,
    ylabel: str,
    note: str = "",
    series_order: Optional[Sequence[str]] = None,
    xlog2: bool = True,
    ylog: bool = True,
    hline: Optional[float] = None,
    hline_label: str = "",
    ylim: Optional[tuple[Optional[float], Optional[float]]] = None,
) -> str:
    """Draw ``panels`` (rows of panels) as one PNG at ``path`` and return the path.

    x is drawn on a log2 axis with the measured sizes as ticks (``xlog2``), y on a log10
    axis (``ylog``); ``hline`` draws a dashed reference line (speed-up 1, efficiency 100%).
    ``series_order`` fixes each series' colour and the legend order across panels.
    """
    from matplotlib.ticker import NullLocator

    n_rows, n_cols = len(panels), max(len(r) for r in panels)
    order = list(series_order or [])
    for row in panels:
        for panel in row:
            order += [label for label in panel.series if label not in order]
    fig, axes, ncol = _figure(n_rows, n_cols, 3.6 if n_cols > 1 else 6.0, 2.8,
                              order + ([hline_label] if hline_label else []))
    handles: dict[str, object] = {}
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i][j]
            if j >= len(panels[i]):
                ax.set_visible(False)
                continue
            panel = panels[i][j]
            xs_all: set[float] = set()
            plotted = False
            for label, points in panel.series.items():
                pts = sorted((x, y) for x, y in points if y is not None and (not ylog or y > 0))
                if not pts:
                    continue
                xs_all.update(x for x, _ in pts)
                (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, linewidth=1.5,
                                  markersize=4, **_style(order.index(label)))
                handles.setdefault(label, line)
                plotted = True
            if hline is not None and plotted:
                ax.axhline(hline, color="0.4", linestyle="--", linewidth=1)
            if xlog2 and xs_all:
                ax.set_xscale("log", base=2)
                ticks = sorted(xs_all)
                # At most ~6 labelled ticks so that the labels do not collide in narrow panels.
                step = max(1, math.ceil(len(ticks) / 6))
                ax.set_xticks(ticks[::step])
                ax.set_xticklabels([_size_label(t) for t in ticks[::step]])
                ax.xaxis.set_minor_locator(NullLocator())
            if ylog and plotted:
                ax.set_yscale("log")
            if ylim is not None:
                ax.set_ylim(*ylim)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(panel.title, fontsize=10)
            if i == n_rows - 1 or j >= len(panels[i + 1]):  # the lowest panel of its column
                ax.set_xlabel(xlabel, fontsize=9)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=9)
            if not plotted:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
            if panel.note:
                # A legend without entries is a text box that matplotlib places where it
                # hides the fewest points ("best").
                box = ax.legend(handles=[], title=panel.note, loc="best", title_fontsize=7, framealpha=0.8,
                                borderpad=0.3)
                box.get_title().set_color("0.3")
    labels = [label for label in order if label in handles]
    if hline is not None and hline_label:
        from matplotlib.lines import Line2D

        handles[hline_label] = Line2D([], [], color="0.4", linestyle="--", linewidth=1)
        labels.append(hline_label)
    return _finish(fig, title, note, path, [handles[lb] for lb in labels], labels, ncol)


def ratio_bars(
    path: str,
    panels: Sequence[BarPanel],
    title: str,
    xlabel: str,
    note: str = "",
    reference: float = 1.0,
    reference_label: str = "",
) -> str:
    """Horizontal grouped bars, one panel per entry of ``panels`` side by side, each bar
    labelled with its value; a dashed line marks ``reference`` (parity). Returns the path."""
    n_cats = max(len(p.categories) for p in panels)
    order: list[str] = []
    for p in panels:
        order += [s for s in p.series if s not in order]
    longest = max((len(c) for p in panels for c in p.categories), default=10)
    # Panels over the same cases name them once, left of the first panel.
    shared = all(p.categories == panels[0].categories for p in panels)
    names_in = 0.3 + 0.072 * longest  # about 0.07 in per character at 8 pt
    fig, axes, ncol = _figure(1, len(panels), 4.5, max(2.0, 0.2 * n_cats * max(1, len(order)) + 0.4),
                              order + ([reference_label] if reference_label else []),
                              left_in=names_in, gap_w_in=0.4 if shared else names_in)
    handles: dict[str, object] = {}
    height = 0.8 / max(1, len(order))
    for ax, panel in zip(axes[0], panels):
        y_base = list(range(len(panel.categories)))
        for label, values in panel.series.items():
            k = order.index(label)
            ys = [y + (k - (len(order) - 1) / 2) * height for y in y_base]
            kept = [(y, v) for y, v in zip(ys, values) if v is not None]
            if not kept:
                continue
            bars = ax.barh([y for y, _ in kept], [v for _, v in kept], height=height * 0.95,
                           color=COLORS[k % len(COLORS)], label=label)
            ax.bar_label(bars, labels=[f"{v:.2f}" for _, v in kept], fontsize=7, padding=2)
            handles.setdefault(label, bars)
        ax.axvline(reference, color="0.3", linestyle="--", linewidth=1)
        ax.set_yticks(y_base)
        ax.set_yticklabels(panel.categories, fontsize=8)
        if shared and ax is not axes[0][0]:
            ax.tick_params(labelleft=False)
        ax.set_ylim(len(panel.categories) - 0.5, -0.5)  # first case at the top, as in the tables; no empty rows
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_title(panel.title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.margins(x=0.15)
    labels = [s for s in order if s in handles]
    if reference_label:
        from matplotlib.lines import Line2D

        handles[reference_label] = Line2D([], [], color="0.3", linestyle="--", linewidth=1)
        labels.append(reference_label)
    return _finish(fig, title, note, path, [handles[s] for s in labels], labels, ncol)
