"""Line charts for zk0's reports (the server's run directory, training loss curves, ...): one small module.

Every chart is a PNG with labeled axes, a title and a legend naming each series. Integer x values (rounds,
steps) are ticked at every value when there are few of them (at most `MAX_EXPLICIT_TICKS`) and at integer
positions otherwise. A NaN y value is a gap: the line breaks there and isolated points still show as markers (series
of up to `MAX_MARKED_POINTS` values are drawn with markers).
Several panels may share one x axis (`panel_chart`), e.g. an LR and a mu panel in their own units. Files are
written atomically (a temporary name, then rename) and figures are closed once saved; the Figure is returned
so that callers and tests can read what was drawn. Matplotlib runs on its Agg backend: no display needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot loads)
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

MAX_EXPLICIT_TICKS = 30  # up to this many distinct integer x values, every one gets a tick
MAX_MARKED_POINTS = 60  # longer series (training steps) are drawn as lines alone
PANEL_SIZE = (8.0, 3.2)  # inches per panel (width, height); saved at 100 dpi


@dataclass(frozen=True)
class Panel:
    """One y axis: named series over the chart's x values, with the axis label (quantity and unit)."""

    series: Mapping[str, Sequence[float | None]]
    ylabel: str
    logy: bool = False
    yformat: str | None = None  # a format spec for y tick labels, e.g. ".1e" for learning rates


def as_values(values: Sequence[float | None]) -> np.ndarray:
    """A series as float64 with None (and anything missing) as NaN, the gaps of the chart."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def integer_ticks(x: Sequence[float]) -> list[int] | None:
    """Every distinct x value as a tick when there are at most MAX_EXPLICIT_TICKS; None: let the locator choose."""
    values = sorted({int(v) for v in x})
    return values if len(values) <= MAX_EXPLICIT_TICKS else None


def _draw_panel(ax: plt.Axes, x: np.ndarray, panel: Panel) -> None:
    for name, values in panel.series.items():
        ys = as_values(values)
        if len(ys) != len(x):
            raise ValueError(f"series {name!r} has {len(ys)} values for {len(x)} x values")
        ax.plot(x, ys, marker="o" if len(x) <= MAX_MARKED_POINTS else None, markersize=3.5, linewidth=1.6,
                label=name)
    ax.set_ylabel(panel.ylabel)
    if panel.logy:
        ax.set_yscale("log")
    if panel.yformat:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos, spec=panel.yformat: format(value, spec)))
    ax.grid(True, alpha=0.3)
    if panel.series:
        ax.legend(fontsize="small", ncols=1 + len(panel.series) // 8, loc="best", framealpha=0.85)


def panel_chart(path: Path, x: Sequence[float], panels: Sequence[Panel], *, title: str, xlabel: str,
                integer_x: bool = True) -> Figure:
    """Panels stacked over one shared x axis, saved as a PNG at `path` (atomically); returns the (closed) Figure."""
    if not panels:
        raise ValueError("a chart needs at least one panel")
    xs = as_values(x)
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                             figsize=(PANEL_SIZE[0], PANEL_SIZE[1] * len(panels) + 0.6))
    try:
        for ax, panel in zip(axes[:, 0], panels):
            _draw_panel(ax, xs, panel)
        bottom = axes[-1, 0]
        bottom.set_xlabel(xlabel)
        if integer_x:
            ticks = integer_ticks(x)
            if ticks is None:
                bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
            else:
                bottom.set_xticks(ticks)
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(path)
    finally:
        plt.close(fig)
    return fig


def line_chart(path: Path, x: Sequence[float], series: Mapping[str, Sequence[float | None]], *, title: str,
               xlabel: str, ylabel: str, integer_x: bool = True, logy: bool = False) -> Figure:
    """One panel of named series over `x`, saved as a PNG at `path`; returns the (closed) Figure."""
    return panel_chart(path, x, [Panel(series, ylabel, logy)], title=title, xlabel=xlabel, integer_x=integer_x)

