"""The queries of a dashboard's JSON, and Grafana's substitution of its macros and variables.

Used by the tests (every query parses, names a declared series and returns data from a real
Prometheus) and by anyone who wants to run a dashboard's queries without Grafana.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One query of one panel."""

    dashboard: str  # uid
    panel: str  # title
    ref: str  # refId
    expr: str
    instant: bool

    def where(self) -> str:
        return f"{self.dashboard} / {self.panel!r} / {self.ref}"


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, those inside collapsed rows too; rows themselves are not panels."""
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            yield from p.get("panels", [])
        else:
            yield p


def targets(dashboard: dict) -> Iterator[Target]:
    for p in panels(dashboard):
        for t in p.get("targets", []):
            yield Target(dashboard["uid"], p.get("title", ""), t.get("refId", ""),
                         t.get("expr", ""), bool(t.get("instant")) and not t.get("range"))


def variable_queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """``(variable name, query)`` of each query variable."""
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            query = v.get("query")
            yield v["name"], query if isinstance(query, str) else query.get("query", "")


_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def label_values_selector(query: str) -> str:
    """The series selector of ``label_values(SELECTOR, label)``.

    Raises:
        ValueError: The query is not of that form.
    """
    m = _LABEL_VALUES.match(query.strip())
    if not m:
        raise ValueError(f"not label_values(selector, label): {query!r}")
    return m.group("selector")


def substitute(expr: str, variables: dict[str, str], *, rate_interval: str,
               interval: str | None = None, range_: str | None = None) -> str:
    """``expr`` as Grafana sends it: ``$__rate_interval``, ``$__interval``, ``$__range``
    and each ``$name``/``${name}`` of ``variables`` replaced (longest names first).

    Raises:
        KeyError: A ``$`` reference is left that nothing replaced.
    """
    out = expr.replace("$__rate_interval", rate_interval)
    out = out.replace("$__interval", interval or rate_interval)
    out = out.replace("$__range", range_ or rate_interval)
    for name in sorted(variables, key=len, reverse=True):
        out = out.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    if "$" in out:
        raise KeyError(f"unreplaced variable in {out!r}")
    return out
