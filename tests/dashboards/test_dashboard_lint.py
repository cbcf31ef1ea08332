"""Lint rules as tests, after Grafana's dashboard-linter: a templated Prometheus data source
every panel and target uses, $__rate_interval in every range, units, titles and descriptions,
legends, unique ids, no overlap on the grid. Each rule is also shown to catch a seeded
violation, so a rule that checks nothing would fail here."""

from __future__ import annotations

import copy
import re

import promql_parser
import pytest
from grafana_foundation_sdk.models import units

from ringwatch.dashboards import load_all
from ringwatch.dashboards._queries import panels, substitute

DASHBOARDS = load_all()
DS_UID = "${datasource}"
UNITS = {v for k, v in vars(units).items() if not k.startswith("_") and isinstance(v, str)}
MARK = "17s"  # what $__rate_interval becomes, so that every range can be found in the AST


def _variables(dash) -> dict[str, str]:
    return {v["name"]: ".*" for v in dash["templating"]["list"]}


def _ranges(expr: str, dash) -> list[str]:
    """The range of every range selector and subquery of ``expr``."""
    out = []

    def visit(node):
        if isinstance(node, promql_parser.MatrixSelector | promql_parser.SubqueryExpr):
            out.append(promql_parser.display_duration(node.range))

    promql_parser.walk(promql_parser.parse(substitute(expr, _variables(dash),
                                                      rate_interval=MARK)), visit)
    return out


def datasource_variable(dash) -> list[str]:
    found = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    if len(found) != 1 or found[0]["name"] != "datasource" or found[0]["query"] != "prometheus":
        return ["exactly one data source variable, `datasource`, of type prometheus"]
    return []


def datasource_used(dash) -> list[str]:
    bad = []
    for p in panels(dash):
        if p.get("datasource", {}).get("uid") != DS_UID:
            bad.append(f"panel {p['title']!r}")
        bad += [f"{p['title']!r} {t['refId']}" for t in p["targets"]
                if t.get("datasource", {}).get("uid") != DS_UID]
    bad += [f"variable {v['name']}" for v in dash["templating"]["list"]
            if v["type"] == "query" and v.get("datasource", {}).get("uid") != DS_UID]
    return bad


def rate_interval(dash) -> list[str]:
    return [f"{p['title']!r} {t['refId']}: {r}" for p in panels(dash) for t in p["targets"]
            for r in _ranges(t["expr"], dash) if r != MARK]


def no_overlap(dash) -> list[str]:
    boxes = [(p["title"], p["gridPos"]) for p in dash["panels"]]
    bad = [t for t, g in boxes if g["w"] <= 0 or g["h"] <= 0 or g["x"] < 0 or g["y"] < 0
           or g["x"] + g["w"] > 24]
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            if (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                    and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]):
                bad.append(f"{ta!r} overlaps {tb!r}")
    return bad


def units_set(dash) -> list[str]:
    return [p["title"] for p in panels(dash)
            if p["fieldConfig"]["defaults"].get("unit") not in UNITS]


def titled(dash) -> list[str]:
    return [str(p.get("id")) for p in dash["panels"] if not p.get("title", "").strip()] + [
        p["title"] for p in panels(dash) if not p.get("description", "").strip()]


def unique_ids(dash) -> list[str]:
    ids = [p.get("id") for p in dash["panels"]] + [
        p.get("id") for r in dash["panels"] if r["type"] == "row" for p in r.get("panels", [])]
    return [str(i) for i in ids if i is None or ids.count(i) > 1]


ANY = None  # every label of the series selected


def kept_labels(node) -> set[str] | None:
    """The labels the result of ``node`` keeps (``ANY``: those of the series it selects)."""
    pp = promql_parser
    if isinstance(node, pp.VectorSelector | pp.MatrixSelector):
        return ANY
    if isinstance(node, pp.NumberLiteral | pp.StringLiteral):
        return set()
    if isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
        return kept_labels(node.expr)
    if isinstance(node, pp.Call):
        vectors = [a for a in node.args if not isinstance(a, pp.NumberLiteral)]
        return kept_labels(vectors[0]) if vectors else set()
    if isinstance(node, pp.AggregateExpr):
        m = node.modifier
        if m is None:
            return set()
        return set(m.labels) if m.type == pp.AggModifierType.By else ANY
    if isinstance(node, pp.BinaryExpr):
        lhs, rhs = kept_labels(node.lhs), kept_labels(node.rhs)
        m = node.modifier
        if isinstance(node.lhs, pp.NumberLiteral):
            return rhs
        if m is not None and m.card == pp.VectorMatchCardinality.OneToMany:
            return rhs if rhs is ANY else rhs | set(m.matching.labels if m.matching else ())
        if m is not None and m.card == pp.VectorMatchCardinality.ManyToOne:
            return lhs if lhs is ANY else lhs | set(m.group_labels or ())
        return lhs
    raise TypeError(type(node))


def legends(dash) -> list[str]:
    """A series' name says what it is: no ``__auto`` legends, and every label a legend names
    is one its query keeps."""
    bad = []
    for p in panels(dash):
        if p["type"] == "table":
            continue
        for t in p["targets"]:
            legend = t.get("legendFormat", "")
            if not legend or legend == "__auto":
                bad.append(f"{p['title']!r} {t['refId']}")
            kept = kept_labels(promql_parser.parse(substitute(
                t["expr"], _variables(dash), rate_interval=MARK)))
            for label in re.findall(r"{{\s*(\w+)\s*}}", legend):
                if kept is not ANY and label not in kept:
                    bad.append(f"{p['title']!r} {t['refId']}: {label} not in {sorted(kept)}")
    return bad


def variables_used(dash) -> list[str]:
    exprs = " ".join(t["expr"] for p in panels(dash) for t in p["targets"])
    return [v["name"] for v in dash["templating"]["list"]
            if v["type"] == "query" and f"${v['name']}" not in exprs]


RULES = [datasource_variable, datasource_used, rate_interval, no_overlap, units_set, titled,
         unique_ids, legends, variables_used]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_rule(uid, rule):
    assert rule(DASHBOARDS[uid]) == []


def _first_query_panel(dash):
    return next(p for p in dash["panels"] if p["type"] != "row")


def _break(rule, dash):
    """``dash`` with one violation of ``rule`` seeded."""
    p = _first_query_panel(dash)
    t = p["targets"][0]
    if rule is datasource_variable:
        dash["templating"]["list"] = dash["templating"]["list"][1:]
    elif rule is datasource_used:
        t["datasource"] = {"type": "prometheus", "uid": "prom-1"}
    elif rule is rate_interval:
        t["expr"] = "rate(ringwatch_gpu_energy_joules_total[5m])"
    elif rule is no_overlap:
        dash["panels"][-1]["gridPos"] = dict(p["gridPos"])
    elif rule is units_set:
        p["fieldConfig"]["defaults"].pop("unit")
    elif rule is titled:
        p["description"] = " "
    elif rule is unique_ids:
        dash["panels"][-1]["id"] = p["id"]
    elif rule is legends:
        t["legendFormat"] = "{{nosuchlabel}}"
    elif rule is variables_used:
        dash["templating"]["list"].append({"type": "query", "name": "unused"})
    return dash


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_each_rule_catches_a_violation(rule):
    dash = copy.deepcopy(DASHBOARDS["ringwatch-node"])
    assert rule(dash) == []
    assert rule(_break(rule, dash)) != []
