"""The service's HTTP face: ``/metrics`` and the JSON API.

* ``GET /metrics``: findings as Prometheus series (suspects per rank and host, what-if gains)
  and the service's own health (ingest, drops, refusals, analysis lag).
* ``GET /api/v1/findings[?job=J&state=open|resolved]``, ``GET /api/v1/jobs``,
  ``GET /api/v1/history[?job=J]``.
* ``GET|POST /api/v1/control``: detectors on/off and thresholds, without a restart
  (``{"pause": ["straggler"], "resume": [...], "thresholds": {"min_stall_s": 8}}``).
* ``POST /api/v1/findings/<id>/resolve``: an operator closes a finding; answered once the
  change is written to the state folder.
* ``GET /healthz``: liveness, always open.

Authentication: changes (POST) need ``Authorization: Bearer <token>`` when the service has a
token. With read authentication on (``auth_reads``, or a read token given), every GET but
``/healthz`` needs the token or the read token (which allows reads only); 401 otherwise.

Limits (shared with the OTLP/HTTP receiver, see ``_http``): at most ``max_connections``
connections at once (503 past it), ``read_timeout_s`` per request (408), a request body of at
most 1 MiB (413 before it is read; a negative or non-numeric length is a 400).
"""

from __future__ import annotations

import json

from ringwatch.service._http import (
    BoundedHandler,
    BoundedServer,
    Counters,
    RequestError,
    bearer_ok,
    serve_in_thread,
)

MAX_BODY_BYTES = 1 << 20
JSON = "application/json"

#: The service's own series: name, type, help.
SERVICE_METRICS = {
    "ringwatch_finding_open": ("gauge", "1 for each open finding."),
    "ringwatch_straggler_suspect": ("gauge", "Confidence that a rank is a straggler."),
    "ringwatch_hang_suspect": ("gauge", "Confidence that a rank holds its group in a hang."),
    "ringwatch_link_suspect": ("gauge", "Confidence that a host's links are slow."),
    "ringwatch_whatif_gain_seconds": ("gauge", "Seconds per step fixing a finding would save."),
    "ringwatch_straggler_hiccups_total": ("counter", "Transient stragglers per rank: late for "
                                          "a few steps, then caught up."),
    "ringwatch_link_hiccups_total": ("counter", "Transient slow links per suspect host: "
                                     "transfers slower for a few steps, then as usual."),
    "ringwatch_serve_analysis_lag_seconds": ("gauge", "Age of a job's newest push at its "
                                             "last analysis."),
    "ringwatch_serve_analysis_seconds": ("gauge", "Duration of a job's last analysis."),
    "ringwatch_serve_analysis_rounds_total": ("counter", "Analysis rounds run."),
    "ringwatch_serve_analysis_errors_total": ("counter", "Analyses that failed."),
    "ringwatch_serve_window_state_errors_total": (
        "counter", "Saved window states (baselines) that could not be read or written."),
    "ringwatch_serve_requests_total": ("counter", "OTLP requests answered, per protocol and "
                                       "status (HTTP status or gRPC code)."),
    "ringwatch_serve_received_bytes_total": ("counter", "OTLP body bytes received."),
    "ringwatch_serve_points_total": ("counter", "OTLP data points decoded."),
    "ringwatch_serve_rejected_points_total": ("counter", "OTLP data points rejected."),
    "ringwatch_serve_jobs": ("gauge", "Jobs the service holds."),
    "ringwatch_serve_jobs_evicted_total": ("counter", "Jobs dropped, with all their state, "
                                           "to stay within --max-jobs."),
    "ringwatch_serve_api_requests_total": ("counter", "API and /metrics requests answered, per "
                                           "HTTP status."),
    "ringwatch_serve_connections_active": ("gauge", "HTTP connections being handled, per "
                                           "server (otlp_http, api)."),
    "ringwatch_serve_connections_refused_total": ("counter", "HTTP connections refused (503) "
                                                  "at the connection cap, per server."),
    "ringwatch_serve_request_timeouts_total": ("counter", "HTTP requests that did not arrive "
                                               "within the read timeout, per server."),
}
_SUSPECT = {"straggler": "ringwatch_straggler_suspect", "imbalance": "ringwatch_straggler_suspect",
            "hang": "ringwatch_hang_suspect"}


def tracked_dict(t) -> dict:
    return {"id": t.id, "job": t.job, "state": t.state, "opened_ns": t.opened_ns,
            "last_seen_ns": t.last_seen_ns, "resolved_ns": t.resolved_ns, "updates": t.updates,
            "headline": t.finding.headline(), "finding": t.finding.to_dict()}


class ServiceCollector:
    """``prometheus_client`` collector over the service."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fams = {}

        def fam(name, labels):
            if name not in fams:
                kind, help_ = SERVICE_METRICS[name]
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fams[name] = cls(name.removesuffix("_total") if kind == "counter" else name,
                                 help_, labels=labels)
            return fams[name]

        s = self.service
        for t in s.store.current(state="open"):
            f = t.finding
            ranks = ",".join(map(str, f.ranks))
            fam("ringwatch_finding_open", ["job", "id", "kind", "cls", "ranks", "hosts"]
                ).add_metric([t.job, t.id, f.kind, f.cls, ranks, ",".join(f.hosts)], 1)
            if f.kind in _SUSPECT:
                hosts = dict(zip(f.ranks, f.hosts, strict=False)) if len(f.hosts) == len(
                    f.ranks) else {}
                for r in f.ranks:
                    fam(_SUSPECT[f.kind], ["job", "rank", "host", "cls"]).add_metric(
                        [t.job, str(r), hosts.get(r, ""), f.cls], f.confidence)
            if f.kind == "slow_link":
                for h in f.hosts:
                    fam("ringwatch_link_suspect", ["job", "host"]).add_metric(
                        [t.job, h], f.confidence / max(1, len(f.hosts)))
            if f.gain_s_per_step is not None:
                fam("ringwatch_whatif_gain_seconds", ["job", "id"]).add_metric(
                    [t.job, t.id], f.gain_s_per_step)
        for job, lag in dict(s.last_lag_s).items():
            fam("ringwatch_serve_analysis_lag_seconds", ["job"]).add_metric([job], lag)
        for job, took in dict(s.last_round_s).items():
            fam("ringwatch_serve_analysis_seconds", ["job"]).add_metric([job], took)
        for (job, rank, host), n in dict(s.hiccups).items():
            fam("ringwatch_straggler_hiccups_total", ["job", "rank", "host"]).add_metric(
                [job, str(rank), host], n)
        for (job, host), n in dict(s.link_hiccups).items():
            fam("ringwatch_link_hiccups_total", ["job", "host"]).add_metric([job, host], n)
        fam("ringwatch_serve_analysis_rounds_total", []).add_metric([], s.rounds)
        fam("ringwatch_serve_analysis_errors_total", []).add_metric([], s.analysis_errors)
        fam("ringwatch_serve_window_state_errors_total", []).add_metric([], s.windows.errors)
        fam("ringwatch_serve_jobs", []).add_metric([], len(s.jobs.jobs))
        fam("ringwatch_serve_jobs_evicted_total", []).add_metric([], s.jobs.evicted_total)
        servers = [(n, x) for n, x in (("otlp_http", s.receiver), ("api", s.api)) if x]
        for name, x in servers:
            by_status, totals = x.counters.snapshot()
            fam("ringwatch_serve_connections_active", ["server"]).add_metric(
                [name], x.active_connections)
            fam("ringwatch_serve_connections_refused_total", ["server"]).add_metric(
                [name], totals.get("refused", 0))
            fam("ringwatch_serve_request_timeouts_total", ["server"]).add_metric(
                [name], totals.get("timeouts", 0))
            if name == "api":
                for code, n in sorted(by_status.items()):
                    fam("ringwatch_serve_api_requests_total", ["code"]).add_metric(
                        [str(code)], n)
        received = [(proto, r.stats()) for proto, r in (("http", s.receiver),
                                                        ("grpc", s.grpc_receiver)) if r]
        for proto, st in received:
            for code, n in sorted(st.requests_total.items(), key=lambda kv: str(kv[0])):
                fam("ringwatch_serve_requests_total", ["protocol", "code"]).add_metric(
                    [proto, str(code)], n)
        if received:
            for name, attr in (("ringwatch_serve_received_bytes_total", "bytes_total"),
                               ("ringwatch_serve_points_total", "points_total"),
                               ("ringwatch_serve_rejected_points_total", "rejected_total")):
                fam(name, []).add_metric([], sum(getattr(st, attr) for _, st in received))
        yield from fams.values()


def _jobs(service) -> list[dict]:
    out = []
    with service.jobs.lock:
        for jl in service.jobs.jobs.values():
            out.append({"job": jl.job, "ranks": len(jl.ranks), "max_step": jl.max_step,
                        "last_push_ns": jl.last_push_ns,
                        "hosts": sorted({r.host for r in jl.ranks.values()}),
                        "open_findings": 0})
    for j in out:
        j["open_findings"] = len(service.store.current(j["job"], state="open"))
        j["analysis_lag_s"] = service.last_lag_s.get(j["job"])
    return out


class ApiServer:
    """The HTTP server of ``/metrics`` and ``/api/v1``; :meth:`start`, :meth:`stop`.

    Args:
        service: The :class:`~ringwatch.service._service.Service` it shows (its config's
            tokens decide who may read and change).
        host: Interface to bind; loopback by default.
        port: TCP port; 0 picks a free one.
        max_connections: Connections handled at once; more are answered 503.
        read_timeout_s: Time a request may take to arrive, seconds.
    """

    def __init__(self, service, *, host: str = "127.0.0.1", port: int = 9410,
                 max_connections: int = 128, read_timeout_s: float = 10.0):
        from prometheus_client import CollectorRegistry

        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(service))
        self.host, self._port = host, port
        self.max_connections, self.read_timeout_s = max_connections, read_timeout_s
        self.counters = Counters()
        self._server: _Server | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    @property
    def active_connections(self) -> int:
        """Connections being handled now (0 when stopped)."""
        return self._server.active if self._server is not None else 0

    def start(self) -> ApiServer:
        """Binds and serves on a daemon thread; returns self.

        Raises:
            OSError: The address cannot be bound.
        """
        self._server = _Server((self.host, self._port), _Handler, counters=self.counters,
                               max_connections=self.max_connections,
                               read_timeout_s=self.read_timeout_s)
        self._server.api = self
        serve_in_thread(self._server, f"ringwatch-serve-api:{self.port}")
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def _allowed(self, h: _Handler, *, write: bool) -> bool:
        """Whether the request carries the token it needs (writes: the service's token;
        reads, when they need one: that token or the read token)."""
        cfg = self.service.config
        if write:
            tokens = [cfg.token]
        elif cfg.auth_reads or cfg.read_token:
            tokens = [cfg.token, cfg.read_token]
        else:
            return True
        tokens = [t.encode() for t in tokens if t]
        if not tokens:
            return True
        given = h.headers.get("Authorization", "")
        return any([bearer_ok(given, t) for t in tokens])  # a list: every compare runs

    def _get(self, h: _Handler) -> None:
        from urllib.parse import parse_qs, urlparse

        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        url = urlparse(h.path)
        s = self.service
        if url.path == "/healthz":
            return h.send(200, {"ok": True, "rounds": s.rounds})
        if not self._allowed(h, write=False):
            return h.unauthorized("reads need the service's token or its read token")
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == "/metrics":
            h.send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif url.path == "/api/v1/findings":
            state = q.get("state")
            if state not in (None, "open", "resolved"):
                h.send(400, {"error": "state must be open or resolved"})
                return
            h.send(200, {"findings": [tracked_dict(t) for t in
                                      s.store.current(q.get("job"), state=state)]})
        elif url.path == "/api/v1/history":
            h.send(200, {"changes": [{"what": c.what, "at_ns": c.at_ns,
                                      **tracked_dict(c.tracked)}
                                     for c in s.store.history(q.get("job"))]})
        elif url.path == "/api/v1/jobs":
            h.send(200, {"jobs": _jobs(s)})
        elif url.path == "/api/v1/control":
            h.send(200, s.settings())
        else:
            h.send(404, {"error": f"no such path: {url.path}"})

    def _post(self, h: _Handler, length: int) -> None:
        from urllib.parse import urlparse

        if not self._allowed(h, write=True):
            return h.unauthorized("changes need the service's bearer token")
        url = urlparse(h.path)
        raw = h.read_body(length) if length else b"{}"
        if raw is None:
            return None  # answered (408, 400)
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
        except (ValueError, RecursionError) as exc:
            h.send(400, {"error": f"bad JSON: {str(exc)[:200]}"})
            return
        s = self.service
        if url.path == "/api/v1/control":
            try:
                h.send(200, s.control(pause=_names(body.get("pause")),
                                      resume=_names(body.get("resume")),
                                      thresholds=body.get("thresholds")))
            except (ValueError, TypeError) as exc:
                h.send(400, {"error": str(exc)})
        elif url.path.startswith("/api/v1/findings/") and url.path.endswith("/resolve"):
            fid = url.path[len("/api/v1/findings/"):-len("/resolve")]
            try:
                h.send(200, tracked_dict(s.store.resolve(fid)))
            except KeyError:
                h.send(404, {"error": f"no finding {fid[:256]}"})
            except OSError as exc:  # resolved in memory, but not durable: say so
                h.send(500, {"error": f"resolved, but the state folder could not be "
                                      f"written: {exc.strerror or exc}"})
        else:
            h.send(404, {"error": f"no such path: {url.path[:256]}"})


def _names(value) -> list[str]:
    """A list of detector names from a JSON value (absent: none).

    Raises:
        ValueError: not a list of strings.
    """
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("pause and resume take a list of detector names")
    return value


class _Server(BoundedServer):
    api: ApiServer


class _Handler(BoundedHandler):
    server: _Server

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any other method
            return self._other
        raise AttributeError(name)

    def do_GET(self) -> None:
        self._handle(write=False)

    def do_HEAD(self) -> None:
        self._handle(write=False)

    def do_POST(self) -> None:
        self._handle(write=True)

    def _other(self) -> None:
        self.error(405, "only GET, HEAD and POST are allowed",
                   extra=(("Allow", "GET, HEAD, POST"),))

    def _handle(self, *, write: bool) -> None:
        api = self.server.api
        try:
            length = self.content_length(MAX_BODY_BYTES, required=False)
        except RequestError as err:
            return self.error(err.status, err.message)
        if length and not write:
            self.close_connection = True  # a body on a read is not read: never reuse
        try:
            if write:
                api._post(self, length)
            else:
                api._get(self)
        except Exception as exc:  # noqa: BLE001 - one bad request, never the server
            self.error(500, type(exc).__name__)

    def send(self, code: int, body, ctype: str = JSON) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body, indent=1).encode()
        self.reply(code, ctype, data, close=self.close_connection)

    def unauthorized(self, message: str) -> None:
        self.error(401, message, extra=(("WWW-Authenticate", "Bearer"),))

    def error_body(self, status: int, message: str) -> tuple[str, bytes]:
        return JSON, json.dumps({"error": message}).encode()

