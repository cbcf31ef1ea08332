"""OTLP/HTTP metrics codec of the central service: request bodies in, response bodies out.

Decoding uses only the official messages of ``opentelemetry-proto`` (``ParseFromString`` for
``application/x-protobuf``, ``google.protobuf.json_format`` for ``application/json``); nothing
here parses protobuf by hand. Every failure becomes one :class:`RequestError` carrying the HTTP
status to answer: 400 malformed, 413 too large, 415 unsupported media type or encoding.

OTLP/JSON (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding) is the proto3 JSON
mapping with these differences, handled as follows:

- ``traceId`` / ``spanId`` (the exemplars' only bytes fields) are hex strings, not base64:
  converted to bytes before ``json_format`` sees them; a bad hex string is a 400.
- Enums may be integers or names, int64/fixed64 may be numbers or decimal strings, keys may be
  lowerCamelCase or the original snake_case names: ``json_format`` accepts all of these.
- Unknown fields are ignored (``ignore_unknown_fields=True``), as OTLP requires of receivers;
  note that this also makes ``json_format`` ignore unknown *enum names* (the field stays 0).
- Deviations (lenient, documented): a UTF-8 BOM is accepted; ``NaN``/``Infinity`` literals are
  accepted; a top-level value that is not an object is a 400 (``json_format`` alone accepts a
  bare string).

Memory: decompression stops at ``max_decompressed_bytes`` (a zip bomb costs at most that);
a decoded message can take several times its wire size in memory (upb objects, JSON dicts),
so size the limit to the service's memory.
"""

from __future__ import annotations

import base64
import json
import string
import zlib

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from ringwatch.service._http import RequestError

try:  # googleapis-common-protos: a dependency of opentelemetry-exporter-otlp-proto-http
    from google.rpc.status_pb2 import Status as _RpcStatus
except ImportError:  # pragma: no cover - then protobuf error bodies fall back to JSON
    _RpcStatus = None

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_ENCODINGS = {"": "identity", "identity": "identity", "gzip": "gzip", "x-gzip": "gzip",
              "deflate": "deflate"}
_CHUNK = 64 << 10  # compressed bytes fed to zlib per step
_HEX = frozenset(string.hexdigits)
_DATA_KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")
_JSON_DATA_KINDS = ("gauge", "sum", "histogram", "exponentialHistogram", "exponential_histogram",
                    "summary")
# HTTP status -> google.rpc.Code carried in the error body's ``code`` (Status.code is a gRPC
# code, not an HTTP status; the HTTP status is on the status line).
_RPC_CODES = {400: 3, 401: 16, 404: 5, 405: 12, 408: 4, 411: 3, 413: 8, 414: 3, 415: 3, 431: 3,
               500: 13, 501: 12, 503: 14, 505: 12}


def media_type(content_type: str | None) -> str:
    """``PROTOBUF`` or ``JSON`` from a Content-Type header (parameters ignored).

    Raises:
        RequestError: 415 when the media type is missing or neither of the two.
    """
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind not in (PROTOBUF, JSON):
        raise RequestError(415, f"unsupported content type {_short(content_type or 'none')!r};"
                                f" use {PROTOBUF} or {JSON}")
    return kind


def content_coding(content_encoding: str | None) -> str:
    """``identity``, ``gzip`` or ``deflate`` (zlib-wrapped, RFC 9110) from Content-Encoding.

    Raises:
        RequestError: 415 for any other coding, or a list of several codings.
    """
    coding = _ENCODINGS.get((content_encoding or "").strip().lower())
    if coding is None:
        raise RequestError(415, f"unsupported content encoding "
                                f"{_short(content_encoding or '')!r}; use gzip or deflate")
    return coding


def decode_metrics_request(body: bytes, *, content_type: str, content_encoding: str | None,
                           max_decompressed_bytes: int) -> ExportMetricsServiceRequest:
    """Decodes one OTLP/HTTP metrics request body.

    Args:
        body: The body as received (possibly compressed).
        content_type: The Content-Type header (``application/x-protobuf`` or
            ``application/json``, parameters allowed).
        content_encoding: The Content-Encoding header: None/identity, gzip or deflate.
        max_decompressed_bytes: Hard cap on the body after decompression, bytes.

    Returns:
        The decoded ``ExportMetricsServiceRequest``.

    Raises:
        RequestError: 400 malformed body (protobuf, JSON, types, nesting, compressed stream),
            413 larger than ``max_decompressed_bytes``, 415 unsupported type or encoding.
            Never any other exception.
    """
    try:
        kind = media_type(content_type)
        coding = content_coding(content_encoding)
        data = bytes(body) if coding == "identity" else _inflate(
            body, coding, max_decompressed_bytes)
        if len(data) > max_decompressed_bytes:
            raise RequestError(413, f"body of {len(data)} bytes exceeds the limit of "
                                    f"{max_decompressed_bytes} bytes")
        msg = ExportMetricsServiceRequest()
        if kind == PROTOBUF:
            msg.ParseFromString(data)
        else:
            _parse_json(data, msg)
        return msg
    except RequestError:
        raise
    except MemoryError:
        raise RequestError(413, "body too large to decode in memory") from None
    # The boundary of untrusted input: protobuf (DecodeError, upb internals), json
    # (JSONDecodeError, RecursionError, ValueError for huge integers), json_format (ParseError,
    # TypeError, AttributeError on odd shapes) and zlib raise many types; the contract is one
    # RequestError, so whatever the decoders raise on hostile bytes is a malformed request.
    except Exception as exc:  # noqa: BLE001 - map every decoder failure to a 400, see above
        raise RequestError(400, f"malformed {_kind_name(content_type)} body: "
                                f"{type(exc).__name__}: {_short(str(exc))}") from None


def count_points(req: ExportMetricsServiceRequest) -> int:
    """Number of data points in ``req`` (gauge, sum, histogram, exp. histogram, summary)."""
    n = 0
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind in _DATA_KINDS:
                    n += len(getattr(m, kind).data_points)
    return n


def encode_response(kind: str, rejected: int, error_message: str = "") -> bytes:
    """An ``ExportMetricsServiceResponse`` in ``kind`` (PROTOBUF or JSON); ``rejected`` > 0
    sets ``partial_success``."""
    resp = ExportMetricsServiceResponse()
    if rejected > 0:
        resp.partial_success.rejected_data_points = rejected
        resp.partial_success.error_message = error_message
    if kind == PROTOBUF:
        return resp.SerializeToString()
    return json_format.MessageToJson(resp, indent=None).encode()


def encode_error(kind: str | None, status: int, message: str) -> tuple[str, bytes]:
    """(Content-Type, body) of an error answer: a ``google.rpc.Status`` in protobuf when the
    request was protobuf and the message is available, else its JSON form."""
    code = _RPC_CODES.get(status, 2)  # 2 = UNKNOWN
    if kind == PROTOBUF and _RpcStatus is not None:
        return PROTOBUF, _RpcStatus(code=code, message=message).SerializeToString()
    return JSON, json.dumps({"code": code, "message": message}).encode()


def _inflate(body: bytes, coding: str, cap: int) -> bytes:
    """Decompresses ``body`` incrementally, never holding more than ``cap`` + 1 output bytes.
    gzip may hold several members (RFC 1952); trailing bytes after the stream are a 400."""
    wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
    view = memoryview(body)
    out = bytearray()
    d = zlib.decompressobj(wbits)
    pos = 0
    pending: bytes | memoryview = b""
    while True:
        if not pending and pos < len(view):
            pending = view[pos:pos + _CHUNK]
            pos += len(pending)
        piece = d.decompress(pending, cap - len(out) + 1)  # max_length >= 1: 0 means unlimited
        out += piece
        if len(out) > cap:
            raise RequestError(413, f"body decompresses to more than the limit of {cap} bytes")
        pending = d.unconsumed_tail
        if d.eof:
            # What follows the stream: at most one input chunk (unused_data) plus the rest of
            # the body, never copied (a body of many tiny gzip members stays linear).
            pending = d.unused_data
            if not pending and pos >= len(view):
                return bytes(out)
            if coding != "gzip":
                raise RequestError(400, "trailing bytes after the deflate stream")
            d = zlib.decompressobj(wbits)
        elif not piece and not pending and pos >= len(view):
            raise RequestError(400, f"truncated {coding} stream")


def _parse_json(data: bytes, msg: ExportMetricsServiceRequest) -> None:
    obj = json.loads(data.decode("utf-8-sig"))
    if not isinstance(obj, dict):
        raise RequestError(400, "OTLP/JSON body must be a JSON object")
    _hex_ids_to_base64(obj)
    json_format.ParseDict(obj, msg, ignore_unknown_fields=True)


def _hex_ids_to_base64(obj: dict) -> None:
    """Rewrites the exemplars' hex ``traceId``/``spanId`` into the base64 that proto3 JSON
    expects for bytes. Walks only the fixed OTLP path (no recursion); shapes that do not match
    are left for ``json_format`` to refuse."""
    for rm in _items(obj, "resourceMetrics", "resource_metrics"):
        for sm in _items(rm, "scopeMetrics", "scope_metrics"):
            for m in _items(sm, "metrics"):
                for kind in _JSON_DATA_KINDS:
                    data = m.get(kind)
                    if not isinstance(data, dict):
                        continue
                    for dp in _items(data, "dataPoints", "data_points"):
                        for ex in _items(dp, "exemplars"):
                            for key in ("traceId", "trace_id", "spanId", "span_id"):
                                if isinstance(ex.get(key), str):
                                    ex[key] = _hex_to_base64(ex[key], key)


def _items(obj, *keys: str) -> list[dict]:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, list):
            return [v for v in value if isinstance(v, dict)]
    return []


def _hex_to_base64(value: str, key: str) -> str:
    if len(value) % 2 or not _HEX.issuperset(value):
        raise RequestError(400, f"exemplar {key} must be a hex string, got {_short(value)!r}")
    return base64.b64encode(bytes.fromhex(value)).decode("ascii")


def _kind_name(content_type: str | None) -> str:
    try:
        return "JSON" if media_type(content_type) == JSON else "protobuf"
    except RequestError:
        return "request"


def _short(text: str, limit: int = 200) -> str:
    """One line of at most ``limit`` characters (error messages quote hostile input)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."
