"""The service's OTLP/gRPC receiver over real gRPC on loopback: what an OpenTelemetry
Collector's ``loadbalancing`` exporter sends (the official ``MetricsService/Export``, gzip,
several agents' resources batched into one request, or one agent's split over several)."""

from __future__ import annotations

import gzip
import urllib.request

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2_grpc import MetricsServiceStub
from prometheus_client.parser import text_string_to_metric_families

from ringwatch.service._grpc_receiver import OtlpGrpcReceiver
from ringwatch.service._service import Service, ServiceConfig

from pushes import WALL, agent_push


def _stub(target: str):
    channel = grpc.insecure_channel(target, compression=grpc.Compression.Gzip)
    return channel, MetricsServiceStub(channel)


@pytest.fixture
def service():
    svc = Service(ServiceConfig(otlp_listen="127.0.0.1:0", api_listen="127.0.0.1:0",
                                otlp_grpc_listen="127.0.0.1:0", state_dir=None,
                                window_s=3600, token="s3cret")).start()
    yield svc
    svc.stop()


def _auth(token="s3cret"):
    return (("authorization", f"Bearer {token}"),)


def test_export_over_grpc_reaches_the_jobs_and_metrics(service):
    channel, stub = _stub(service.grpc_receiver.target)
    with channel:
        resp = stub.Export(agent_push("jg", late_rank=None), metadata=_auth(), timeout=10)
    assert not resp.HasField("partial_success")
    jl = service.jobs.jobs["jg"]
    assert sorted(jl.ranks) == [0, 1, 2, 3] and jl.max_step == 39
    st = service.grpc_receiver.stats()
    assert st.requests_total == {"OK": 1} and st.points_total > 0 and st.bytes_total > 0
    url = f"http://127.0.0.1:{service.api.port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    got = {tuple(sorted(s.labels.items())): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples
           if s.name == "ringwatch_serve_requests_total"}
    assert got[(("code", "OK"), ("protocol", "grpc"))] == 1


def test_a_missing_or_wrong_token_is_unauthenticated(service):
    channel, stub = _stub(service.grpc_receiver.target)
    with channel:
        for metadata in ((), _auth("wrong"), (("authorization", "s3cret"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Export(agent_push("jx", late_rank=None), metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "jx" not in service.jobs.jobs
    assert service.grpc_receiver.stats().requests_total == {"UNAUTHENTICATED": 3}


def test_collector_batches_and_splits_give_the_same_state_as_direct_pushes(service):
    """A collector's batch processor merges the resources of several agents into one request
    and may split one agent's push across requests; the job's state must not care."""
    direct = Service(ServiceConfig(state_dir=None))
    node_a = agent_push("jb", late_rank=2, steps=range(0, 40))  # late 25-39
    node_b = agent_push("jc", late_rank=None, steps=range(0, 40))
    for req in (node_a, node_b):
        direct.jobs.ingest(req, WALL)
    merged = ExportMetricsServiceRequest()
    merged.resource_metrics.extend(list(node_a.resource_metrics[:3])
                                   + list(node_b.resource_metrics)
                                   + list(node_a.resource_metrics[3:]))
    channel, stub = _stub(service.grpc_receiver.target)
    with channel:
        half = len(merged.resource_metrics) // 2
        for part in (merged.resource_metrics[:half], merged.resource_metrics[half:]):
            req = ExportMetricsServiceRequest()
            req.resource_metrics.extend(part)
            stub.Export(req, metadata=_auth(), timeout=10)
    for job in ("jb", "jc"):
        want, got = direct.jobs.jobs[job], service.jobs.jobs[job]
        assert got.steps.keys() == want.steps.keys()
        assert {r: (v.host, v.completed_seq) for r, v in got.ranks.items()} == {
            r: (v.host, v.completed_seq) for r, v in want.ranks.items()}
    changes = service.analyze_once()
    opened = [(c.tracked.job, c.tracked.finding.kind, c.tracked.finding.ranks)
              for c in changes if c.what == "opened"]
    assert opened == [("jb", "straggler", (2,))]


def test_a_failing_handler_is_internal_and_serving_goes_on():
    calls = []

    def handler(req, info):
        calls.append(info)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return 2

    with OtlpGrpcReceiver(handler=handler, port=0) as rcv:
        channel, stub = _stub(rcv.target)
        with channel:
            with pytest.raises(grpc.RpcError) as err:
                stub.Export(agent_push("j", late_rank=None), timeout=10)
            assert err.value.code() == grpc.StatusCode.INTERNAL
            resp = stub.Export(agent_push("j", late_rank=None), timeout=10)
        assert resp.partial_success.rejected_data_points == 2
        st = rcv.stats()
        assert st.requests_total == {"INTERNAL": 1, "OK": 1} and st.handler_errors_total == 1
        assert st.rejected_total == 2
    assert calls[0].remote_addr == "127.0.0.1" and calls[0].content_type == "application/grpc"


def test_a_message_over_the_limit_once_decompressed_is_refused():
    seen = []
    big = agent_push("j", late_rank=None)
    size = big.ByteSize()
    with OtlpGrpcReceiver(handler=lambda r, i: seen.append(r), port=0,
                          max_request_bytes=size // 2) as rcv:
        # On the wire the gzip body is far under the limit: the check is on the message.
        assert len(gzip.compress(big.SerializeToString())) < size // 2
        channel, stub = _stub(rcv.target)
        with channel:
            with pytest.raises(grpc.RpcError) as err:
                stub.Export(big, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stub.Export(agent_push("j", late_rank=None, steps=range(0, 2)), timeout=10)
    assert len(seen) == 1


def test_a_port_in_use_is_an_oserror():
    with OtlpGrpcReceiver(handler=lambda r, i: None, port=0) as rcv:
        with pytest.raises(OSError):
            OtlpGrpcReceiver(handler=lambda r, i: None, port=rcv.port).start()
