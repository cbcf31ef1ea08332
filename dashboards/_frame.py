"""What every ringwatch dashboard shares: its frame (tags, time, links between the dashboards,
read-only) and its variables, the data source first."""

from __future__ import annotations

from ringwatch.dashboards._panels import DATASOURCE_VAR, DS, Board, db, dm

TAG = "ringwatch"
#: uid of each dashboard, as links and provisioning name them.
UIDS = {"fleet": "ringwatch-fleet", "job": "ringwatch-job", "node": "ringwatch-node",
        "power": "ringwatch-power", "self": "ringwatch-self"}


def url(which: str, **var: str) -> str:
    """Link to one of the dashboards, keeping the time range; ``var`` sets its variables
    (values may be Grafana expressions such as ``${__data.fields.job}``)."""
    query = "".join(f"&var-{k}={v}" for k, v in var.items())
    return f"/d/{UIDS[which]}?${{__url_time_range}}{query}"


def datasource_var():
    return db.DatasourceVariable(DATASOURCE_VAR).label("Data source").type("prometheus") \
        .description("The Prometheus that scrapes the ringwatch agents and services.")


def label_var(name: str, label: str, query: str, *, multi: bool, description: str):
    """A variable over the values of ``label_values(...)``; multi-valued ones offer All
    (``.*``: queries match with ``=~``)."""
    v = (db.QueryVariable(name).label(label).description(description).datasource(DS)
         .query(query).refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
         .sort(dm.VariableSort.NATURAL_ASC))
    if multi:
        v = v.multi(True).include_all(True).all_value(".*")
    return v


def board(which: str, title: str, description: str, *variables) -> Board:
    """A read-only dashboard with the data source variable, ``variables``, and a menu of the
    other ringwatch dashboards (carrying the time range and the variables they share)."""
    b = (db.Dashboard(title).uid(UIDS[which]).description(description).tags([TAG])
         .readonly().time("now-1h", "now").refresh("30s").timezone("browser")
         .tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .with_variable(datasource_var()))
    for v in variables:
        b = b.with_variable(v)
    b = b.link(db.DashboardLink("ringwatch").type(dm.DashboardLinkType.DASHBOARDS).tags([TAG])
               .as_dropdown(True).include_vars(True).keep_time(True))
    return Board(b)
