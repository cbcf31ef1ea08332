"""Panels, queries and the grid, as every ringwatch dashboard builds them.

Every panel and every query points at the ``$datasource`` variable; every panel has a title,
a description and a unit; legends name hosts (and GPUs, ranks) as the series carry them.
:class:`Board` hands out panel ids and places panels left to right, 24 columns wide, so no two
overlap.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # The SDK steers new code to its v2 dashboard schema, which only Grafana 12+ with the
    # kubernetesDashboards feature serves; the classic (v1) model provisions and uploads
    # everywhere, and is what these dashboards use.
    warnings.simplefilter("ignore", DeprecationWarning)
    from grafana_foundation_sdk.builders import (
        bargauge,
        heatmap,
        prometheus,
        stat,
        statetimeline,
        table,
        timeseries,
    )
    from grafana_foundation_sdk.builders import common as cb
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as dm
    from grafana_foundation_sdk.models import heatmap as hm
    from grafana_foundation_sdk.models import prometheus as pm

DATASOURCE_VAR = "datasource"
DS = common.DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VAR}}}")
GRID_W = 24


def q(expr: str, legend: str = "", *, instant: bool = False) -> prometheus.Dataquery:
    """A Prometheus query on ``$datasource``: a range query, or an instant one (tables,
    bar gauges) returned as a table."""
    b = prometheus.Dataquery().expr(expr).datasource(DS).legend_format(legend or "__auto")
    if instant:
        b = b.instant().format(pm.PromQueryFormat.TABLE)
    else:
        b = b.range()
    return b


def _common(b, title: str, description: str, unit: str, targets):
    b = b.title(title).description(description).unit(unit).datasource(DS)
    for i, t in enumerate(targets):
        b = b.with_target(t.ref_id(chr(ord("A") + i)))
    return b


def _legend(calcs=("mean", "max")):
    return (cb.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM).calcs(list(calcs)))


def timeseries_panel(title: str, description: str, unit: str, *targets, min_val=None,
                     bars: bool = False, stack: bool = False, dashed: str | None = None,
                     calcs=("mean", "max")):
    """A time series. ``dashed``: a regex of series names drawn dashed (limits)."""
    b = _common(timeseries.Panel(), title, description, unit, targets).legend(_legend(calcs))
    b = b.tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                  .sort(common.SortOrder.DESCENDING))
    if min_val is not None:
        b = b.min(min_val)
    if bars:
        b = b.draw_style(common.GraphDrawStyle.BARS).fill_opacity(60)
    if stack:
        b = b.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(30)
    if dashed:
        b = b.override_by_regexp(dashed, [dm.DynamicConfigValue(
            id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})])
    return b


def stat_panel(title: str, description: str, unit: str, *targets, red_from: float | None = None):
    """A big number per series (the last value); red from ``red_from`` on when given."""
    b = _common(stat.Panel(), title, description, unit, targets)
    b = b.reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    b = b.graph_mode(common.BigValueGraphMode.AREA).color_mode(common.BigValueColorMode.VALUE)
    steps = [dm.Threshold(value=None, color="green")]
    if red_from is not None:
        steps.append(dm.Threshold(value=red_from, color="red"))
    return b.thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps))


def _link(title: str, url: str) -> dict:
    return {"title": title, "url": url}


def table_panel(title: str, description: str, unit: str, *targets, columns: dict[str, str],
                links: dict[str, tuple[str, str]] | None = None,
                units: dict[str, str] | None = None):
    """Instant queries merged into one row per label set. ``columns`` renames fields (the
    ``Value #A`` of query A, or a label) and shows only those, in that order; ``links`` puts
    a data link (title, url) on a column, ``units`` a unit (both by the shown name)."""
    b = _common(table.Panel(), title, description, unit, targets)
    order = {name: i for i, name in enumerate(columns)}
    b = b.with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
    b = b.with_transformation(dm.DataTransformerConfig(id_val="organize", options={
        "excludeByName": {}, "includeByName": {name: True for name in columns},
        "indexByName": order, "renameByName": dict(columns)}))
    for field, (link_title, url) in (links or {}).items():
        b = b.override_by_name(field, [dm.DynamicConfigValue(
            id_val="links", value=[_link(link_title, url)])])
    for field, field_unit in (units or {}).items():
        b = b.override_by_name(field, [dm.DynamicConfigValue(id_val="unit", value=field_unit)])
    return b


def heatmap_panel(title: str, description: str, unit: str, *targets):
    """Each series is a row (no bucketing): rank x time, coloured by value."""
    b = _common(heatmap.Panel(), title, description, unit, targets)
    b = b.calculate(False).rows_frame(heatmap.RowsHeatmapOptions().layout(
        common.HeatmapCellLayout.UNKNOWN))
    b = b.color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME)
                .scheme("Oranges").fill("dark-orange").scale(hm.HeatmapColorScale.EXPONENTIAL)
                .exponent(0.5).steps(64).reverse(False))
    return b.y_axis(heatmap.YAxisConfig().unit("none").axis_placement(common.AxisPlacement.LEFT))


def timeline_panel(title: str, description: str, *targets, states: dict[int, tuple[str, str]]):
    """A state timeline: each series a row; ``states`` maps a value to (text, colour)."""
    b = _common(statetimeline.Panel(), title, description, "none", targets)
    b = b.mappings([dm.ValueMap(options={str(v): dm.ValueMappingResult(text=t, color=c)
                                         for v, (t, c) in states.items()})])
    b = b.show_value(common.VisibilityMode.NEVER).merge_values(True).row_height(0.8)
    return b.legend(cb.VizLegendOptions().show_legend(True).display_mode(
        common.LegendDisplayMode.LIST).placement(common.LegendPlacement.BOTTOM))


def bargauge_panel(title: str, description: str, unit: str, *targets):
    """One bar per series (the last value), highest first."""
    b = _common(bargauge.Panel(), title, description, unit, targets)
    b = b.reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    return b.orientation(common.VizOrientation.HORIZONTAL).display_mode(
        common.BarGaugeDisplayMode.GRADIENT)


class Board:
    """A dashboard being laid out: ids in order, panels placed left to right in rows."""

    def __init__(self, builder):
        self.builder = builder
        self._id = 0
        self._x = self._y = self._row_h = 0

    def _next_id(self) -> int:
        self._id += 1
        return self._id

    def _newline(self) -> None:
        self._y += self._row_h
        self._x = self._row_h = 0

    def row(self, title: str) -> Board:
        """A section header across the grid."""
        self._newline()
        self.builder = self.builder.with_row(
            db.Row(title).id(self._next_id()).grid_pos(dm.GridPos(h=1, w=GRID_W, x=0,
                                                                  y=self._y)))
        self._y += 1
        return self

    def add(self, panel, w: int = 12, h: int = 8) -> Board:
        """Places ``panel`` (w columns of 24, h rows) after the previous one."""
        if self._x + w > GRID_W:
            self._newline()
        panel = panel.id(self._next_id()).grid_pos(dm.GridPos(h=h, w=w, x=self._x, y=self._y))
        self.builder = self.builder.with_panel(panel)
        self._x += w
        self._row_h = max(self._row_h, h)
        return self

    def build(self):
        return self.builder.build()
