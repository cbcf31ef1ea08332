"""OpenTelemetry export of the node sidecar: the metric table's points pushed over OTLP/HTTP.

The points are turned into the SDK's own data model (``MetricsData``) and handed to the
official ``OTLPMetricExporter``, which encodes the protobuf and posts it. The SDK's instruments
and aggregation are not used: the agent already holds cumulative counters and latest gauges,
and building the batch directly lets every entity be its own OpenTelemetry *resource* (one per
GPU with its uuid and rank, one per rank, one for the host), all in one request per interval.

Nothing is queued: an export that fails is counted (``ringwatch_agent_errors_total``) and the
next interval sends the then-current values, so a collector that is down costs no memory and
counters lose nothing (they are cumulative).

The SDK logs every failed try (``Transient error ... retrying``, ``Failed to export``): with a
collector down for hours that is a warning every few seconds. :class:`OncePerPeriod` lets one
through per ``EXPORT_LOG_PERIOD_S``, saying how many it held back; the agent's own counter has
every failure.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from ringwatch._metrics import COUNTER, POINT_LABELS, RESOURCE_LABELS
from ringwatch._version import __version__
from ringwatch.agent.sidecar._node_state import NodeState
from ringwatch.agent.sidecar._points import (
    EARLY_PUSH_STEPS,
    Point,
    collect_points,
    unsent_steps,
)

log = logging.getLogger("ringwatch.agent")

#: Data points per request at most: a push of more goes as several requests, each rank's
#: points whole in one of them (the service's limit is 16 MiB a request, ~100 bytes a point).
MAX_POINTS_PER_REQUEST = 20_000
#: Least time (s) between two pushes when steps are waiting (:meth:`OtlpPusher.due`).
EARLY_PUSH_GAP_S = 1.0
#: A push is due up to this share of its interval early (the export thread's ticks are one
#: period apart, give or take a few ms: without it, every other tick would miss).
DUE_SLACK = 0.1
#: Least time (s) between two of the SDK's export messages the agent lets through.
EXPORT_LOG_PERIOD_S = 300.0
#: The logger the SDK's OTLP/HTTP metric exporter (and its transport) write to.
SDK_EXPORT_LOGGER = "opentelemetry.exporter.otlp.proto.http.metric_exporter"


class OncePerPeriod(logging.Filter):
    """Passes one record per ``period_s`` (by the records' own times); the next one passed
    says how many were held back since the last."""

    def __init__(self, period_s: float):
        super().__init__()
        self.period_s = period_s
        self.held = 0
        self._last_s: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self._last_s is not None and record.created - self._last_s < self.period_s:
            self.held += 1
            return False
        if self.held:
            record.msg = (f"{record.msg} (and {self.held} more export message(s) in the "
                          f"{record.created - self._last_s:.0f} s before it, held back)")
        self._last_s, self.held = record.created, 0
        return True


def quiet_sdk_export_logs(period_s: float = EXPORT_LOG_PERIOD_S) -> OncePerPeriod:
    """Put one :class:`OncePerPeriod` on the SDK's exporter logger (once per process)."""
    sdk = logging.getLogger(SDK_EXPORT_LOGGER)
    for f in sdk.filters:
        if isinstance(f, OncePerPeriod):
            return f
    f = OncePerPeriod(period_s)
    sdk.addFilter(f)
    return f


def _resource_attributes(resource, *, source: str) -> dict:
    attrs = {"service.name": "ringwatch-agent", "service.version": __version__}
    for key, value in resource:
        if value != "":
            attrs[RESOURCE_LABELS[key]] = int(value) if key in ("gpu", "rank") else value
    if any(k == "gpu" for k, _ in resource):
        attrs["ringwatch.source"] = source
        attrs["ringwatch.replayed"] = source.startswith("replay")
    return attrs


def request_batches(points: list[Point], limit: int | None = None) -> list[list[Point]]:
    """``points`` cut into requests of at most ``limit`` points (default
    :data:`MAX_POINTS_PER_REQUEST`) where they can be, every resource's points in one request
    (one with more than ``limit`` goes alone)."""
    limit = MAX_POINTS_PER_REQUEST if limit is None else limit
    by_resource: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        by_resource[p.resource].append(p)
    out: list[list[Point]] = []
    for pts in by_resource.values():
        if out and len(out[-1]) + len(pts) <= limit:
            out[-1].extend(pts)
        else:
            out.append(list(pts))
    return out


def metrics_data(points: list[Point], *, start_ns: int, now_ns: int, source: str = "nvml"):
    """The SDK's ``MetricsData`` of ``points``: one ResourceMetrics per resource."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    scope = InstrumentationScope("ringwatch.agent", __version__)
    by_resource: dict[tuple, dict[str, list[Point]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        by_resource[p.resource][p.spec.otel].append(p)
    out = []
    for resource, metrics in by_resource.items():
        otel_metrics = []
        for name, pts in metrics.items():
            spec = pts[0].spec
            dps = [NumberDataPoint(
                attributes={POINT_LABELS[k]: v for k, v in p.labels if v != ""},
                start_time_unix_nano=start_ns if spec.kind == COUNTER else 0,
                time_unix_nano=now_ns, value=p.value) for p in pts]
            data = (Sum(dps, AggregationTemporality.CUMULATIVE, True) if spec.kind == COUNTER
                    else Gauge(dps))
            otel_metrics.append(Metric(name, spec.help, spec.unit, data))
        out.append(ResourceMetrics(
            Resource(_resource_attributes(resource, source=source)),
            [ScopeMetrics(scope, otel_metrics, "")], ""))
    return MetricsData(out)


class OtlpPusher:
    """Pushes the node's points to an OTLP/HTTP endpoint.

    Args:
        state: The node's state.
        endpoint: Full URL of the metrics path, e.g. ``http://collector:4318/v1/metrics``.
        headers: Extra HTTP headers (an ``Authorization`` bearer token, say).
        timeout_s: Per-request limit, seconds.
        start_ns: Wall clock (ns) the agent's counters started from.
        max_backoff_s: After failed pushes, wait up to this long (doubling from one
            interval) before the next try: a dead collector costs the node almost nothing.
    """

    def __init__(self, state: NodeState, endpoint: str, *, headers: dict | None = None,
                 timeout_s: float = 5.0, start_ns: int, max_backoff_s: float = 8.0):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        quiet_sdk_export_logs()
        self.state = state
        self.start_ns = start_ns
        self.timeout_s = timeout_s
        self.exporter = OTLPMetricExporter(endpoint=endpoint, headers=headers or {},
                                           timeout=timeout_s)
        self.sent = 0
        self.failures = 0  # in a row
        self.max_backoff_ns = int(max_backoff_s * 1e9)
        self._next_try_ns = 0
        self._last_try_ns: int | None = None
        #: (job, rank) -> newest step of collective totals delivered, (job, rank, "work") ->
        #: newest step of blocked time: each step goes out until a push carrying it succeeds,
        #: then never again.
        self.steps_sent: dict[tuple, int] = {}

    def due(self, now_ns: int, interval_ns: int) -> bool:
        """Whether to push now: ``interval_ns`` after the last try, or sooner (at least
        :data:`EARLY_PUSH_GAP_S` after it) when a rank has :data:`EARLY_PUSH_STEPS` finished
        steps waiting; never while backing off after failures. A job of fast steps is so
        pushed as often as it needs, and each push carries every step it has not sent."""
        if now_ns < self._next_try_ns:
            return False
        if self._last_try_ns is None:
            return True
        # a tenth early counts: the caller's ticks come one period apart, give or take
        since = (now_ns - self._last_try_ns) / (1 - DUE_SLACK)
        if since >= interval_ns:
            return True
        return since >= EARLY_PUSH_GAP_S * 1e9 and unsent_steps(
            self.state, self.steps_sent) >= EARLY_PUSH_STEPS

    def push(self, now_ns: int, *, interval_ns: int = 0) -> bool:
        """One export (as several requests when it has over :data:`MAX_POINTS_PER_REQUEST`
        points); False (and counted) when a request failed or the push was held back after
        failures (``interval_ns``: the caller's period, the first back-off step). The steps a
        request delivered are not sent again. Never raises."""
        if now_ns < self._next_try_ns:
            self.state.count_error("otlp_backoff")
            return False
        self._last_try_ns = now_ns
        try:
            points = collect_points(self.state, now_wall_ns=now_ns, steps_after=self.steps_sent)
            ok = all(self._export(batch, now_ns) for batch in request_batches(points))
        except Exception as exc:  # noqa: BLE001 - the exporter never takes the agent down
            log.debug("OTLP export failed: %s", exc)
            ok = False
        if ok:
            self.sent += 1
            self.failures = 0
        else:
            self.failures += 1
            wait = min(self.max_backoff_ns, interval_ns * (2 ** (self.failures - 1)))
            self._next_try_ns = now_ns + wait
            self.state.count_error("otlp_export")
        return ok

    def _export(self, points: list[Point], now_ns: int) -> bool:
        """One request; on success, the steps it carried count as delivered."""
        from opentelemetry.sdk.metrics.export import MetricExportResult

        data = metrics_data(points, start_ns=self.start_ns, now_ns=now_ns,
                            source=self.state.source)
        if self.exporter.export(data, timeout_millis=self.timeout_s * 1000) \
                != MetricExportResult.SUCCESS:
            return False
        for p in points:
            if p.spec.entity in ("rank_step", "rank_work"):
                res, lab = dict(p.resource), dict(p.labels)
                key = (res["job"], int(res["rank"]))
                if p.spec.entity == "rank_work":
                    key += ("work",)
                self.steps_sent[key] = max(int(lab["step"]), self.steps_sent.get(key, -1))
        return True

    def close(self) -> None:
        try:
            self.exporter.shutdown()
        except Exception:  # shutting down a broken exporter: nothing more to do
            log.debug("OTLP exporter shutdown failed", exc_info=True)
