"""Charts for zk0's reports (the server's run directory, training loss curves, ...): one small module.

Every chart is a PNG with labeled axes, a title and a legend naming each series. Integer x values (rounds,
steps) are ticked at every value when there are few of them (at most `MAX_EXPLICIT_TICKS`) and at integer
positions otherwise. A NaN y value is a gap: the line breaks there and isolated points still show as markers
(series of up to `MAX_MARKED_POINTS` values are drawn with markers). Several panels may share one x axis
(`panel_chart`), e.g. an LR and a mu panel in their own units; estimates with intervals per named group are
points with error bars (`interval_chart`). Files are
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
        _save(fig, path)
    finally:
        plt.close(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)


def line_chart(path: Path, x: Sequence[float], series: Mapping[str, Sequence[float | None]], *, title: str,
               xlabel: str, ylabel: str, integer_x: bool = True, logy: bool = False) -> Figure:
    """One panel of named series over `x`, saved as a PNG at `path`; returns the (closed) Figure."""
    return panel_chart(path, x, [Panel(series, ylabel, logy)], title=title, xlabel=xlabel, integer_x=integer_x)



def interval_chart(path: Path, groups: Sequence[str], series: Mapping[str, Sequence[tuple[float | None, float, float]]],
                   *, title: str, ylabel: str, ylim: tuple[float, float] = (0.0, 1.0),
                   labels: Mapping[str, Sequence[str]] | None = None) -> Figure:
    """Estimates with intervals, (value, low, high) per group and series: one point with error bars per
    series, side by side within each named group (e.g. success rate per task and policy), optionally with a
    text label beside each point (e.g. "7/10"). A None value is left out. `ylim` is padded a little so points
    on its ends stay visible. Saved as a PNG at `path` (atomically); returns the (closed) Figure."""
    if not series:
        raise ValueError("a chart needs at least one series")
    fig, ax = plt.subplots(figsize=(max(PANEL_SIZE[0], 1.6 * len(groups) + 2.0), PANEL_SIZE[1] + 1.2))
    try:
        positions = np.arange(len(groups), dtype=np.float64)
        spread = 0.6 / len(series)
        for index, (name, estimates) in enumerate(series.items()):
            if len(estimates) != len(groups):
                raise ValueError(f"series {name!r} has {len(estimates)} estimates for {len(groups)} groups")
            values = as_values([e[0] for e in estimates])
            low, high = as_values([e[1] for e in estimates]), as_values([e[2] for e in estimates])
            x = positions + (index - (len(series) - 1) / 2) * spread
            ax.errorbar(x, values, yerr=np.abs(np.vstack([values - low, high - values])), fmt="o",
                        markersize=5, capsize=4, linewidth=1.6, label=name)
            for xi, yi, text in zip(x, values, (labels or {}).get(name, ()), strict=False):
                if np.isfinite(yi):
                    ax.annotate(text, (xi, yi), xytext=(5, 3), textcoords="offset points", fontsize="small")
        ax.set_xticks(positions, list(groups))
        pad = 0.03 * (ylim[1] - ylim[0])
        ax.set_ylim(ylim[0] - pad, ylim[1] + pad)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="best", framealpha=0.85)
        fig.suptitle(title)
        _save(fig, path)
    finally:
        plt.close(fig)
    return fig
