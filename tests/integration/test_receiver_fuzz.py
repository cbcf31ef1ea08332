"""Hostile input against the service's OTLP/HTTP receiver.

1. ≥100,000 seeded hostile bodies through ``decode_metrics_request``: every outcome is a decoded
   request or a ``RequestError`` with status 400, 413 or 415, never another exception.
2. Over real HTTP: ~2,000 hostile requests (garbage, bad headers, truncated bodies, wrong
   lengths, resets, stalls) while a valid pusher sends every 50 ms: every valid push is a 200
   the handler saw, and the server is still up at the end.

A failure prints the seed and input index: rerun with the same ``SEED`` to reproduce.
"""

from __future__ import annotations

import gzip
import http.client
import json
import random
import socket
import struct
import threading
import time
import zlib
from collections import Counter

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from ringwatch.service._receiver import OtlpReceiver, RequestError, decode_metrics_request

SEED = 20260523
N_INPUTS = 100_000
CAP = 64 << 10  # small, so the 413 path is reached by small inputs
PB = "application/x-protobuf"
JS = "application/json"


def valid_request(seq: int = 0) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.add(key="service.name").value.string_value = "ringwatch-agent"
    rm.resource.attributes.add(key="pusher.seq").value.int_value = seq
    arr = rm.resource.attributes.add(key="list").value.array_value
    arr.values.add().bool_value = True
    arr.values.add().kvlist_value.values.add(key="k").value.double_value = 1.5
    sm = rm.scope_metrics.add()
    sm.scope.name = "ringwatch.agent"
    g = sm.metrics.add(name="gpu_power_watts", unit="W")
    dp = g.gauge.data_points.add(time_unix_nano=1_700_000_000_000_000_000, as_double=250.5)
    dp.attributes.add(key="gpu").value.int_value = 3
    dp.exemplars.add(as_int=7, trace_id=bytes(range(16)), span_id=bytes(8))
    s = sm.metrics.add(name="nic_tx_bytes_total")
    s.sum.aggregation_temporality = 2
    s.sum.data_points.add(as_int=1 << 40)
    h = sm.metrics.add(name="step_seconds")
    h.histogram.data_points.add(count=3, sum=1.5, bucket_counts=[1, 2], explicit_bounds=[0.5])
    e = sm.metrics.add(name="collective_seconds")
    e.exponential_histogram.data_points.add(count=2, scale=3).positive.bucket_counts.extend([1])
    sm.metrics.add(name="lat").summary.data_points.add(count=1).quantile_values.add(value=1.0)
    return req


VALID_PB = valid_request().SerializeToString()
VALID_JSON = json.dumps({"resourceMetrics": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "x"}},
                                {"key": "l", "value": {"arrayValue": {"values": [
                                    {"intValue": "5"}, {"kvlistValue": {"values": []}}]}}}]},
    "scopeMetrics": [{"scope": {"name": "s"}, "metrics": [
        {"name": "g", "unit": "W", "gauge": {"dataPoints": [
            {"asDouble": 1.5, "timeUnixNano": "1700000000000000000",
             "exemplars": [{"asInt": 3, "traceId": "0102030405060708090a0b0c0d0e0f10",
                            "spanId": "0102030405060708"}]}]}},
        {"name": "c", "sum": {"aggregationTemporality": 2, "isMonotonic": True,
                              "dataPoints": [{"asInt": "42", "attributes": []}]}},
        {"name": "h", "histogram": {"dataPoints": [
            {"count": "3", "bucketCounts": ["1", 2], "explicitBounds": [0.5]}]}}]}]}]})
WRONG_VALUES = [None, True, 1, -1, 1.5, "x", "", [], [1], {}, {"a": 1}, "1e999", 2 ** 70,
                "NaN", "-Infinity", "zz", [[[]]], {"stringValue": 1}]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def g_random(rng: random.Random):
    n = rng.choice((rng.randrange(8), rng.randrange(64), rng.randrange(512)))
    return rng.randbytes(n), rng.choice((PB, PB, JS)), None


def g_valid(rng: random.Random):
    if rng.random() < 0.5:
        return VALID_PB, PB, None
    return VALID_JSON.encode(), JS, None


def g_truncated(rng: random.Random):
    body = VALID_PB if rng.random() < 0.7 else VALID_JSON.encode()
    return body[:rng.randrange(len(body))], PB if body is VALID_PB else JS, None


def g_bitflip(rng: random.Random):
    body = bytearray(VALID_PB)
    for _ in range(rng.randint(1, 8)):
        body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
    return bytes(body), PB, None


def g_splice(rng: random.Random):
    body = bytearray(VALID_PB)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(body) + 1)
        op = rng.randrange(3)
        if op == 0:
            body[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 1:
            del body[i:i + rng.randint(1, 16)]
        else:
            j = rng.randrange(len(body) + 1)
            body[i:i] = body[min(i, j):max(i, j)][:256]
    return bytes(body), PB, None


def g_huge_varint(rng: random.Random):
    kind = rng.randrange(5)
    if kind == 0:  # a length prefix far beyond the body
        body = b"\x0a" + _varint(rng.choice((1 << 31, 1 << 63, (1 << 64) - 1, 10 ** 9)))
    elif kind == 1:  # an over-long varint (more than 10 bytes)
        body = b"\x0a" + b"\xff" * rng.randint(10, 20) + b"\x01"
    elif kind == 2:  # a huge field number and wire type mix
        body = _varint(rng.randrange(1, 1 << 35)) + rng.randbytes(rng.randrange(16))
    elif kind == 3:  # a data point's packed bucket_counts claiming more than is there
        packed = _varint(4 << 3 | 2) + _varint(rng.choice((1 << 20, 1 << 40))) + b"\x01" * 8
        body = _ld(1, _ld(2, _ld(2, _ld(7, _ld(1, packed)))))
    else:  # a valid value with the largest varints
        body = _ld(1, _ld(2, _ld(2, _ld(7, _ld(1, b"\x18" + b"\xff" * 9 + b"\x01")))))
    return VALID_PB + body if rng.random() < 0.5 else body, PB, None


def g_huge_repeated(rng: random.Random):
    """Valid messages with many repeated elements (empty data points, packed counts)."""
    n = rng.choice((1_000, 5_000, 20_000))
    if rng.random() < 0.5:
        metric = _ld(1, b"m") + _ld(5, b"\x0a\x00" * n)  # gauge with n empty data points
    else:  # one histogram point with n packed bucket counts
        metric = _ld(9, _ld(1, _ld(6, b"\x01" * n)))
    return _ld(1, _ld(2, _ld(2, metric))), PB, None


def _json_doc() -> dict:
    return json.loads(VALID_JSON)


def _containers(node, out: list) -> list:
    if isinstance(node, dict):
        out.extend((node, k) for k in node)
        for v in node.values():
            _containers(v, out)
    elif isinstance(node, list):
        out.extend((node, i) for i in range(len(node)))
        for v in node:
            _containers(v, out)
    return out


def g_json_wrong_type(rng: random.Random):
    doc = _json_doc()
    slots = _containers(doc, [])
    for _ in range(rng.randint(1, 3)):
        parent, key = rng.choice(slots)
        try:
            parent[key] = rng.choice(WRONG_VALUES)
        except (IndexError, KeyError):
            pass
    return json.dumps(doc).encode(), JS, None


def g_json_mutation(rng: random.Random):
    text = bytearray(VALID_JSON.encode())
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(text))
        op = rng.randrange(3)
        if op == 0:
            del text[i:i + rng.randint(1, 4)]
        elif op == 1:
            text[i:i] = rng.choice((b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"0",
                                    b"-", b"e", b"\xff", b"\x00", b"null", b"1" * 40))
        else:
            text[i] = rng.randrange(256)
    return bytes(text), JS, None


def g_json_deep(rng: random.Random):
    depth = rng.choice((50, 99, 101, 200, 1_000, 5_000, 20_000))
    kind = rng.randrange(3)
    if kind == 0:
        return b"[" * depth, JS, None
    if kind == 1:
        return b'{"resourceMetrics":' * depth + b"[]" + b"}" * depth, JS, None
    value = '{"intValue":"1"}'
    depth = min(depth, 400)
    for _ in range(depth):
        value = '{"arrayValue":{"values":[' + value + "]}}"
    return ('{"resourceMetrics":[{"resource":{"attributes":[{"key":"k","value":' + value
            + "}]}}]}").encode(), JS, None


def g_proto_deep(rng: random.Random):
    depth = rng.choice((50, 101, 1_000, 30_000))
    if rng.random() < 0.5:  # nested groups of an unknown field
        return b"\x7b" * depth + b"\x7c" * rng.choice((depth, depth // 2)), PB, None
    inner = b""
    for _ in range(min(depth, 300)):  # nested AnyValue.array_value
        inner = _ld(1, _ld(5, inner))
    return _ld(1, _ld(1, _ld(1, _ld(1, b"k") + _ld(2, inner)))), PB, None


def g_compressed(rng: random.Random):
    coding = rng.choice(("gzip", "deflate"))
    compress = gzip.compress if coding == "gzip" else zlib.compress
    kind = rng.randrange(5)
    if kind == 0:
        body = compress(VALID_PB)
    elif kind == 1:  # a small bomb: just over the cap
        body = compress(bytes(CAP + rng.randint(1, 4096)))
    elif kind == 2:
        body = compress(VALID_PB)[:rng.randrange(8, 40)]
    elif kind == 3:
        b = bytearray(compress(VALID_PB))
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        body = bytes(b)
    else:
        body = compress(VALID_PB) + rng.randbytes(rng.randint(1, 8))
    return body, PB, rng.choice((coding, coding.upper()))


def g_headers(rng: random.Random):
    ctype = rng.choice(("", "text/plain", "application/protobuf", "application/json5",
                        "application/x-protobuf;", " APPLICATION/JSON ", "multipart/form-data",
                        "\x00", "application/x-protobuf, application/json"))
    encoding = rng.choice((None, "", "identity", "br", "zstd", "gzip;q=1", "compress", "\xff"))
    return VALID_PB, ctype, encoding


GENERATORS = [  # (generator, weight)
    (g_random, 20), (g_valid, 5), (g_truncated, 12), (g_bitflip, 15), (g_splice, 10),
    (g_huge_varint, 6), (g_huge_repeated, 0.5), (g_json_wrong_type, 8), (g_json_mutation, 12),
    (g_json_deep, 2), (g_proto_deep, 2), (g_compressed, 5), (g_headers, 3),
]


def test_decoder_survives_100k_hostile_inputs():
    rng = random.Random(SEED)
    gens = [g for g, _ in GENERATORS]
    weights = [w for _, w in GENERATORS]
    outcomes: Counter = Counter()
    failures = []
    t0 = time.perf_counter()
    for i in range(N_INPUTS):
        gen = rng.choices(gens, weights)[0]
        body, ctype, encoding = gen(rng)
        try:
            req = decode_metrics_request(body, content_type=ctype, content_encoding=encoding,
                                         max_decompressed_bytes=CAP)
            assert isinstance(req, ExportMetricsServiceRequest)
            outcomes[gen.__name__, "ok"] += 1
        except RequestError as err:
            outcomes[gen.__name__, err.status] += 1
            if err.status not in (400, 413, 415) or "\n" in err.message:
                failures.append((i, gen.__name__, err.status, err.message, body[:80]))
        except BaseException as exc:  # the point of the test: nothing else may escape
            failures.append((i, gen.__name__, type(exc).__name__, str(exc)[:200], body[:80]))
    elapsed = time.perf_counter() - t0
    print(f"\n{N_INPUTS} hostile inputs in {elapsed:.1f} s (seed {SEED}): "
          f"{dict(sorted(outcomes.items(), key=str))}")
    assert not failures, f"seed {SEED}: {len(failures)} bad outcomes, first: {failures[:5]}"
    statuses = Counter(status for (_, status) in outcomes.elements())
    assert all(statuses[s] > 0 for s in ("ok", 400, 413, 415)), statuses
    assert sum(statuses.values()) == N_INPUTS
    assert elapsed < 60, f"{N_INPUTS} inputs took {elapsed:.1f} s"


# --- over HTTP --------------------------------------------------------------------------------

def _send(port: int, data: bytes, mode: str, *, stalled: list | None = None,
          timeout_s: float = 2) -> bytes:
    """One hostile connection: send ``data`` then close, reset, read, or stall; returns what
    the server answered in ``read`` mode (b"" otherwise, or when it reset)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    except OSError:
        return b""
    answer = b""
    try:
        if mode == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(data)
        if mode == "stall" and stalled is not None:
            stalled.append(s)
            return b""
        if mode == "read":
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                answer += chunk
    except OSError:
        pass
    s.close()
    return answer


def _hostile(rng: random.Random, port: int, stalled: list) -> None:
    head = b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
    body = rng.choice((VALID_PB, rng.randbytes(rng.randrange(300)), b"[" * 5000))
    kind = rng.randrange(10)
    if kind == 0:
        data = rng.randbytes(rng.randint(1, 2000))
    elif kind == 1:
        data = rng.choice((b"GARBAGE\r\n\r\n", b"POST\r\n\r\n", b"POST / HTTP/9.9\r\n\r\n",
                           b"\xff\xfe / HTTP/1.1\r\n\r\n", b"POST /v1/metrics HTTP/1.1\r\n"
                           b"no colon here\r\n\r\n", b"GET " + b"a" * 70_000 + b" HTTP/1.1\r\n",
                           head + b"X: " + b"y" * 70_000 + b"\r\n\r\n",
                           head + b"".join(b"H%d: v\r\n" % i for i in range(150)) + b"\r\n",
                           b"POST /v1/metrics HTTP/1.1\r\nContent-Length: 5\r\n"
                           b"Content-Length: 6\r\n\r\nabcdef"))
    elif kind == 2:  # lying Content-Length values
        data = head + rng.choice((b"Content-Length: -1", b"Content-Length: 1e3",
                                  b"Content-Length: 99999999999999999999999",
                                  b"Content-Length: \xff", b"Transfer-Encoding: chunked")) \
            + b"\r\n\r\n" + body
    elif kind == 3:  # a truncated body, then the client goes away
        data = head + b"Content-Length: %d\r\n\r\n" % (len(body) + 50) + body
    elif kind == 4:  # a body longer than announced: the rest reads as the next request
        data = head + b"Content-Length: %d\r\n\r\n" % (len(body) // 2) + body
    elif kind == 5:  # well framed, hostile content
        enc = rng.choice((b"", b"Content-Encoding: gzip\r\n", b"Content-Encoding: br\r\n"))
        data = head + enc + b"Content-Length: %d\r\n\r\n" % len(body) + body
    elif kind == 6:  # a small gzip bomb (decompresses past the cap)
        bomb = gzip.compress(bytes(1 << 20), 1)
        data = head + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb
    elif kind == 7:  # cut anywhere in headers or body
        full = head + b"Content-Length: %d\r\n\r\n" % len(VALID_PB) + VALID_PB
        data = full[:rng.randrange(len(full))]
    elif kind == 8:  # too large, announced
        data = head + b"Content-Length: 100000000\r\n\r\n" + body
    else:  # other methods and paths
        data = rng.choice((b"GET", b"DELETE", b"POST", b"BREW")) + b" " + \
            rng.choice((b"/v1/metrics", b"/", b"/v1/traces", b"*", b"//%00")) + \
            b" HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    mode = rng.choice(("close", "rst", "read", "read"))
    if kind == 7 and len(stalled) < 20 and rng.random() < 0.2:
        mode = "stall"  # holds a server thread until the read timeout
    _send(port, data, mode, stalled=stalled)


def _push(port: int, seq: int) -> int | str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/metrics", body=valid_request(seq).SerializeToString(),
                     headers={"Content-Type": PB})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def test_valid_pushes_get_through_while_hostile_clients_hammer():
    seen: set[int] = set()
    lock = threading.Lock()

    def handler(req, info):
        for rm in req.resource_metrics:
            for a in rm.resource.attributes:
                if a.key == "pusher.seq" and info.content_type == PB:
                    with lock:
                        seen.add(a.value.int_value)

    results: list[tuple[int, int | str]] = []
    stop = threading.Event()
    with OtlpReceiver(handler=handler, port=0, read_timeout_s=1.0, max_request_bytes=1 << 16,
                      max_decompressed_bytes=1 << 18) as rcv:
        def pusher():
            seq = 1_000_000
            while not stop.is_set():
                results.append((seq, _push(rcv.port, seq)))
                seq += 1
                stop.wait(0.05)

        t = threading.Thread(target=pusher, daemon=True)
        t.start()
        rng = random.Random(SEED)
        stalled: list[socket.socket] = []
        t0 = time.perf_counter()
        for _ in range(2_000):
            _hostile(rng, rcv.port, stalled)
        elapsed = time.perf_counter() - t0
        stop.set()
        t.join(timeout=30)
        for s in stalled:
            s.close()
        final = _push(rcv.port, 7)
        stats = rcv.stats()
    print(f"\n2000 hostile requests in {elapsed:.1f} s beside {len(results)} valid pushes; "
          f"answers {dict(sorted(stats.requests_total.items()))}")
    bad = [(seq, status) for seq, status in results if status != 200]
    assert not bad, bad[:10]
    assert len(results) >= 10
    assert {seq for seq, _ in results} <= seen
    assert final == 200
    assert stats.requests_total[200] >= len(results) + 1
    assert sum(n for code, n in stats.requests_total.items() if code >= 400) >= 1_000
