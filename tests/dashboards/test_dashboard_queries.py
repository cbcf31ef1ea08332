"""Every query parses as PromQL once Grafana's macros and variables are substituted, and names
only series the agent's metric table or the central service export. Two aggregation rules are
read from the parsed queries: a GPU's device-wide field is reduced per physical GPU before
anything adds it up (MIG-safe), and nothing sums or averages the ranks away."""

from __future__ import annotations

import promql_parser
import pytest

from ringwatch._metrics import METRICS
from ringwatch.dashboards import load_all
from ringwatch.dashboards._queries import (
    label_values_selector,
    substitute,
    targets,
    variable_queries,
)
from ringwatch.service._api import SERVICE_METRICS

DASHBOARDS = load_all()
EXPORTED = {m.prom for m in METRICS if not m.otlp_only} | set(SERVICE_METRICS)
GPU_SERIES = {m.prom for m in METRICS if m.entity in ("gpu", "nvlink")}
RANK_SERIES = {m.prom for m in METRICS if m.entity.startswith("rank") and not m.otlp_only}
GRAFANA = {"rate_interval": "1m", "interval": "15s", "range_": "1h"}
ALL = [t for d in DASHBOARDS.values() for t in targets(d)]


def _parse(expr: str, dash_uid: str):
    variables = {v["name"]: "host0|host1" for v in DASHBOARDS[dash_uid]["templating"]["list"]}
    return promql_parser.parse(substitute(expr, variables, **GRAFANA))


def _selectors(node) -> list:
    out = []

    def visit(n):
        if isinstance(n, promql_parser.VectorSelector):
            out.append(n)

    promql_parser.walk(node, visit)
    return out


def test_there_are_queries_to_check():
    assert len(ALL) > 60
    assert {t.dashboard for t in ALL} == set(DASHBOARDS)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.where())
def test_query_parses_and_names_exported_series(t):
    names = {s.name for s in _selectors(_parse(t.expr, t.dashboard))}
    assert names, "no series at all"
    assert names <= EXPORTED, names - EXPORTED


def test_variable_queries_name_exported_series():
    seen = 0
    for uid, dash in DASHBOARDS.items():
        for name, query in variable_queries(dash):
            sel = _parse(label_values_selector(query), uid)
            assert {s.name for s in _selectors(sel)} <= EXPORTED, (uid, name, query)
            seen += 1
    assert seen >= 5


def test_an_unknown_series_would_be_caught():
    names = {s.name for s in _selectors(_parse(
        "rate(ringwatch_gpu_energy_joules_total[$__rate_interval]) / ringwatch_gpu_watts",
        "ringwatch-node"))}
    assert names - EXPORTED == {"ringwatch_gpu_watts"}


def _aggregations_over(node, wanted: set[str]) -> list[tuple[str, tuple, bool]]:
    """``(op, by labels, nearest)`` for each aggregation above a selector of ``wanted``;
    ``nearest`` marks the innermost one over it."""
    found, stack = [], []

    def pre(n):
        if isinstance(n, promql_parser.AggregateExpr):
            stack.append(n)
        elif isinstance(n, promql_parser.VectorSelector) and n.name in wanted:
            for i, agg in enumerate(stack):
                m = agg.modifier
                labels = tuple(m.labels) if m and m.type == promql_parser.AggModifierType.By \
                    else ()
                found.append((str(agg.op), labels, i == len(stack) - 1))

    def post(n):
        if isinstance(n, promql_parser.AggregateExpr):
            stack.pop()

    promql_parser.walk(node, pre, post)
    return found


def mig_unsafe(expr: str, uid: str) -> list[str]:
    """GPU selectors whose innermost aggregation is not ``max by`` host, gpu and uuid."""
    node = _parse(expr, uid)
    gpu_selectors = [s for s in _selectors(node) if s.name in GPU_SERIES]
    inner = [(op, labels) for op, labels, nearest in _aggregations_over(node, GPU_SERIES)
             if nearest]
    bad = [f"{op} by {labels}" for op, labels in inner
           if op != "max" or not {"host", "gpu", "uuid"} <= set(labels)]
    if len(inner) < len(gpu_selectors):
        bad.append("a GPU series used without reducing it per GPU")
    return bad


def ranks_erased(expr: str, uid: str) -> list[str]:
    """Aggregations that add up or average rank series without keeping the rank."""
    return [f"{op} by {labels}" for op, labels, _ in
            _aggregations_over(_parse(expr, uid), RANK_SERIES)
            if op in ("sum", "avg") and "rank" not in labels]


@pytest.mark.parametrize("t", [t for t in ALL if GPU_SERIES & set(t.expr.replace("(", " ")
                                                                   .replace("{", " ").split())],
                         ids=lambda t: t.where())
def test_gpu_fields_are_reduced_per_gpu_first(t):
    assert mig_unsafe(t.expr, t.dashboard) == []


def test_no_query_averages_or_sums_the_ranks_away():
    for t in ALL:
        assert ranks_erased(t.expr, t.dashboard) == [], t.where()
        assert "avg" not in t.expr, t.where()


def test_the_aggregation_rules_catch_violations():
    power = "ringwatch_gpu_power_watts{host=~\"$host\"}"
    assert mig_unsafe(f"sum by (host) ({power})", "ringwatch-node")
    assert mig_unsafe(power, "ringwatch-node")
    assert mig_unsafe(f"sum by (host) (max by (host, uuid) ({power}))", "ringwatch-node")
    assert mig_unsafe(f"sum by (host) (max by (host, gpu, uuid) ({power}))",
                      "ringwatch-node") == []
    busy = "rate(ringwatch_collective_seconds_total{job=~\"$job\"}[$__rate_interval])"
    assert ranks_erased(f"avg by (job) ({busy})", "ringwatch-job")
    assert ranks_erased(f"sum by (job, pg) ({busy})", "ringwatch-job")
    assert ranks_erased(f"max by (job) (sum by (job, rank) ({busy}))", "ringwatch-job") == []
