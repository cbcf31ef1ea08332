"""Prometheus ``/metrics`` of the node sidecar, generated from the metric table.

A custom collector (``prometheus_client``'s 4-line protocol) turns the points of
:func:`ringwatch.agent.sidecar._points.collect_points` into metric families at each scrape;
nothing is registered globally: the agent's entry point builds the registry and passes it here.
"""

from __future__ import annotations

from collections import defaultdict

from ringwatch._metrics import COUNTER
from ringwatch.agent.sidecar._node_state import NodeState
from ringwatch.agent.sidecar._points import collect_points


class NodeCollector:
    """``prometheus_client`` collector over a :class:`NodeState`."""

    def __init__(self, state: NodeState):
        self.state = state

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        by_name: dict[str, list] = defaultdict(list)
        for p in collect_points(self.state):
            if not p.spec.otlp_only:
                by_name[p.spec.prom].append(p)
        for name, points in sorted(by_name.items()):
            spec = points[0].spec
            keys = sorted({k for p in points for k, _ in (*p.resource, *p.labels)})
            if spec.kind == COUNTER:
                fam = CounterMetricFamily(name.removesuffix("_total"), spec.help, labels=keys)
            else:
                fam = GaugeMetricFamily(name, spec.help, labels=keys)
            seen = set()
            for p in points:
                lab = dict(p.resource + p.labels)
                values = tuple(lab.get(k, "") for k in keys)
                if values in seen:  # one series once, whatever two readings say
                    continue
                seen.add(values)
                fam.add_metric(list(values), p.value)
            yield fam


def build_registry(state: NodeState):
    """A fresh ``CollectorRegistry`` holding the node's collector and nothing else."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(state))
    return registry


def serve_metrics(registry, listen: str):
    """Serve ``/metrics`` on ``HOST:PORT`` (loopback when no host is named) in a daemon
    thread; returns ``(server, thread)``.

    Raises:
        ConfigError: ``listen`` is not ``HOST:PORT``.
        OSError: The address cannot be bound (start-up fails with one line).
    """
    from prometheus_client import start_http_server

    from ringwatch._net import parse_listen

    host, port = parse_listen(listen)
    return start_http_server(port, addr=host, registry=registry)


def exposition(registry) -> str:
    """The text a scrape would get."""
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()
