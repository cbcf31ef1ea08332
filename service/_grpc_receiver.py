"""The OTLP/gRPC metrics receiver of the central service (optional: needs ``grpcio``).

Why a second protocol: the agents push OTLP/HTTP straight to ``serve`` (the embedded default),
but at scale an OpenTelemetry Collector gateway routes each job to one ``serve`` instance with
its ``loadbalancing`` exporter, and that exporter speaks OTLP/gRPC only
(``deploy/otelcol/``). With this receiver the gateway reaches ``serve`` directly.

Protocol (https://opentelemetry.io/docs/specs/otlp/#otlpgrpc): the unary
``opentelemetry.proto.collector.metrics.v1.MetricsService/Export``, served by the official
generated stubs of ``opentelemetry-proto``; gzip request compression is grpc's own. Status
codes: ``OK`` (with ``partial_success`` when the handler rejected points),
``UNAUTHENTICATED`` (token missing or wrong), ``INTERNAL`` (the handler raised), and grpc's
own ``RESOURCE_EXHAUSTED`` for a message over ``max_request_bytes`` once decompressed (that one
never reaches the servicer, so it is not in :meth:`stats`).

Limits: ``max_request_bytes`` per message after decompression; at most ``workers`` requests
are handled at once and ``max_concurrent`` accepted in all (more are refused by grpc with
``RESOURCE_EXHAUSTED``), so a flood costs bounded memory.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ringwatch._clock import Clock
from ringwatch.service._receiver import Handler, RequestInfo, _Intake

__all__ = ["OtlpGrpcReceiver", "grpc_available"]

GRPC_CONTENT_TYPE = "application/grpc"


def grpc_available() -> bool:
    """Whether ``grpcio`` can be imported (``pip install 'ringwatch[grpc]'``)."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        return False
    return True


class OtlpGrpcReceiver(_Intake):
    """OTLP/gRPC metrics endpoint: decodes each ``Export`` and hands it to ``handler``.

    Args:
        handler: As for :class:`~ringwatch.service._receiver.OtlpReceiver`: called from
            grpc's worker threads (so concurrently) with each request; returns the number of
            rejected points or None. An exception is answered ``INTERNAL``.
        host: Interface to bind; loopback by default.
        port: TCP port; 0 picks a free one (read ``.port`` after ``start()``).
        token: When set, calls need the metadata ``authorization: Bearer <token>``.
        max_request_bytes: Largest message, after decompression, bytes.
        workers: Requests handled at once.
        max_concurrent: Requests accepted at once (handled or waiting).
        clock: Source of ``received_wall_ns``.

    Raises:
        ImportError: ``grpcio`` is not installed (at construction, with the install line).
        ValueError: A limit is not positive.
    """

    def __init__(self, *, handler: Handler, host: str = "127.0.0.1", port: int = 4317,
                 token: str | None = None, max_request_bytes: int = 16 << 20,
                 workers: int = 4, max_concurrent: int = 64, clock: Clock | None = None):
        if not grpc_available():
            raise ImportError("the OTLP/gRPC receiver needs grpcio: "
                              "pip install 'ringwatch[grpc]'")
        if min(max_request_bytes, workers, max_concurrent) <= 0:
            raise ValueError("gRPC receiver limits must be positive")
        super().__init__(handler, clock)
        self.host = host
        self.token = token.encode() if token else None
        self.max_request_bytes = max_request_bytes
        self.workers = workers
        self.max_concurrent = max_concurrent
        self._port = port
        self._server = None

    def start(self) -> OtlpGrpcReceiver:
        """Binds and serves on grpc's threads; returns self.

        Raises:
            OSError: The address cannot be bound.
            RuntimeError: Already started.
        """
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as svc

        if self._server is not None:
            raise RuntimeError("OtlpGrpcReceiver already started")
        server = grpc.server(
            ThreadPoolExecutor(max_workers=self.workers,
                               thread_name_prefix="ringwatch-otlp-grpc"),
            maximum_concurrent_rpcs=self.max_concurrent,
            options=[("grpc.max_receive_message_length", self.max_request_bytes),
                     ("grpc.max_send_message_length", 1 << 20),
                     ("grpc.so_reuseport", 0)])
        svc.add_MetricsServiceServicer_to_server(_Servicer(self), server)
        where = self._host_port()
        try:
            port = server.add_insecure_port(where)
        except RuntimeError as exc:  # grpc >= 1.60 raises where older releases returned 0
            raise OSError(f"cannot bind the OTLP/gRPC receiver to {where}: {exc}") from exc
        if not port:
            raise OSError(f"cannot bind the OTLP/gRPC receiver to {where}")
        self._port = port
        server.start()
        self._server = server
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        """Stops serving (idempotent); calls in flight get ``grace_s`` to finish."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s).wait()

    @property
    def target(self) -> str:
        """``host:port``, as a gRPC client dials it."""
        return self._host_port()

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key.lower() == "authorization":
                return self._bearer_ok(str(value), "utf-8")
        return False


def _peer_address(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` -> the address alone."""
    from ringwatch._config import ConfigError
    from ringwatch._net import parse_listen

    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    try:
        return parse_listen(rest, default_host="")[0]
    except ConfigError:
        return rest


def _servicer_base():
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as svc

    return svc.MetricsServiceServicer


class _Servicer(_servicer_base() if grpc_available() else object):
    def __init__(self, receiver: OtlpGrpcReceiver):
        self.receiver = receiver

    def Export(self, request, context):
        import grpc
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceResponse,
        )

        rcv = self.receiver
        size = request.ByteSize()
        rcv._count(bytes=size)
        if rcv.token is not None and not rcv._authorized(context.invocation_metadata()):
            rcv._count("UNAUTHENTICATED")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        info = RequestInfo(remote_addr=_peer_address(context.peer()),
                           content_type=GRPC_CONTENT_TYPE, bytes_received=size,
                           received_wall_ns=rcv.clock.wall_ns())
        rejected = rcv._deliver(request, info)
        if isinstance(rejected, str):
            rcv._count("INTERNAL")
            context.abort(grpc.StatusCode.INTERNAL, rejected)
        rcv._count("OK")
        response = ExportMetricsServiceResponse()
        if rejected:
            response.partial_success.rejected_data_points = rejected
            response.partial_success.error_message = f"{rejected} data points rejected"
        return response
