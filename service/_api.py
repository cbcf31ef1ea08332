"""The service's HTTP face: ``/metrics`` and the JSON API.

* ``GET /metrics``: findings as Prometheus series (suspects per rank and host, what-if gains)
  and the service's own health (ingest, drops, analysis lag).
* ``GET /api/v1/findings[?job=J&state=open|resolved]``, ``GET /api/v1/jobs``,
  ``GET /api/v1/history[?job=J]``.
* ``GET|POST /api/v1/control``: detectors on/off and thresholds, without a restart
  (``{"pause": ["straggler"], "resume": [...], "thresholds": {"min_stall_s": 8}}``).
* ``POST /api/v1/findings/<id>/resolve``: an operator closes a finding.

Changes (POST) need the service's bearer token when it has one; reads do not.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

#: The service's own series: name, type, help.
SERVICE_METRICS = {
    "ringwatch_finding_open": ("gauge", "1 for each open finding."),
    "ringwatch_straggler_suspect": ("gauge", "Confidence that a rank is a straggler."),
    "ringwatch_hang_suspect": ("gauge", "Confidence that a rank holds its group in a hang."),
    "ringwatch_link_suspect": ("gauge", "Confidence that a host's links are slow."),
    "ringwatch_whatif_gain_seconds": ("gauge", "Seconds per step fixing a finding would save."),
    "ringwatch_straggler_hiccups_total": ("counter", "Transient stragglers per rank: late for "
                                          "a few steps, then caught up."),
    "ringwatch_serve_analysis_lag_seconds": ("gauge", "Age of a job's newest push at its "
                                             "last analysis."),
    "ringwatch_serve_analysis_seconds": ("gauge", "Duration of a job's last analysis."),
    "ringwatch_serve_analysis_rounds_total": ("counter", "Analysis rounds run."),
    "ringwatch_serve_analysis_errors_total": ("counter", "Analyses that failed."),
    "ringwatch_serve_requests_total": ("counter", "OTLP requests answered, per protocol and "
                                       "status (HTTP status or gRPC code)."),
    "ringwatch_serve_received_bytes_total": ("counter", "OTLP body bytes received."),
    "ringwatch_serve_points_total": ("counter", "OTLP data points decoded."),
    "ringwatch_serve_rejected_points_total": ("counter", "OTLP data points rejected."),
    "ringwatch_serve_jobs": ("gauge", "Jobs the service holds."),
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
        fam("ringwatch_serve_analysis_rounds_total", []).add_metric([], s.rounds)
        fam("ringwatch_serve_analysis_errors_total", []).add_metric([], s.analysis_errors)
        fam("ringwatch_serve_jobs", []).add_metric([], len(s.jobs.jobs))
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
    """The HTTP server of ``/metrics`` and ``/api/v1``; :meth:`start`, :meth:`stop`."""

    def __init__(self, service, *, host: str = "127.0.0.1", port: int = 9410):
        from prometheus_client import CollectorRegistry

        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(service))
        self.host, self._port = host, port
        self._server = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    def start(self) -> ApiServer:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body, ctype: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else json.dumps(body, indent=1).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                try:
                    api._get(self)
                except Exception as exc:  # noqa: BLE001 - one bad request, never the server
                    self._send(500, {"error": type(exc).__name__})

            def do_POST(self):
                try:
                    api._post(self)
                except Exception as exc:  # noqa: BLE001 - one bad request, never the server
                    self._send(500, {"error": type(exc).__name__})

        self._server = ThreadingHTTPServer((self.host, self._port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="ringwatch-serve-api",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _get(self, h) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        url = urlparse(h.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        s = self.service
        if url.path == "/metrics":
            h._send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif url.path == "/api/v1/findings":
            state = q.get("state")
            if state not in (None, "open", "resolved"):
                h._send(400, {"error": "state must be open or resolved"})
                return
            h._send(200, {"findings": [tracked_dict(t) for t in
                                       s.store.current(q.get("job"), state=state)]})
        elif url.path == "/api/v1/history":
            h._send(200, {"changes": [{"what": c.what, "at_ns": c.at_ns,
                                       **tracked_dict(c.tracked)}
                                      for c in s.store.history(q.get("job"))]})
        elif url.path == "/api/v1/jobs":
            h._send(200, {"jobs": _jobs(s)})
        elif url.path == "/api/v1/control":
            h._send(200, s.settings())
        elif url.path == "/healthz":
            h._send(200, {"ok": True, "rounds": s.rounds})
        else:
            h._send(404, {"error": f"no such path: {url.path}"})

    def _post(self, h) -> None:
        import hmac

        token = self.service.config.token
        if token and not hmac.compare_digest(h.headers.get("Authorization", "").encode(),
                                             f"Bearer {token}".encode()):
            h._send(401, {"error": "changes need the service's bearer token"})
            return
        url = urlparse(h.path)
        n = int(h.headers.get("Content-Length") or 0)
        if n > 1 << 20:
            h._send(413, {"error": "body over 1 MiB"})
            return
        raw = h.rfile.read(n) if n else b"{}"
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
        except ValueError as exc:
            h._send(400, {"error": f"bad JSON: {exc}"})
            return
        s = self.service
        if url.path == "/api/v1/control":
            try:
                h._send(200, s.control(pause=list(body.get("pause", [])),
                                       resume=list(body.get("resume", [])),
                                       thresholds=body.get("thresholds")))
            except (ValueError, TypeError) as exc:
                h._send(400, {"error": str(exc)})
        elif url.path.startswith("/api/v1/findings/") and url.path.endswith("/resolve"):
            fid = url.path[len("/api/v1/findings/"):-len("/resolve")]
            try:
                h._send(200, tracked_dict(s.store.resolve(fid)))
            except KeyError:
                h._send(404, {"error": f"no finding {fid}"})
        else:
            h._send(404, {"error": f"no such path: {url.path}"})
