"""The OTLP/HTTP metrics receiver of the central service, on the standard library's
``ThreadingHTTPServer`` (one daemon thread per connection, up to a cap: ``_http``).

Protocol (https://opentelemetry.io/docs/specs/otlp/#otlphttp): ``POST <path>`` with
``application/x-protobuf`` or ``application/json`` (see ``_decode`` for OTLP/JSON), optionally
``Content-Encoding: gzip`` or ``deflate``. Answers 200 with an ``ExportMetricsServiceResponse``
in the request's encoding (``partial_success`` when the handler rejected points); errors carry
a ``google.rpc.Status`` (protobuf requests) or its JSON form ``{"code", "message"}`` (JSON
requests and requests of another type); ``code`` is the gRPC code, the HTTP status is on the
status line.

Limits (shared with the API server, see ``_http``): ``Content-Length`` is required (411
otherwise; chunked transfer coding is not supported, which the OTLP exporters never need: they
send whole bodies), a length over ``max_request_bytes`` is a 413 before any body byte is read,
each request must arrive within ``read_timeout_s`` (408 after), and at most
``max_connections`` connections are handled at once (one thread each; one more is answered 503
and closed). Memory per request in flight: up to ``max_request_bytes`` of body, up to
``max_decompressed_bytes`` decompressed, and the decoded message (upb: up to ~35x the wire
size for a body of empty data points), so at most ``max_connections`` times that in all.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from ringwatch._clock import Clock, SystemClock
from ringwatch._log import warn_once
from ringwatch._net import join_host_port
from ringwatch.service._decode import (
    RequestError,
    content_coding,
    count_points,
    decode_metrics_request,
    encode_error,
    encode_response,
    media_type,
)
from ringwatch.service._http import (
    BoundedHandler,
    BoundedServer,
    Counters,
    bearer_ok,
    serve_in_thread,
)

__all__ = ["OtlpReceiver", "ReceiverStats", "RequestError", "RequestInfo",
           "decode_metrics_request"]

log = logging.getLogger("ringwatch.service")


@dataclass(frozen=True)
class RequestInfo:
    """What the handler learns about a request besides its content.

    Attributes:
        remote_addr: The peer's IP address.
        content_type: ``application/x-protobuf`` or ``application/json``.
        bytes_received: Body size as received (before decompression), bytes.
        received_wall_ns: Wall clock when the body was in, ns since the epoch.
    """

    remote_addr: str
    content_type: str
    bytes_received: int
    received_wall_ns: int


@dataclass(frozen=True)
class ReceiverStats:
    """Counters of a receiver since it was built (a snapshot).

    Attributes:
        requests_total: Answers sent (or attempted) by HTTP status; 408 counts requests that
            timed out with some bytes in, 503 connections refused at the cap. Connections
            that ended before a request line are not counted.
        bytes_total: Request body bytes read, as received.
        points_total: Data points decoded (gauge, sum, histogram, exp. histogram, summary).
        rejected_total: Data points the handler reported as rejected.
        handler_errors_total: Requests whose handler raised (answered 500).
        refused_total: Connections refused at the connection cap (also answered 503).
        timeouts_total: Requests that did not arrive within the read timeout.
    """

    requests_total: Mapping[int, int]
    bytes_total: int
    points_total: int
    rejected_total: int
    handler_errors_total: int
    refused_total: int = 0
    timeouts_total: int = 0


Handler = Callable[[ExportMetricsServiceRequest, RequestInfo], "int | None"]
"""The metrics handler: (request, info) -> number of rejected data points, or None."""


class _Intake:
    """What the HTTP and gRPC receivers share: the handler call and the counters.

    ``requests_total`` is keyed by the protocol's own status: the HTTP status (int) for
    :class:`OtlpReceiver`, the gRPC status code name (``"OK"``, ``"UNAUTHENTICATED"``, ...)
    for the gRPC one.
    """

    def __init__(self, handler: Handler, clock: Clock | None):
        self.handler = handler
        self.clock = clock or SystemClock()
        self.counters = Counters()

    def start(self):  # each receiver binds its own way
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port once started (the one asked for before)."""
        return self._port

    def _host_port(self) -> str:
        """``host:port`` with an IPv6 host in brackets."""
        return join_host_port(self.host, self._port)

    def _bearer_ok(self, header: str, encoding: str) -> bool:
        """Whether an ``Authorization`` value is ``Bearer <token>`` (constant-time compare).
        ``encoding`` maps the value back to the bytes it arrived as."""
        return bearer_ok(header, self.token, encoding)

    def stats(self) -> ReceiverStats:
        """A snapshot of the counters."""
        by_status, totals = self.counters.snapshot()
        return ReceiverStats(
            requests_total=types.MappingProxyType(by_status),
            bytes_total=totals.get("bytes", 0), points_total=totals.get("points", 0),
            rejected_total=totals.get("rejected", 0),
            handler_errors_total=totals.get("handler_errors", 0),
            refused_total=totals.get("refused", 0), timeouts_total=totals.get("timeouts", 0))

    def _count(self, status: int | str | None = None, **totals: int) -> None:
        self.counters.count(status, **totals)

    def _deliver(self, req: ExportMetricsServiceRequest, info: RequestInfo) -> int | str:
        """Hands a decoded request to the handler: the number of rejected points, or the
        error message when the handler raised (logged once per exception type)."""
        points = count_points(req)
        self._count(points=points)
        try:
            result = self.handler(req, info)
        except Exception as exc:  # noqa: BLE001 - a failing handler must not stop the server
            name = type(exc).__qualname__
            warn_once(f"service.receiver.handler.{name}",
                      f"OTLP receiver: the metrics handler raised {name}: {exc}; answered "
                      "as an internal error")
            self._count(handler_errors=1)
            return f"metrics handler failed ({name})"
        rejected = 0
        if isinstance(result, int) and not isinstance(result, bool):
            rejected = max(0, min(result, points))
        elif result is not None:
            warn_once("service.receiver.handler.result", "OTLP receiver: the metrics handler "
                      f"returned {type(result).__name__}, not int or None; taken as 0 rejected")
        self._count(rejected=rejected)
        return rejected


class OtlpReceiver(_Intake):
    """OTLP/HTTP metrics endpoint: decodes each push and hands it to ``handler``.

    Args:
        handler: Called (from the connection's thread, so concurrently: it must be thread-safe)
            with each decoded request; returns the number of data points it rejected (for the
            OTLP partial-success answer) or None. An exception is answered 500 and logged once
            per exception type; the server keeps serving.
        host: Interface to bind; loopback by default.
        port: TCP port; 0 picks a free one (read ``.port`` after ``start()``).
        path: The only path served.
        token: When set (non-empty), requests need ``Authorization: Bearer <token>``
            (else 401); compared in constant time.
        max_request_bytes: Largest accepted Content-Length, bytes.
        max_decompressed_bytes: Largest body after decompression, bytes.
        read_timeout_s: Time a request may take to arrive (headers and body), seconds.
        max_connections: Connections handled at once (one thread each); more get 503.
        clock: Source of ``received_wall_ns``.

    Raises:
        ValueError: On a bad limit or path (at construction).
    """

    def __init__(self, *, handler: Handler, host: str = "127.0.0.1", port: int = 4318,
                 path: str = "/v1/metrics", token: str | None = None,
                 max_request_bytes: int = 8 << 20, max_decompressed_bytes: int = 64 << 20,
                 read_timeout_s: float = 10, max_connections: int = 128,
                 clock: Clock | None = None):
        if not path.startswith("/"):
            raise ValueError(f"receiver path must start with '/', got {path!r}")
        if min(max_request_bytes, max_decompressed_bytes, max_connections) <= 0 \
                or not read_timeout_s > 0:
            raise ValueError("receiver limits and read_timeout_s must be positive")
        super().__init__(handler, clock)
        self.host = host
        self.path = path
        self.token = token.encode() if token else None
        self.max_request_bytes = max_request_bytes
        self.max_decompressed_bytes = max_decompressed_bytes
        self.read_timeout_s = float(read_timeout_s)
        self.max_connections = max_connections
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OtlpReceiver:
        """Binds and serves in a daemon thread; returns self.

        Raises:
            OSError: The address cannot be bound.
            RuntimeError: Already started.
        """
        if self._server is not None:
            raise RuntimeError("OtlpReceiver already started")
        self._server = _Server((self.host, self._port), _RequestHandler, counters=self.counters,
                               max_connections=self.max_connections,
                               read_timeout_s=self.read_timeout_s)
        self._server.receiver = self
        self._port = self._server.server_address[1]
        self._thread = serve_in_thread(self._server, f"ringwatch-otlp-receiver:{self._port}")
        return self

    @property
    def active_connections(self) -> int:
        """Connections being handled now (0 when stopped)."""
        return self._server.active if self._server is not None else 0

    def stop(self) -> None:
        """Stops accepting and closes the listening socket (idempotent). Requests in flight
        finish on their own daemon threads."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join()

    @property
    def url(self) -> str:
        """``http://host:port/path`` of this receiver."""
        return f"http://{self._host_port()}{self.path}"

    def _serve(self, body: bytes, kind: str, coding: str, remote: str,
               received_wall_ns: int) -> tuple[int, str, bytes]:
        """(status, content type, body) of the answer to a request whose body is in."""
        try:
            req = decode_metrics_request(body, content_type=kind, content_encoding=coding,
                                         max_decompressed_bytes=self.max_decompressed_bytes)
        except RequestError as err:
            return (err.status, *encode_error(kind, err.status, err.message))
        info = RequestInfo(remote_addr=remote, content_type=kind, bytes_received=len(body),
                           received_wall_ns=received_wall_ns)
        rejected = self._deliver(req, info)
        if isinstance(rejected, str):
            return (500, *encode_error(kind, 500, rejected))
        return 200, kind, encode_response(kind, rejected, f"{rejected} data points rejected")


class _Server(BoundedServer):
    receiver: OtlpReceiver


class _RequestHandler(BoundedHandler):
    server: _Server

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any method but POST: 405 on our path, 404 elsewhere
            return self._not_post
        raise AttributeError(name)

    def do_POST(self) -> None:
        rcv = self.server.receiver
        if urlsplit(self.path).path != rcv.path:
            return self.error(404, f"no such path; POST metrics to {rcv.path}")
        if rcv.token is not None and not self._authorized():
            return self.error(401, "missing or wrong bearer token",
                              extra=(("WWW-Authenticate", "Bearer"),))
        try:
            length = self.content_length(rcv.max_request_bytes, required=True)
            kind = media_type(self.headers.get("Content-Type"))
            coding = content_coding(self.headers.get("Content-Encoding"))
        except RequestError as err:
            return self.error(err.status, err.message)
        body = self.read_body(length)
        if body is None:
            return None
        received_wall_ns = rcv.clock.wall_ns()
        rcv._count(bytes=len(body))
        self.reply(*rcv._serve(body, kind, coding, self.client_address[0], received_wall_ns))

    def _not_post(self) -> None:
        if urlsplit(self.path).path != self.server.receiver.path:
            return self.error(404, "no such path")
        self.error(405, "only POST is allowed", extra=(("Allow", "POST"),))

    def _authorized(self) -> bool:
        # Headers are decoded as latin-1 by http.client: every str maps back to bytes.
        return self.server.receiver._bearer_ok(self.headers.get("Authorization", ""),
                                               "latin-1")

    def error_body(self, status: int, message: str) -> tuple[str, bytes]:
        return encode_error(self._request_kind(), status, message)

    def _request_kind(self) -> str | None:
        headers = getattr(self, "headers", None)
        try:
            return media_type(headers.get("Content-Type")) if headers is not None else None
        except RequestError:
            return None  # answered in JSON

    def log_message(self, format: str, *args) -> None:
        log.debug("OTLP receiver: %s %s", self.address_string(), format % args)
