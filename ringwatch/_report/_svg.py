"""Plots as inline SVG, written out by hand: no library, no script, nothing fetched.

Each plot is a ``<figure class="plot">`` holding its title, a note, the SVG (axes with tick
labels and unit-bearing names, the data, a legend) and ``data-points``: how many values it
draws. Data marks carry classes a checker can count in a browser: ``polyline.series``
(one vertex per value), ``polygon.band`` (two vertices per value), ``rect.cell`` (one per
value). A plot without data shows its reason instead (``data-empty``).
"""

from __future__ import annotations

import math
from html import escape

from ringwatch._report._model import Grid, LinePlot

W, H = 760, 300
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 14, 46
PALETTE = ("#4e79a7", "#59a14f", "#9c755f", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#bab0ac", "#f28e2b", "#8cd17d", "#86bcb6", "#d4a6c8")
HOT = "#d62728"
#: Cells beyond which a heatmap's cells carry no tooltip (file size).
MAX_TOOLTIPS = 6000


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]``."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[0] > lo:
        ticks.insert(0, round(ticks[0] - step, 10))
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4:
        return f"{v:.3g}" if a >= 1e6 else f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _figure(plot, body: str, legend: str = "") -> str:
    note = f'<p class="note">{escape(plot.note)}</p>' if plot.note else ""
    return (f'<figure class="plot" id="plot-{escape(plot.key)}" data-plot="{escape(plot.key)}"'
            f' data-points="{plot.points}"><figcaption>{escape(plot.title)}</figcaption>'
            f"{note}{body}{legend}</figure>")


def _empty(plot) -> str:
    return (f'<figure class="plot empty" id="plot-{escape(plot.key)}" '
            f'data-plot="{escape(plot.key)}" data-points="0" data-empty="{escape(plot.empty)}">'
            f"<figcaption>{escape(plot.title)}</figcaption>"
            f'<p class="why">Nothing to draw: {escape(plot.empty)}.</p></figure>')


def _axis_labels(x_label: str, y_label: str) -> str:
    cx, cy = LEFT + (W - LEFT - RIGHT) / 2, TOP + (H - TOP - BOTTOM) / 2
    return (f'<text class="axis-name" x="{cx:.0f}" y="{H - 6}" text-anchor="middle">'
            f"{escape(x_label)}</text>"
            f'<text class="axis-name" x="14" y="{cy:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {cy:.0f})">{escape(y_label)}</text>')


def render(plot) -> str:
    """One plot as an HTML ``<figure>``."""
    if plot.empty is not None or plot.points == 0:
        if plot.empty is None:
            from dataclasses import replace

            plot = replace(plot, empty="no value to draw")
        return _empty(plot)
    return render_grid(plot) if isinstance(plot, Grid) else render_lines(plot)


def render_lines(p: LinePlot) -> str:
    xs = [x for s in p.series for x, y in zip(s.xs, s.ys, strict=True) if y is not None]
    xs += [x for b in p.bands for x in b.xs] + [x for x, _ in p.marks]
    ys = [y for s in p.series for y in s.ys if y is not None]
    ys += [v for b in p.bands for v in (*b.lo, *b.hi)]
    y_lo = min(0.0, min(ys))
    xt, yt = nice_ticks(min(xs), max(xs), 8), nice_ticks(y_lo, max(ys) * 1.05 or 1.0, 5)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float) -> float:
        return TOP + ph - (y - y0) / ((y1 - y0) or 1) * ph

    out = [f'<svg viewBox="0 0 {W} {H}" role="img" '
           f'xmlns="http://www.w3.org/2000/svg">']
    for t in yt:
        out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{py(t):.1f}" '
                   f'y2="{py(t):.1f}"/><text class="tick" x="{LEFT - 6}" y="{py(t) + 4:.1f}" '
                   f'text-anchor="end">{fmt(t)}</text>')
    for t in xt:
        out.append(f'<line class="tickmark" x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{TOP + ph}" '
                   f'y2="{TOP + ph + 4}"/><text class="tick" x="{px(t):.1f}" '
                   f'y="{TOP + ph + 17}" text-anchor="middle">{fmt(t)}</text>')
    out.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/>')
    for b in p.bands:
        pts = [(px(x), py(v)) for x, v in zip(b.xs, b.lo, strict=True)]
        pts += [(px(x), py(v)) for x, v in reversed(list(zip(b.xs, b.hi, strict=True)))]
        out.append(f'<polygon class="band" points="{_pts(pts)}"><title>{escape(b.name)}'
                   f"</title></polygon>")
    for x, label in p.marks:
        out.append(f'<line class="mark" x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{TOP}" '
                   f'y2="{TOP + ph}"><title>{escape(label)}</title></line>')
    legend = []
    colours = iter(PALETTE * (1 + len(p.series) // len(PALETTE)))
    ordered = sorted(p.series, key=lambda s: s.highlight)  # highlighted on top
    for s in ordered:
        colour = HOT if s.highlight else next(colours)
        width = 2.6 if s.highlight else 1.5
        for run in _runs(s.xs, s.ys):
            pts = [(px(x), py(y)) for x, y in run]
            tip = f"{s.name}: " + ", ".join(f"{fmt(x)} → {fmt(y)}" for x, y in run[:40])
            out.append(f'<polyline class="series" fill="none" stroke="{colour}" '
                       f'stroke-width="{width}" points="{_pts(pts)}"><title>{escape(tip)}'
                       f"</title></polyline>")
            if len(run) == 1:
                out.append(f'<circle class="dot" cx="{pts[0][0]:.1f}" cy="{pts[0][1]:.1f}" '
                           f'r="2.5" fill="{colour}"/>')
        legend.append((s.name, colour, s.highlight))
    if p.bands:
        legend.append((p.bands[0].name, "band", False))
    if p.marks:
        legend.append((p.marks[0][1] if len(p.marks) == 1 else "step markers", "mark", False))
    out.append(_axis_labels(p.x_label, p.y_label))
    out.append("</svg>")
    return _figure(p, "".join(out), _legend(legend))


def _runs(xs, ys) -> list[list[tuple[float, float]]]:
    """Consecutive non-null points (a null breaks the line)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(xs, ys, strict=True):
        if y is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, y))
    return [r for r in runs if r]


def _pts(pts) -> str:
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)


def _legend(items) -> str:
    out = ['<ul class="legend">']
    for name, colour, hot in items:
        if colour == "band":
            swatch = '<span class="swatch band"></span>'
        elif colour == "mark":
            swatch = '<span class="swatch mark"></span>'
        else:
            swatch = f'<span class="swatch" style="background:{colour}"></span>'
        out.append(f'<li{" class=hot" if hot else ""}>{swatch}{escape(name)}</li>')
    return "".join(out) + "</ul>"


def colour(t: float, low_is_bad: bool) -> str:
    """Cell colour for ``t`` in 0..1 (0: cold). Lateness: white to dark red; bandwidth
    (``low_is_bad``): red for the lowest, through white, to blue for the highest."""
    t = min(1.0, max(0.0, t))
    if low_is_bad:
        stops = ((0.0, (214, 39, 40)), (0.5, (247, 247, 247)), (1.0, (33, 102, 172)))
    else:
        stops = ((0.0, (247, 247, 247)), (0.5, (253, 174, 97)), (1.0, (165, 0, 38)))
    for (a, ca), (b, cb) in zip(stops, stops[1:], strict=False):
        if t <= b:
            f = (t - a) / (b - a)
            r, g, bl = (round(x + (y - x) * f) for x, y in zip(ca, cb, strict=True))
            return f"#{r:02x}{g:02x}{bl:02x}"
    return "#000000"


def render_grid(g: Grid) -> str:
    values = [v for row in g.values for v in row if v is not None]
    lo = 0.0 if not g.low_is_bad else min(values)
    hi = max(values) if max(values) > lo else lo + 1.0
    label_w = max(LEFT, 30 + 7 * max(len(r) for r in g.rows))
    n_rows, n_cols = len(g.rows), len(g.cols)
    cell_h = max(3.0, min(28.0, 360 / n_rows))
    pw = W - label_w - RIGHT
    cell_w = pw / n_cols
    ph = cell_h * n_rows
    h = TOP + ph + BOTTOM + 30
    out = [f'<svg viewBox="0 0 {W} {h:.0f}" role="img" '
           f'xmlns="http://www.w3.org/2000/svg">']
    tips = len(values) <= MAX_TOOLTIPS
    for i, row in enumerate(g.values):
        y = TOP + i * cell_h
        for j, v in enumerate(row):
            if v is None:
                continue
            fill = colour((v - lo) / (hi - lo), g.low_is_bad)
            tip = (f"<title>{escape(g.y_label)} {escape(g.rows[i])}, {escape(g.x_label)} "
                   f"{escape(g.cols[j])}: {fmt(v)} {escape(g.unit)}</title>") if tips else ""
            out.append(f'<rect class="cell" x="{label_w + j * cell_w:.2f}" y="{y:.2f}" '
                       f'width="{cell_w + 0.3:.2f}" height="{cell_h + 0.3:.2f}" '
                       f'fill="{fill}">{tip}</rect>')
    row_every = max(1, math.ceil(n_rows / 30))
    for i in range(0, n_rows, row_every):
        out.append(f'<text class="tick" x="{label_w - 6}" y="{TOP + (i + 0.5) * cell_h + 4:.1f}"'
                   f' text-anchor="end">{escape(g.rows[i])}</text>')
    # a label every so many columns, so that neighbours do not overlap (~6.5 px a character)
    widest = 6.5 * max(len(c) for c in g.cols) + 10
    col_every = max(1, math.ceil(widest / cell_w), math.ceil(n_cols / 16))
    for j in range(0, n_cols, col_every):
        out.append(f'<text class="tick" x="{label_w + (j + 0.5) * cell_w:.1f}" '
                   f'y="{TOP + ph + 15:.1f}" text-anchor="middle">{escape(g.cols[j])}</text>')
    out.append(f'<rect class="frame" x="{label_w}" y="{TOP}" width="{pw:.1f}" '
               f'height="{ph:.1f}"/>')
    cx, cy = label_w + pw / 2, TOP + ph / 2
    out.append(f'<text class="axis-name" x="{cx:.0f}" y="{TOP + ph + 34:.0f}" '
               f'text-anchor="middle">{escape(g.x_label)}</text><text class="axis-name" '
               f'x="12" y="{cy:.0f}" text-anchor="middle" transform="rotate(-90 12 {cy:.0f})">'
               f"{escape(g.y_label)}</text>")
    out.append(_scale(g, lo, hi, TOP + ph + 42))
    out.append("</svg>")
    return _figure(g, "".join(out))


def _scale(g: Grid, lo: float, hi: float, y: float) -> str:
    """The colour scale: a strip of swatches from ``lo`` to ``hi`` with their values."""
    x, width, n = W - RIGHT - 260, 200, 20
    out = [f'<text class="tick" x="{x - 8}" y="{y + 9:.0f}" text-anchor="end">'
           f"{fmt(lo)} {escape(g.unit)}</text>"]
    for k in range(n):
        out.append(f'<rect class="scale" x="{x + k * width / n:.1f}" y="{y:.0f}" '
                   f'width="{width / n + 0.5:.1f}" height="10" '
                   f'fill="{colour(k / (n - 1), g.low_is_bad)}"/>')
    out.append(f'<text class="tick" x="{x + width + 8}" y="{y + 9:.0f}">{fmt(hi)} '
               f"{escape(g.unit)}</text>")
    return "".join(out)


__all__ = ["colour", "nice_ticks", "render", "render_grid", "render_lines"]
