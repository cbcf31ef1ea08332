"""Both HTTP ports of `ringwatch serve` (OTLP/HTTP and the API) under hostile clients: a cap on
connections (503 past it, counted, threads bounded), a deadline per request (408, counted),
Content-Length checked before any body byte is read; tokens from a file or the environment,
read authentication on GETs, and an operator's resolve that survives a restart at once."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from ringwatch._cli import build_parser
from ringwatch._cli import main as cli_main
from ringwatch._config import ConfigError, read_secret
from ringwatch.service._api import ApiServer
from ringwatch.service._receiver import OtlpReceiver
from ringwatch.service._service import Service, ServiceConfig
from ringwatch.service._store import FindingsStore

from pushes import WALL, agent_push

TIMEOUT_S = 0.8  # the servers' read timeout in these tests
CAP = 3


def _otlp():
    rcv = OtlpReceiver(handler=lambda req, info: 0, port=0, max_connections=CAP,
                       read_timeout_s=TIMEOUT_S).start()
    return rcv, rcv, rcv.port, b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\n" \
        b"Content-Type: application/x-protobuf\r\n"


def _api():
    api = ApiServer(Service(ServiceConfig(state_dir=None)), port=0, max_connections=CAP,
                    read_timeout_s=TIMEOUT_S).start()
    return api, api, api.port, b"POST /api/v1/control HTTP/1.1\r\nHost: x\r\n" \
        b"Content-Type: application/json\r\n"


@pytest.fixture(params=["otlp", "api"])
def server(request):
    """(server, its counters' owner, port, a POST's head without its length)."""
    made = _otlp() if request.param == "otlp" else _api()
    yield made
    made[0].stop()


def _exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Sends ``data`` on a fresh connection and reads until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _counts(owner) -> tuple[dict, dict]:
    return owner.counters.snapshot()


def _wait(pred, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_over_the_cap_is_503_at_once_counted_and_threads_stay_bounded(server):
    srv, owner, port, head = server
    base = threading.active_count()
    slow = []
    for _ in range(CAP):  # each sends part of a request and stalls
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(head[:10])
        slow.append(s)
    _wait(lambda: srv.active_connections == CAP)
    t0 = time.monotonic()
    refused = [_exchange(port, b"") for _ in range(40)]
    assert time.monotonic() - t0 < 3
    assert all(r.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in r for r in refused)
    assert threading.active_count() <= base + CAP
    by_status, totals = _counts(owner)
    assert totals["refused"] == 40 and by_status[503] == 40
    for s in slow:  # cut at the deadline, with a 408 since part of a request came
        s.settimeout(3)
        assert s.recv(4096).startswith(b"HTTP/1.1 408 ")
        s.close()
    _wait(lambda: srv.active_connections == 0)
    by_status, totals = _counts(owner)
    assert totals["timeouts"] == CAP and by_status[408] == CAP
    ok = _exchange(port, head + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 "), ok


def test_a_client_that_trickles_its_body_is_cut_at_the_deadline(server):
    srv, owner, port, head = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(head + b"Content-Length: 100\r\n\r\n{")
        out = b""
        for _ in range(20):
            try:
                s.sendall(b" ")
            except OSError:
                break
            time.sleep(0.1)
            s.settimeout(0.01)
            try:
                out += s.recv(4096)
            except OSError:
                pass
            if out:
                break
        s.settimeout(3)
        while not out.endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            out += chunk
    assert out.startswith(b"HTTP/1.1 408 "), out
    assert time.monotonic() - t0 < TIMEOUT_S + 1.5
    assert _counts(owner)[1]["timeouts"] == 1


@pytest.mark.parametrize("length,status", [(b"-1", 400), (b"12abc", 400), (b"0x10", 400),
                                           (b"1, 2", 400), (b"314572800", 413),
                                           (b"99999999999999999999999", 413)])
def test_bad_or_huge_content_length_is_refused_before_any_body_byte(server, length, status):
    srv, owner, port, head = server
    t0 = time.monotonic()
    # the promised body never comes: the answer must not wait for it
    out = _exchange(port, head + b"Content-Length: " + length + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 %d " % status), out
    assert b"Connection: close" in out
    assert time.monotonic() - t0 < TIMEOUT_S
    assert _counts(owner)[0][status] == 1


def test_a_huge_body_is_not_read(server):
    srv, owner, port, head = server
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + b"Content-Length: 314572800\r\n\r\n")
        try:
            for _ in range(64):  # 64 MiB, or until the server has closed
                s.sendall(bytes(1 << 20))
                sent += 1 << 20
        except OSError:
            pass
    assert sent < 64 << 20  # the server answered and closed long before
    assert _counts(owner)[0][413] == 1


def test_api_get_with_a_negative_length_and_other_methods():
    api = _api()[0]
    try:
        out = _exchange(api.port, b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 400 ")
        out = _exchange(api.port, b"DELETE /api/v1/control HTTP/1.1\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD, POST" in out
        out = _exchange(api.port, b"POST /api/v1/control HTTP/1.1\r\nContent-Length: 6\r\n"
                                  b"Connection: close\r\n\r\n" + b"[" * 6)
        assert out.startswith(b"HTTP/1.1 400 ")
        body = json.dumps({"thresholds": {"min_stall_s": float("nan")}}).encode()
        out = _exchange(api.port, b"POST /api/v1/control HTTP/1.1\r\nContent-Length: %d\r\n"
                                  b"Connection: close\r\n\r\n" % len(body) + body)
        assert out.startswith(b"HTTP/1.1 400 "), out
    finally:
        api.stop()


# --- tokens --------------------------------------------------------------------------------

def test_tokens_come_from_a_file_or_the_environment(tmp_path):
    f = tmp_path / "token"
    f.write_text("from-file\n")
    names = {"value_var": "T", "file_var": "T_FILE"}
    assert read_secret({}, **names) is None
    assert read_secret({"T": "from-env"}, **names) == "from-env"
    assert read_secret({"T": "from-env", "T_FILE": str(f)}, **names) == "from-file"
    other = tmp_path / "other"
    other.write_text("  flag  ")
    assert read_secret({"T_FILE": str(f)}, file=other, **names) == "flag"
    for bad in ("", "two words", "caf\u00e9"):
        other.write_text(bad)
        with pytest.raises(ConfigError, match="one word of printable ASCII"):
            read_secret({}, file=other, **names)
    with pytest.raises(ConfigError, match="cannot read the token file"):
        read_secret({}, file=tmp_path / "missing", **names)


def test_a_token_on_the_command_line_is_refused(capsys):
    assert cli_main(["status", "--token=refused-anyway"]) == 1
    assert "visible to every local user" in capsys.readouterr().err


def _get(port: int, path: str, token: str | None = None, body: dict | None = None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers,
                                 data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def test_reads_need_a_token_when_asked_and_status_sends_it(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="needs the service's token"):
        ServiceConfig(auth_reads=True)
    svc = Service(ServiceConfig(otlp_listen="127.0.0.1:0", api_listen="127.0.0.1:0",
                                state_dir=None, window_s=3600, token="adm1n",
                                read_token="r3ad")).start()
    try:
        port = svc.api.port
        assert svc.config.auth_reads
        for path in ("/metrics", "/api/v1/findings", "/api/v1/jobs", "/api/v1/control"):
            assert _get(port, path) == 401, path
            assert _get(port, path, "wrong") == 401, path
            assert _get(port, path, "r3ad") == 200, path
            assert _get(port, path, "adm1n") == 200, path
        assert _get(port, "/healthz") == 200
        assert _get(port, "/api/v1/control", "r3ad", {"pause": ["hang"]}) == 401
        assert _get(port, "/api/v1/control", "adm1n", {"pause": ["hang"]}) == 200
        url = f"http://127.0.0.1:{port}"
        monkeypatch.delenv("RINGWATCH_READ_TOKEN", raising=False)
        monkeypatch.delenv("RINGWATCH_TOKEN", raising=False)
        assert cli_main(["status", "--url", url]) == 1
        assert "401" in capsys.readouterr().err
        f = tmp_path / "read-token"
        f.write_text("r3ad\n")
        assert cli_main(["status", "--url", url, "--read-token-file", str(f)]) == 0
        assert "no findings" in capsys.readouterr().out
        monkeypatch.setenv("RINGWATCH_TOKEN", "adm1n")
        assert cli_main(["status", "--url", url, "--resume", "hang"]) == 0
        assert svc.settings()["detectors"]["hang"] is True
    finally:
        svc.stop()


def test_serve_takes_its_tokens_from_files(tmp_path, monkeypatch):
    from ringwatch.service._cli import _tokens

    monkeypatch.delenv("RINGWATCH_TOKEN_FILE", raising=False)
    monkeypatch.setenv("RINGWATCH_TOKEN", "env-token")
    f = tmp_path / "t"
    f.write_text("file-token\n")
    args = build_parser().parse_args(["serve", "--state-dir", "off"])
    assert _tokens(args) == ("env-token", None)
    args = build_parser().parse_args(["serve", "--token-file", str(f), "--auth-reads"])
    assert _tokens(args) == ("file-token", None) and args.auth_reads


# --- durable operator actions ----------------------------------------------------------------

def test_a_resolve_through_the_api_is_on_disk_before_the_answer(tmp_path):
    from ringwatch._clock import FakeClock

    # a clock that stands still: the store's flush interval never passes by itself
    svc = Service(ServiceConfig(otlp_listen="127.0.0.1:0", api_listen="127.0.0.1:0",
                                state_dir=tmp_path, window_s=3600, token="adm1n"),
                  clock=FakeClock(wall_ns=WALL)).start()
    try:
        svc.jobs.ingest(agent_push("j", late_rank=2), WALL)
        svc.analyze_once()
        (t,) = svc.store.current("j")
        code = _get(svc.api.port, f"/api/v1/findings/{t.id}/resolve", "adm1n", {})
        assert code == 200
        # read back as a restarted service would, while this one has flushed nothing since
        (back,) = FindingsStore(tmp_path, flush_interval_s=3600).current("j")
        assert (back.id, back.state) == (t.id, "resolved")
    finally:
        svc.stop()
