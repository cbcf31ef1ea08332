"""The service's OTLP/HTTP metrics receiver: decoding (protobuf, OTLP/JSON, gzip/deflate, every
refusal with its status) and the real HTTP server on loopback, pushed to by the official
``OTLPMetricExporter``."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
import tracemalloc
import zlib

import pytest
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from ringwatch._clock import FakeClock
from ringwatch.service._decode import count_points
from ringwatch.service._receiver import (
    OtlpReceiver,
    RequestError,
    RequestInfo,
    decode_metrics_request,
)

PB = "application/x-protobuf"
JS = "application/json"
CAP = 1 << 20
TRACE_ID = bytes(range(16))
SPAN_ID = bytes(range(8, 16))


def sample_request(seq: int = 0) -> ExportMetricsServiceRequest:
    """One request with a point of each of the five data kinds and an exemplar."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for key, value in (("service.name", "ringwatch-agent"), ("host.name", "node-1")):
        kv = rm.resource.attributes.add(key=key)
        kv.value.string_value = value
    rm.resource.attributes.add(key="seq").value.int_value = seq
    sm = rm.scope_metrics.add()
    sm.scope.name = "ringwatch.agent"
    g = sm.metrics.add(name="gpu_power_watts", unit="W")
    dp = g.gauge.data_points.add(time_unix_nano=1_700_000_000_000_000_000, as_double=250.5)
    ex = dp.exemplars.add(as_double=251.0, trace_id=TRACE_ID, span_id=SPAN_ID)
    ex.time_unix_nano = 1_700_000_000_000_000_001
    s = sm.metrics.add(name="nic_tx_bytes_total")
    s.sum.aggregation_temporality = 2
    s.sum.is_monotonic = True
    s.sum.data_points.add(as_int=(1 << 62) + 7)
    s.sum.data_points.add(as_int=3)
    h = sm.metrics.add(name="step_seconds")
    h.histogram.data_points.add(count=3, sum=1.5, bucket_counts=[1, 2], explicit_bounds=[0.5])
    e = sm.metrics.add(name="collective_seconds")
    e.exponential_histogram.data_points.add(count=2, scale=3, zero_count=1)
    q = sm.metrics.add(name="latency_summary")
    q.summary.data_points.add(count=4, sum=2.0).quantile_values.add(quantile=0.5, value=0.4)
    return req


def otlp_json(req: ExportMetricsServiceRequest) -> dict:
    """OTLP/JSON of ``req``: proto3 JSON with hex trace and span ids."""
    doc = json_format.MessageToDict(req)
    for rm in doc["resourceMetrics"]:
        for sm in rm["scopeMetrics"]:
            for m in sm["metrics"]:
                for dp in m.get("gauge", {}).get("dataPoints", []):
                    for ex in dp.get("exemplars", []):
                        ex["traceId"] = TRACE_ID.hex().upper()
                        ex["spanId"] = SPAN_ID.hex()
    return doc


def decode(body: bytes, ctype: str = PB, encoding: str | None = None, cap: int = CAP):
    return decode_metrics_request(body, content_type=ctype, content_encoding=encoding,
                                  max_decompressed_bytes=cap)


def refused(body: bytes, ctype: str = PB, encoding: str | None = None, cap: int = CAP) -> int:
    with pytest.raises(RequestError) as info:
        decode(body, ctype, encoding, cap)
    assert type(info.value) is RequestError and "\n" not in info.value.message
    return info.value.status


# --- decoding ---------------------------------------------------------------------------------

def test_protobuf_round_trip_and_point_count():
    req = sample_request()
    got = decode(req.SerializeToString(), "application/x-protobuf; charset=binary")
    assert got == req
    assert count_points(got) == 6


@pytest.mark.parametrize("encoding,compress", [("gzip", gzip.compress),
                                               ("deflate", zlib.compress)])
def test_compressed_protobuf(encoding, compress):
    req = sample_request()
    assert decode(compress(req.SerializeToString()), encoding=encoding.upper()) == req


def test_gzip_of_several_members_is_one_body():
    raw = sample_request().SerializeToString()
    body = gzip.compress(raw[:10]) + gzip.compress(raw[10:])
    assert decode(body, encoding="gzip") == sample_request()


def test_otlp_json_with_hex_ids_int_enums_and_int64_strings():
    req = sample_request()
    doc = otlp_json(req)
    sum_ = doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][1]["sum"]
    assert sum_["dataPoints"][0]["asInt"] == str((1 << 62) + 7)  # int64 as a string
    sum_["aggregationTemporality"] = 2  # enum as an int (OTLP/JSON's form)
    sum_["dataPoints"][1]["asInt"] = 3  # int64 as a number
    got = decode(json.dumps(doc).encode(), "application/json; charset=utf-8")
    assert got == req
    ex = got.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points[0].exemplars[0]
    assert (ex.trace_id, ex.span_id) == (TRACE_ID, SPAN_ID)


def test_json_unknown_fields_are_ignored_and_snake_case_accepted():
    doc = {"resourceMetrics": [{"futureField": {"x": [1, 2]}, "scope_metrics": [
        {"metrics": [{"name": "m", "gauge": {"data_points": [{"asDouble": 1.5, "new": 1}]}}]}]}],
           "extra": True}
    got = decode(json.dumps(doc).encode(), JS)
    assert got.resource_metrics[0].scope_metrics[0].metrics[0].name == "m"
    assert count_points(got) == 1


def test_empty_protobuf_body_is_an_empty_request():
    assert decode(b"") == ExportMetricsServiceRequest()


def nested_groups(depth: int) -> bytes:
    """An unknown field 15 holding ``depth`` nested groups (wire types 3/4, no lengths)."""
    return b"\x7b" * depth + b"\x7c" * depth


def nested_array_values(depth: int) -> bytes:
    """A resource attribute whose AnyValue nests ``depth`` ArrayValues (length-delimited)."""
    inner = b""
    for _ in range(depth):  # AnyValue.array_value (5) -> ArrayValue.values (1) -> AnyValue
        inner = _ld(1, _ld(5, inner))
    kv = _ld(1, b"k") + _ld(2, _ld(5, inner))
    return _ld(1, _ld(1, _ld(1, kv)))  # request.resource_metrics.resource.attributes


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_moderate_protobuf_nesting_still_decodes():
    assert len(decode(nested_groups(50)).resource_metrics) == 0  # kept as an unknown field
    assert decode(nested_array_values(20)).resource_metrics[0].resource.attributes[0].key == "k"


def _wrong_type_json() -> bytes:
    return b'{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":{"no":1}}]}]}]}'


@pytest.mark.parametrize("body,ctype,encoding,status", [
    (b"\xff\xff\xff\xff", PB, None, 400),
    (sample_request().SerializeToString()[:-1], PB, None, 400),
    (_ld(1, b"\xff" * 10), PB, None, 400),
    (b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", PB, None, 400),  # 2**64-ish length
    (nested_groups(100_000), PB, None, 400),
    (nested_array_values(2_000), PB, None, 400),
    (_wrong_type_json(), JS, None, 400),
    (b'{"resourceMetrics": "x"}', JS, None, 400),
    (b'"a bare string"', JS, None, 400),
    (b"[1, 2]", JS, None, 400),
    (b'{"resourceMetrics": [', JS, None, 400),
    (b'{"resourceMetrics": []}\xff', JS, None, 400),
    (b"[" * 100_000, JS, None, 400),
    (b'{"a":' * 100_000, JS, None, 400),
    (b'{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"sum":{"dataPoints":'
     b'[{"asInt":"99999999999999999999"}]}}]}]}]}', JS, None, 400),
    (b'{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"gauge":{"dataPoints":[{"exemplars"'
     b':[{"traceId":"zz"}]}]}}]}]}]}', JS, None, 400),
    (b'{"x": ' + b"9" * 5000 + b"}", JS, None, 400),
    (b"not gzip at all", PB, "gzip", 400),
    (gzip.compress(b"\x0a\x00")[:-3], PB, "gzip", 400),
    (gzip.compress(b"\x0a\x00") + b"junk", PB, "gzip", 400),
    (zlib.compress(b"\x0a\x00") + b"junk", PB, "deflate", 400),
    (b"\x0a\x00", "text/plain", None, 415),
    (b"\x0a\x00", "", None, 415),
    (b"\x0a\x00", "application/protobuf", None, 415),
    (b"\x0a\x00", PB, "br", 415),
    (b"\x0a\x00", PB, "gzip, gzip", 415),
    (bytes(CAP + 1), PB, None, 413),
    (gzip.compress(bytes(CAP + 1)), PB, "gzip", 413),
])
def test_every_refusal_is_one_request_error(body, ctype, encoding, status):
    assert refused(body, ctype, encoding) == status


def test_deep_json_inside_an_any_value_is_refused():
    value: dict = {"intValue": "1"}
    for _ in range(150):
        value = {"arrayValue": {"values": [value]}}
    doc = {"resourceMetrics": [{"resource": {"attributes": [{"key": "k", "value": value}]}}]}
    assert refused(json.dumps(doc).encode(), JS) == 400


def gzip_of_zeros(mib: int) -> bytes:
    """A gzip stream of ``mib`` MiB of zeros, built in constant memory and time: after a full
    flush the compressor's output for the same input repeats, so one block is reused."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert block == c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    last = c.compress(zeros) + c.flush()  # the same block, then the stream's end and trailer
    body = first + block * (mib - 2) + last
    return body[:-8] + crc.to_bytes(4, "little") + ((mib << 20) & 0xFFFFFFFF).to_bytes(4, "little")


def test_gzip_of_zeros_is_a_valid_stream():
    assert gzip.decompress(gzip_of_zeros(5)) == bytes(5 << 20)


def test_gzip_bomb_is_refused_quickly_within_the_cap():
    bomb = gzip_of_zeros(1024)  # 1 GiB of zeros
    assert len(bomb) < 2 << 20
    cap = 4 << 20
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        status = refused(bomb, PB, "gzip", cap)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413
    assert elapsed < 2.0
    assert peak < 3 * cap, peak


# --- the HTTP server --------------------------------------------------------------------------

class Recorder:
    """A metrics handler that keeps what it gets and answers a set rejected count."""

    def __init__(self, rejected: int | None = None, fail: BaseException | None = None):
        self.seen: list[tuple[ExportMetricsServiceRequest, RequestInfo]] = []
        self.rejected = rejected
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, req, info):
        with self.lock:
            self.seen.append((req, info))
            fail, self.fail = self.fail, None
        if fail is not None:
            raise fail
        return self.rejected


def post(rcv: OtlpReceiver, body: bytes, headers: dict | None = None, *, method="POST",
         path: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", rcv.port, timeout=10)
    try:
        conn.request(method, path or rcv.path, body=body, headers={"Content-Type": PB,
                                                                   **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Sends ``data`` on a fresh connection and reads until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def receiver(recorder):
    with OtlpReceiver(handler=recorder, port=0, read_timeout_s=2,
                      clock=FakeClock(wall_ns=1_700_000_000_000_000_000)) as rcv:
        yield rcv


def _push_with_sdk(url: str, **exporter_kw) -> None:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    exporter = OTLPMetricExporter(endpoint=url, timeout=10, **exporter_kw)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(resource=Resource({"service.name": "ringwatch-agent",
                                                "host.name": "node-7", "ringwatch.gpu": 3}),
                             metric_readers=[reader])
    meter = provider.get_meter("ringwatch.test")
    meter.create_counter("ringwatch_steps_total").add(5, {"rank": 0})
    meter.create_histogram("ringwatch_step_seconds").record(0.25)
    assert provider.force_flush(timeout_millis=10_000)
    provider.shutdown()


def _resource_attrs(req) -> dict:
    return {a.key: getattr(a.value, a.value.WhichOneof("value"))
            for a in req.resource_metrics[0].resource.attributes}


def _metric_names(req) -> set[str]:
    return {m.name for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_official_exporter_push_reaches_the_handler(receiver, recorder, compression):
    from opentelemetry.exporter.otlp.proto.http import Compression

    kw = {"compression": Compression.Gzip} if compression else {}
    _push_with_sdk(receiver.url, **kw)
    req, info = recorder.seen[0]
    assert {"ringwatch_steps_total", "ringwatch_step_seconds"} <= _metric_names(req)
    assert _resource_attrs(req) == {"service.name": "ringwatch-agent", "host.name": "node-7",
                                    "ringwatch.gpu": 3}
    assert info.remote_addr == "127.0.0.1" and info.content_type == PB
    assert info.received_wall_ns == 1_700_000_000_000_000_000
    stats = receiver.stats()
    assert stats.requests_total[200] == len(recorder.seen) >= 1
    assert stats.points_total == sum(count_points(r) for r, _ in recorder.seen) >= 2
    assert stats.bytes_total == sum(i.bytes_received for _, i in recorder.seen) > 0


def test_bearer_token(recorder):
    with OtlpReceiver(handler=recorder, port=0, token="s3cret") as rcv:
        body = sample_request().SerializeToString()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cret\u00e9"}):
            status, hdrs, _ = post(rcv, body, headers)
            assert (status, hdrs["www-authenticate"]) == (401, "Bearer")
        assert recorder.seen == []
        assert post(rcv, body, {"Authorization": "Bearer s3cret"})[0] == 200
        _push_with_sdk(rcv.url, headers={"Authorization": "Bearer s3cret"})
        assert len(recorder.seen) >= 2
        assert rcv.stats().requests_total[401] == 4


def test_oversized_content_length_is_413_without_reading_the_body(recorder):
    with OtlpReceiver(handler=recorder, port=0, max_request_bytes=1000, read_timeout_s=30) as rcv:
        t0 = time.monotonic()
        # Headers only: the promised 10**9 bytes never come, yet the answer is immediate.
        out = raw_exchange(rcv.port, b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Type: application/x-protobuf\r\n"
                                     b"Content-Length: 1000000000\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413 ")
        assert b"Connection: close" in out
        assert time.monotonic() - t0 < 5
        assert rcv.stats().bytes_total == 0


def test_length_is_required_and_must_be_a_number(receiver):
    head = b"POST /v1/metrics HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n"
    assert raw_exchange(receiver.port, head + b"\r\n").startswith(b"HTTP/1.1 411 ")
    assert raw_exchange(receiver.port, head + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                        ).startswith(b"HTTP/1.1 411 ")
    for bad in (b"-1", b"1_0", b"0x10", b"1, 2"):
        out = raw_exchange(receiver.port, head + b"Content-Length: " + bad + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 "), (bad, out)


def test_other_paths_404_other_methods_405(receiver, recorder):
    assert post(receiver, b"", path="/v1/traces")[0] == 404
    assert post(receiver, b"", path="/v1/metricsX")[0] == 404
    for method in ("GET", "PUT", "DELETE", "PROPFIND"):
        status, headers, _ = post(receiver, b"", method=method)
        assert (status, headers["allow"]) == (405, "POST")
    assert post(receiver, b"", path="/v1/metrics?x=1")[0] == 200  # a query does not matter
    assert len(recorder.seen) == 1


def test_handler_exception_is_500_then_serving_goes_on(receiver, recorder):
    recorder.fail = RuntimeError("boom\nsecond line")
    body = sample_request().SerializeToString()
    status, headers, out = post(receiver, body)
    assert status == 500 and headers["content-type"] == PB
    err = Status.FromString(out)
    assert err.code == 13 and err.message == "metrics handler failed (RuntimeError)"
    assert post(receiver, body)[0] == 200
    stats = receiver.stats()
    assert (stats.requests_total[500], stats.requests_total[200]) == (1, 1)
    assert stats.handler_errors_total == 1 and len(recorder.seen) == 2


def test_partial_success_count_in_the_response():
    rec = Recorder(rejected=4)
    with OtlpReceiver(handler=rec, port=0) as rcv:
        status, headers, out = post(rcv, sample_request().SerializeToString())
        assert status == 200 and headers["content-type"] == PB
        resp = ExportMetricsServiceResponse.FromString(out)
        assert resp.partial_success.rejected_data_points == 4
        rec.rejected = 1000  # more than the request held: capped at its 6 points
        out = post(rcv, sample_request().SerializeToString())[2]
        assert ExportMetricsServiceResponse.FromString(out).partial_success \
            .rejected_data_points == 6
        assert rcv.stats().rejected_total == 10
        rec.rejected = None
        assert post(rcv, sample_request().SerializeToString())[2] == b""


def test_json_request_gets_json_response(recorder):
    rec = Recorder(rejected=2)
    with OtlpReceiver(handler=rec, port=0) as rcv:
        body = json.dumps(otlp_json(sample_request())).encode()
        status, headers, out = post(rcv, body, {"Content-Type": JS})
        assert status == 200 and headers["content-type"] == JS
        assert json.loads(out)["partialSuccess"]["rejectedDataPoints"] in (2, "2")
        assert rec.seen[0][0] == sample_request()
        assert rec.seen[0][1].content_type == JS
        status, headers, out = post(rcv, b"{", {"Content-Type": JS})
        assert (status, headers["content-type"]) == (400, JS)
        assert json.loads(out)["code"] == 3


def test_refusals_over_http_carry_status_bodies(receiver, recorder):
    status, headers, out = post(receiver, b"\xff\xff")
    assert status == 400 and Status.FromString(out).code == 3
    status, headers, out = post(receiver, b"x", {"Content-Type": "text/plain"})
    assert (status, headers["content-type"], json.loads(out)["code"]) == (415, JS, 3)
    status, _, out = post(receiver, gzip_of_zeros(1024), {"Content-Encoding": "gzip"})
    assert status == 413 and Status.FromString(out).code == 8
    assert recorder.seen == []
    assert post(receiver, sample_request().SerializeToString())[0] == 200


def test_keep_alive_serves_several_requests_on_one_connection(receiver, recorder):
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("POST", "/v1/metrics", body=sample_request().SerializeToString(),
                         headers={"Content-Type": PB, "Content-Encoding": "identity"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
    finally:
        conn.close()
    assert len(recorder.seen) == 3


def test_slow_client_is_cut_off_at_the_read_timeout(recorder):
    with OtlpReceiver(handler=recorder, port=0, read_timeout_s=0.5) as rcv, \
            socket.create_connection(("127.0.0.1", rcv.port), timeout=5) as s:
        t0 = time.monotonic()
        closed = False
        for byte in b"POST /v1/metrics HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n":
            try:  # one byte every 0.1 s: each recv is quick, the whole request is not
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.monotonic() - t0 > 3:
                break
        if not closed:
            s.settimeout(1)
            try:
                closed = s.recv(100) == b""
            except OSError:
                closed = True
        assert closed and time.monotonic() - t0 < 3


def test_start_stop_and_bad_configuration(recorder):
    rcv = OtlpReceiver(handler=recorder, port=0).start()
    port = rcv.port
    assert port != 0 and rcv.url == f"http://127.0.0.1:{port}/v1/metrics"
    with pytest.raises(RuntimeError):
        rcv.start()
    rcv.stop()
    rcv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with pytest.raises(ValueError):
        OtlpReceiver(handler=recorder, path="v1/metrics")
    with pytest.raises(ValueError):
        OtlpReceiver(handler=recorder, read_timeout_s=0)
