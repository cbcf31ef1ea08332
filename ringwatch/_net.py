"""``HOST:PORT`` text, read and written the same way by every listener and client of ringwatch
(``serve --otlp-listen/--listen/--otlp-grpc-listen``, the agent's ``--prometheus``, gRPC peers).

Accepted: ``host:port``, ``1.2.3.4:port``, ``[::1]:port`` (an IPv6 host in brackets), and
``:port`` or ``port`` alone (the default host, loopback unless the caller says otherwise).
"""

from __future__ import annotations

from ringwatch._config import ConfigError

__all__ = ["LOOPBACK", "join_host_port", "parse_listen"]

LOOPBACK = "127.0.0.1"


def parse_listen(text: str, *, default_host: str = LOOPBACK) -> tuple[str, int]:
    """``(host, port)`` of a ``HOST:PORT`` text; port 0 means "pick a free one".

    Args:
        text: ``host:port``, ``[v6]:port``, ``:port`` or ``port``.
        default_host: The host when ``text`` names none.

    Raises:
        ConfigError: The port is not a number in 0..65535, or an IPv6 host lacks brackets
            (one line, naming ``text``).
    """
    raw = text.strip()
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or not rest.startswith(":") or not host:
            raise ConfigError(f"listen address {text!r}: expected [IPv6]:PORT")
        port = rest[1:]
    else:
        host, _, port = raw.rpartition(":")
        if ":" in host:
            raise ConfigError(f"listen address {text!r}: put an IPv6 host in brackets, "
                              "[::1]:PORT")
    if not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535:
        raise ConfigError(f"listen address {text!r}: expected HOST:PORT with a port in "
                          "0..65535")
    return host or default_host, int(port)


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (what :func:`parse_listen` reads)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
