"""What both HTTP servers of ``ringwatch serve`` share (the OTLP/HTTP receiver and the API):
a bounded number of threads, one deadline per request, a checked ``Content-Length``.

* **Connections**: at most ``max_connections`` are handled at once, one thread each. One more
  is answered ``503`` (``Retry-After: 1``, ``Connection: close``) by the accepting thread
  itself, which starts no thread for it, and counted (``refused``). The threads of a server
  are therefore at most ``max_connections`` plus its accepting thread, whatever the clients do.
* **Time**: each request (its line, headers and body) must arrive within ``read_timeout_s``
  of the server starting to wait for it: after the accept, or after the previous answer on a
  keep-alive connection (so it is the idle limit too). A request cut off after some of its
  bytes arrived is answered 408; a connection that sent nothing is closed; both are counted
  (``timeouts``). The answer is written under the same limit, so one request holds its
  thread for at most twice ``read_timeout_s`` plus the time its handler takes.
* **Body**: ``Content-Length`` must be decimal digits (400 for a negative, hexadecimal or
  repeated value), at most the server's limit (413 before any body byte is read); chunked
  transfer coding is refused (411). An answer sent before the body was read closes the
  connection, since unread body bytes would be taken for the next request.

Memory per server is bounded by ``max_connections`` times what one request may hold (its
body limit, plus what the handler makes of it).
"""

from __future__ import annotations

import hmac
import io
import logging
import socket
import socketserver
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["BoundedHandler", "BoundedServer", "Counters", "DeadlineReader", "RequestError",
           "bearer_ok", "serve_in_thread"]

log = logging.getLogger("ringwatch.service")


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class Counters:
    """Thread-safe counts of a server: answers per status, and named totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_status: Counter = Counter()
        self._totals: Counter[str] = Counter()

    def count(self, status: int | str | None = None, **totals: int) -> None:
        """One more answer with ``status`` (when given); ``totals`` added to their names."""
        with self._lock:
            if status is not None:
                self._by_status[status] += 1
            self._totals.update(totals)

    def snapshot(self) -> tuple[dict, dict[str, int]]:
        """``(answers per status, totals)``, copies."""
        with self._lock:
            return dict(self._by_status), dict(self._totals)


def bearer_ok(header: str, token: bytes, encoding: str = "latin-1") -> bool:
    """Whether an ``Authorization`` value is ``Bearer <token>`` (constant-time compare).
    ``encoding`` maps the value back to the bytes it arrived as (latin-1 for HTTP/1.1
    headers, which ``http.client`` decodes so)."""
    scheme, _, credential = header.strip().partition(" ")
    given = credential.strip().encode(encoding, "replace")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, token)


class DeadlineReader(io.RawIOBase):
    """A socket reader whose reads all end by one deadline (set per request), so a client
    that trickles bytes cannot hold its thread beyond ``budget_s``.

    Attributes:
        got: Bytes read since the last :meth:`restart`.
        expired: Whether a read met the deadline since the last :meth:`restart`.
    """

    def __init__(self, sock: socket.socket, budget_s: float):
        self._sock = sock
        self._budget_s = budget_s
        self.restart()

    def restart(self) -> None:
        # Real time on purpose: it bounds real socket waits, whatever clock the service uses.
        self._deadline = time.monotonic() + self._budget_s
        self.got = 0
        self.expired = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError("request read deadline passed")
        self._sock.settimeout(left)
        try:
            n = self._sock.recv_into(buf)
        except TimeoutError:
            self.expired = True
            raise
        self.got += n
        return n


class BoundedServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` with a cap on the connections it handles at once.

    Args:
        address: ``(host, port)``; an IPv6 host binds an IPv6 socket; port 0 picks one.
        handler: A :class:`BoundedHandler` subclass.
        counters: Where answers, refusals and timeouts are counted.
        max_connections: Connections handled at once; more are refused (503).
        read_timeout_s: Time a request may take to arrive, and its answer to be written (s).

    Raises:
        ValueError: A limit is not positive.
        OSError: The address cannot be bound.
    """

    daemon_threads = True
    block_on_close = False  # stopping does not wait for slow clients: their threads end alone
    request_queue_size = 128  # a burst of connections must not be refused at the backlog
    #: The body of the refusal at the cap (JSON, the form every client here reads).
    busy_body = b'{"code": 14, "error": "too many connections; retry later"}'

    def __init__(self, address: tuple[str, int], handler: type[BoundedHandler], *,
                 counters: Counters, max_connections: int, read_timeout_s: float):
        if max_connections < 1 or not read_timeout_s > 0:
            raise ValueError("max_connections and read_timeout_s must be positive")
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.counters = counters
        self.max_connections = max_connections
        self.read_timeout_s = float(read_timeout_s)
        self._lock = threading.Lock()
        self._active = 0
        super().__init__(address, handler)

    @property
    def active(self) -> int:
        """Connections being handled now."""
        return self._active

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a reverse DNS lookup that can hang
        # where DNS is unreachable); the name is only used for CGI, so it is skipped.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        # Peers that reset or vanish mid-request are expected from a network; never a traceback.
        log.debug("HTTP server: connection from %s failed", client_address, exc_info=True)

    def process_request(self, request, client_address) -> None:
        with self._lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            self.counters.count(503, refused=1)
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    def _refuse(self, sock: socket.socket) -> None:
        """503 and close, from the accepting thread: never blocks on the peer."""
        head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(self.busy_body)}\r\nRetry-After: 1\r\n"
                "Connection: close\r\n\r\n").encode()
        try:
            sock.setblocking(False)
            sock.send(head + self.busy_body)
            for _ in range(4):  # what the peer already sent, so that closing sends no reset
                if not sock.recv(65536):
                    break
        except OSError:
            pass  # nothing (more) to read, or the peer is gone: either way, close
        self.shutdown_request(sock)


def serve_in_thread(server: BoundedServer, name: str) -> threading.Thread:
    """Serve ``server`` on a daemon thread (polling for shutdown every 0.1 s)."""
    thread = threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True, name=name)
    thread.start()
    return thread


class BoundedHandler(BaseHTTPRequestHandler):
    """The request handler of a :class:`BoundedServer`: the per-request deadline, the
    ``Content-Length`` check and counted answers. Subclasses give :meth:`error_body`."""

    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    server_version = "ringwatch"
    server: BoundedServer
    _answered = False

    def version_string(self) -> str:  # the Server header, without the Python version
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced: releases the socket's makefile reference
        self._reader = DeadlineReader(self.connection, self.server.read_timeout_s)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.restart()
        answered_before, self._answered = self._answered, False
        self.command, self.requestline, self.request_version = "", "", "HTTP/1.1"
        self.headers = None
        super().handle_one_request()
        if self._reader.expired:
            self.close_connection = True
            if self._reader.got or not answered_before:  # not a keep-alive connection idling
                self.server.counters.count(timeouts=1)
            if self._reader.got and not self._answered:
                self.error(408, f"request not received within {self.server.read_timeout_s:g} s")

    def content_length(self, limit: int, *, required: bool) -> int:
        """The request's body length, checked: at most ``limit`` bytes.

        Raises:
            RequestError: 411 for chunked coding (or no length when ``required``), 400 for a
                length that is not decimal digits or given twice, 413 over ``limit``.
        """
        if self.headers.get("Transfer-Encoding") is not None:
            raise RequestError(411, "chunked transfer coding is not supported; "
                                    "send Content-Length")
        values = {v.strip() for v in self.headers.get_all("Content-Length") or ()}
        if not values:
            if required:
                raise RequestError(411, "Content-Length required")
            return 0
        value = values.pop()
        if values or not (value.isascii() and value.isdigit()):
            raise RequestError(400, "bad Content-Length")
        if len(value) > 18 or int(value) > limit:
            raise RequestError(413, f"request body over the limit of {limit} bytes")
        return int(value)

    def read_body(self, length: int) -> bytes | None:
        """The body, or None once answered (408 past the deadline, 400 cut short, nothing
        when the peer reset)."""
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.error(408, f"body not received within {self.server.read_timeout_s:g} s")
            return None
        except OSError:  # reset by the peer: nobody to answer
            self.close_connection = True
            return None
        if len(body) < length:
            self.error(400, f"body ended after {len(body)} of {length} bytes")
            return None
        return body

    def error_body(self, status: int, message: str) -> tuple[str, bytes]:
        """``(Content-Type, body)`` of an error answer."""
        raise NotImplementedError

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        # http.server's own refusals (bad request line, headers too long, ...): our body.
        self.error(code, message or self.responses.get(code, ("error",))[0])

    def error(self, status: int, message: str, extra: tuple = ()) -> None:
        """An error answer; the connection closes (the body may not have been read)."""
        self.reply(status, *self.error_body(status, message), close=True, extra=extra)

    def reply(self, status: int, ctype: str, body: bytes, *, close: bool = False,
              extra: tuple = ()) -> None:
        """Send one answer, counted by status; a peer gone meanwhile is not an error."""
        self._answered = True
        self.server.counters.count(int(status))
        if close:
            self.close_connection = True
        try:
            self.connection.settimeout(self.server.read_timeout_s)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for key, value in extra:
                self.send_header(key, value)
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the peer went away: nothing to tell it
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:
        log.debug("HTTP server: %s %s", self.address_string(), format % args)
