"""What a report's plots hold: small frozen dataclasses, no rendering and no I/O.

Every plot carries its title and its axes with their units; a plot with nothing to draw
carries ``empty``, the reason, which the page prints in its place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Series:
    """One line: ``ys[i]`` at ``xs[i]`` (``None``: no value there, the line breaks)."""

    name: str
    xs: tuple[float, ...]
    ys: tuple[float | None, ...]
    highlight: bool = False

    @property
    def points(self) -> int:
        return sum(y is not None for y in self.ys)


@dataclass(frozen=True)
class Band:
    """A shaded range between ``lo`` and ``hi`` at ``xs`` (peers' min..max)."""

    name: str
    xs: tuple[float, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]


@dataclass(frozen=True)
class LinePlot:
    """Lines over a shared x axis.

    Attributes:
        key: Stable id of the plot (``bandwidth``, ``timeline-wait``, ...).
        title: What it shows.
        x_label, y_label: Axis names with their units.
        series: The lines (a highlighted one is drawn on top, thicker).
        bands: Shaded ranges under the lines.
        marks: Vertical markers ``(x, label)`` (an onset, step boundaries).
        note: One line under the title (what was left out, how it was reduced).
        empty: Why there is nothing to draw (``None`` when there is).
    """

    key: str
    title: str
    x_label: str
    y_label: str
    series: tuple[Series, ...] = ()
    bands: tuple[Band, ...] = ()
    marks: tuple[tuple[float, str], ...] = ()
    note: str = ""
    empty: str | None = None

    @property
    def points(self) -> int:
        return sum(s.points for s in self.series) + sum(len(b.xs) for b in self.bands)


@dataclass(frozen=True)
class Grid:
    """A matrix of cells coloured by value (a heatmap).

    Attributes:
        key, title, note, empty: As :class:`LinePlot`.
        x_label, y_label: What the columns and rows are.
        unit: The values' unit, for the colour scale and the cells' tooltips.
        rows, cols: Labels.
        values: ``values[row][col]`` (``None``: nothing measured, drawn blank).
        low_is_bad: Colour low values hot (bandwidth) instead of high ones (lateness).
    """

    key: str
    title: str
    x_label: str
    y_label: str
    unit: str
    rows: tuple[str, ...] = ()
    cols: tuple[str, ...] = ()
    values: tuple[tuple[float | None, ...], ...] = ()
    low_is_bad: bool = False
    note: str = ""
    empty: str | None = None

    @property
    def points(self) -> int:
        return sum(v is not None for row in self.values for v in row)


Plot = LinePlot | Grid


def empty_line(key: str, title: str, x_label: str, y_label: str, why: str) -> LinePlot:
    return LinePlot(key, title, x_label, y_label, empty=why)


__all__ = ["Band", "Grid", "LinePlot", "Plot", "Series", "empty_line"]
