"""The OTLP/HTTP metrics receiver of the central service, on the standard library's
``ThreadingHTTPServer`` (one daemon thread per connection).

Protocol (https://opentelemetry.io/docs/specs/otlp/#otlphttp): ``POST <path>`` with
``application/x-protobuf`` or ``application/json`` (see ``_decode`` for OTLP/JSON), optionally
``Content-Encoding: gzip`` or ``deflate``. Answers 200 with an ``ExportMetricsServiceResponse``
in the request's encoding (``partial_success`` when the handler rejected points); errors carry
a ``google.rpc.Status`` (protobuf requests) or its JSON form ``{"code", "message"}`` (JSON
requests and requests of another type); ``code`` is the gRPC code, the HTTP status is on the
status line.

Limits: ``Content-Length`` is required (411 otherwise; chunked transfer coding is not
supported, which the OTLP exporters never need: they send whole bodies), a length over
``max_request_bytes`` is a 413 before any body byte is read, and each request (headers and body)
must arrive within ``read_timeout_s`` of the server starting to wait for it (after the accept,
or after the previous answer on a keep-alive connection, so it is also the idle limit), so a
slow client holds a thread for at most that long. Answers sent before the body was read close
the connection. Memory per request in flight: up to ``max_request_bytes`` of body, up to
``max_decompressed_bytes`` decompressed, and the decoded message (upb: up to ~35x the wire size
for a body of empty data points). The number of threads is not capped: a flood of connections
is bounded only by ``read_timeout_s``; put a proxy in front for the open internet.
"""

from __future__ import annotations

import hmac
import io
import logging
import socket
import socketserver
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from ringwatch._clock import Clock, SystemClock
from ringwatch._log import warn_once
from ringwatch.service._decode import (
    RequestError,
    content_coding,
    count_points,
    decode_metrics_request,
    encode_error,
    encode_response,
    media_type,
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
        requests_total: Answers sent (or attempted) by HTTP status; 408 counts bodies that
            timed out. Connections that ended before a request line are not counted.
        bytes_total: Request body bytes read, as received.
        points_total: Data points decoded (gauge, sum, histogram, exp. histogram, summary).
        rejected_total: Data points the handler reported as rejected.
        handler_errors_total: Requests whose handler raised (answered 500).
    """

    requests_total: Mapping[int, int]
    bytes_total: int
    points_total: int
    rejected_total: int
    handler_errors_total: int


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
        self._lock = threading.Lock()
        self._requests: Counter = Counter()
        self._totals: Counter[str] = Counter()

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
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self._port}"

    def _bearer_ok(self, header: str, encoding: str) -> bool:
        """Whether an ``Authorization`` value is ``Bearer <token>`` (constant-time compare).
        ``encoding`` maps the value back to the bytes it arrived as."""
        scheme, _, credential = header.strip().partition(" ")
        given = credential.strip().encode(encoding, "replace")
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.token)

    def stats(self) -> ReceiverStats:
        """A snapshot of the counters."""
        with self._lock:
            return ReceiverStats(
                requests_total=types.MappingProxyType(dict(self._requests)),
                bytes_total=self._totals["bytes"], points_total=self._totals["points"],
                rejected_total=self._totals["rejected"],
                handler_errors_total=self._totals["handler_errors"])

    def _count(self, status: int | str | None = None, **totals: int) -> None:
        with self._lock:
            if status is not None:
                self._requests[status] += 1
            self._totals.update(totals)

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
        clock: Source of ``received_wall_ns``.

    Raises:
        ValueError: On a bad limit or path (at construction).
    """

    def __init__(self, *, handler: Handler, host: str = "127.0.0.1", port: int = 4318,
                 path: str = "/v1/metrics", token: str | None = None,
                 max_request_bytes: int = 8 << 20, max_decompressed_bytes: int = 64 << 20,
                 read_timeout_s: float = 10, clock: Clock | None = None):
        if not path.startswith("/"):
            raise ValueError(f"receiver path must start with '/', got {path!r}")
        if min(max_request_bytes, max_decompressed_bytes) <= 0 or not read_timeout_s > 0:
            raise ValueError("receiver limits and read_timeout_s must be positive")
        super().__init__(handler, clock)
        self.host = host
        self.path = path
        self.token = token.encode() if token else None
        self.max_request_bytes = max_request_bytes
        self.max_decompressed_bytes = max_decompressed_bytes
        self.read_timeout_s = float(read_timeout_s)
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
        cls = _Server6 if ":" in self.host else _Server
        self._server = cls((self.host, self._port), _RequestHandler)
        self._server.receiver = self
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(  # polls for stop() every 0.1 s
            target=self._server.serve_forever, args=(0.1,), daemon=True,
            name=f"ringwatch-otlp-receiver:{self._port}")
        self._thread.start()
        return self

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of connections must not be refused at the backlog
    receiver: OtlpReceiver

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a reverse DNS lookup that can hang
        # where DNS is unreachable); the name is only used for CGI, so it is skipped.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        # Peers that reset or vanish mid-request are expected from a network; never a traceback.
        log.debug("OTLP receiver: connection from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _DeadlineReader(io.RawIOBase):
    """A socket reader whose reads all end by one deadline (set per request), so a client
    that trickles bytes cannot hold its thread beyond ``budget_s``."""

    def __init__(self, sock: socket.socket, budget_s: float):
        self._sock = sock
        self._budget_s = budget_s
        self._deadline = time.monotonic() + budget_s

    def restart(self) -> None:
        # Real time on purpose: it bounds real socket waits, whatever clock the service uses.
        self._deadline = time.monotonic() + self._budget_s

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request read deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buf)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    server_version = "ringwatch"
    server: _Server

    def version_string(self) -> str:  # the Server header, without the Python version
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced: releases the socket's makefile reference
        self._reader = _DeadlineReader(self.connection, self.server.receiver.read_timeout_s)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.restart()
        super().handle_one_request()

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any method but POST: 405 on our path, 404 elsewhere
            return self._not_post
        raise AttributeError(name)

    def do_POST(self) -> None:
        rcv = self.server.receiver
        if urlsplit(self.path).path != rcv.path:
            return self._error(404, f"no such path; POST metrics to {rcv.path}")
        if rcv.token is not None and not self._authorized():
            return self._error(401, "missing or wrong bearer token",
                               extra=(("WWW-Authenticate", "Bearer"),))
        try:
            length = self._content_length(rcv.max_request_bytes)
            kind = media_type(self.headers.get("Content-Type"))
            coding = content_coding(self.headers.get("Content-Encoding"))
        except RequestError as err:
            return self._error(err.status, err.message)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            return self._error(408, f"body not received within {rcv.read_timeout_s:g} s")
        except OSError:  # reset by the peer: nobody to answer
            self.close_connection = True
            return None
        received_wall_ns = rcv.clock.wall_ns()
        rcv._count(bytes=len(body))
        if len(body) < length:
            return self._error(400, f"body ended after {len(body)} of {length} bytes")
        self._reply(*rcv._serve(body, kind, coding, self.client_address[0], received_wall_ns))

    def _not_post(self) -> None:
        if urlsplit(self.path).path != self.server.receiver.path:
            return self._error(404, "no such path")
        self._error(405, "only POST is allowed", extra=(("Allow", "POST"),))

    def _authorized(self) -> bool:
        # Headers are decoded as latin-1 by http.client: every str maps back to bytes.
        return self.server.receiver._bearer_ok(self.headers.get("Authorization", ""),
                                               "latin-1")

    def _content_length(self, limit: int) -> int:
        if self.headers.get("Transfer-Encoding") is not None:
            raise RequestError(411, "chunked transfer coding is not supported; "
                                    "send Content-Length")
        values = {v.strip() for v in self.headers.get_all("Content-Length") or ()}
        if not values:
            raise RequestError(411, "Content-Length required")
        value = values.pop()
        if values or not (value.isascii() and value.isdigit()):
            raise RequestError(400, "bad Content-Length")
        if len(value) > 18 or int(value) > limit:
            raise RequestError(413, f"request body over the limit of {limit} bytes")
        return int(value)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        # http.server's own refusals (bad request line, headers too long, ...): our body.
        self._error(code, message or self.responses.get(code, ("error",))[0])

    def _error(self, status: int, message: str, extra: tuple = ()) -> None:
        """An error answer before the body was read (or with the body cut short): the
        connection closes, since unread body bytes would be taken for the next request."""
        ctype, body = encode_error(self._request_kind(), status, message)
        self._reply(status, ctype, body, close=True, extra=extra)

    def _reply(self, status: int, ctype: str, body: bytes, *, close: bool = False,
               extra: tuple = ()) -> None:
        self.server.receiver._count(int(status))
        if close:
            self.close_connection = True
        try:
            self.connection.settimeout(self.server.receiver.read_timeout_s)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for key, value in extra:
                self.send_header(key, value)
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)
        except OSError:  # the peer went away: nothing to tell it
            self.close_connection = True

    def _request_kind(self) -> str | None:
        headers = getattr(self, "headers", None)
        try:
            return media_type(headers.get("Content-Type")) if headers is not None else None
        except RequestError:
            return None  # answered in JSON

    def log_message(self, format: str, *args) -> None:
        log.debug("OTLP receiver: %s %s", self.address_string(), format % args)
