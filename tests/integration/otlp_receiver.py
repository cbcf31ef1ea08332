"""A real OTLP/HTTP metrics receiver on loopback, for the tests: decodes every request with the
official protobuf messages (``opentelemetry-proto``) and keeps it."""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OtlpReceiver:
    """``with OtlpReceiver() as r:`` -> ``r.url`` takes pushes; ``r.requests`` holds the
    decoded ``ExportMetricsServiceRequest`` messages in arrival order."""

    def __init__(self, *, status: int = 200):
        self.requests: list = []
        self.status = status
        self.lock = threading.Lock()
        self._server = None

    def __enter__(self) -> OtlpReceiver:
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as pb

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                enc = self.headers.get("Content-Encoding", "")
                if enc == "gzip":
                    body = gzip.decompress(body)
                elif enc == "deflate":
                    body = zlib.decompress(body)
                req = pb.ExportMetricsServiceRequest()
                req.ParseFromString(body)
                with receiver.lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()},
                                              req))
                out = pb.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/metrics"

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> list:
        with self.lock:
            return list(self.requests)


def points(req, name: str) -> list[tuple[dict, dict, float]]:
    """(resource attributes, point attributes, value) of every point of metric ``name``."""
    out = []
    for rm in req.resource_metrics:
        res = {a.key: _value(a.value) for a in rm.resource.attributes}
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name != name:
                    continue
                data = m.sum if m.HasField("sum") else m.gauge
                for dp in data.data_points:
                    attrs = {a.key: _value(a.value) for a in dp.attributes}
                    v = dp.as_double if dp.HasField("as_double") else dp.as_int
                    out.append((res, attrs, v))
    return out


def _value(v):
    return getattr(v, v.WhichOneof("value"))
