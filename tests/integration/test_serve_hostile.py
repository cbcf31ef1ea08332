"""A trial of `ringwatch serve` under attack while it watches a live job.

A real 4-rank straggler job runs on the local cluster, its agent pushing to a real `ringwatch
serve` (``Stack`` of test_serve_live). Meanwhile, on loopback, every hostile input seen in an
earlier trial is replayed against it: a sequence number of 1e300 on an unused group, a step
label of 10**15, a forged rank claiming a step far ahead, NaN and inf values (protobuf and
JSON), a 1 MiB job id, ``Content-Length: -1`` and non-numeric lengths, a 300 MiB body, hundreds
of slow clients on both ports, and many more jobs than ``--max-jobs``.

It must go on: the straggler is found (the right rank); every bad input is answered 4xx, 503
(over the connection cap) or 200 with its bad points counted as rejected, and the service's
own /metrics counts them; its memory and threads stay bounded; no series of an evicted job
remains on /metrics.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import sys
import threading
import time
from pathlib import Path

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families
from test_receiver_fuzz import _send
from test_serve_live import Stack

from jobtools import need_netns, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from pushes import agent_push, merged, rank_push, step_points

CAP = 24  # --max-connections: per HTTP port
READ_TIMEOUT_S = 2
MAX_JOBS = 4
SLOW_CLIENTS = 150  # per port
#: Threads the service may add under attack over what it ran before: a thread per connection
#: on each of its two capped HTTP ports, and a few to spare. Before the attack it runs about
#: 15 (main, two accepting threads, the analysis loop; polars', tokio's and the allocator's
#: pools, whose size follows the machine's cores).
THREADS_ADDED_LIMIT = 2 * CAP + 4
#: The service's resident memory, kB: measured at about 145 MB through this attack; the
#: 300 MiB body it would have read before its limits took it to 693 MB.
RSS_LIMIT_KB = 300_000
PB = "application/x-protobuf"
JS = "application/json"


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(rest.split()[0])
    return out


def _thread_names(pid: int) -> dict[str, int]:
    names: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        names[name] = names.get(name, 0) + 1
    return names


class Sampler(threading.Thread):
    """Samples the service's RSS (kB) and threads every 0.1 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.rss_kb, self.threads = pid, [], []
        self.names: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                st = _proc_status(self.pid)
            except OSError:
                return
            self.rss_kb.append(st["VmRSS"])
            if st["Threads"] > max(self.threads, default=0):
                self.names = _thread_names(self.pid)
            self.threads.append(st["Threads"])


def _post(port: int, body: bytes, ctype: str = PB) -> tuple[int, int]:
    """(HTTP status, rejected points) of one OTLP push."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/v1/metrics", body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        out = resp.read()
    finally:
        conn.close()
    if resp.status != 200 or not out:
        return resp.status, 0
    if ctype == PB:
        return 200, ExportMetricsServiceResponse.FromString(out).partial_success \
            .rejected_data_points
    return 200, int(json.loads(out).get("partialSuccess", {}).get("rejectedDataPoints", 0))


def _get_json(stack: Stack, path: str):
    """A read that retries while the service refuses (503 at the connection cap)."""
    for _ in range(100):
        try:
            return stack.get(path)
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{path}: the service never answered")


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def _metrics(stack: Stack) -> dict[tuple, float]:
    text = _get_json(stack, "/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _bad_points(job: str) -> list:
    pg = {"ringwatch.pg": "0"}
    return [
        ("ringwatch.collective.started_seq", 1e300, {"ringwatch.pg": "unused"}),
        ("ringwatch.collective.completed_seq", math.nan, pg),
        ("ringwatch.step.collective.time", 0.01, {"ringwatch.step": 10 ** 15, **pg}),
        ("ringwatch.step.collective.time", math.inf, {"ringwatch.step": 3, **pg}),
        ("ringwatch.step.collective.io", -math.inf, {"ringwatch.step": 3, **pg}),
        ("ringwatch.rank.log_age", math.nan, {}),
    ]


def _point_attacks(stack: Stack, job: str) -> tuple[list[int], int]:
    """Bad points inside otherwise valid pushes: (statuses, points the service said it
    rejected); each push also carries a valid decoy rank, which must get in."""
    statuses, rejected, expected = [], 0, 0
    bad = rank_push(job, 0, _bad_points(job), host=None)
    forged = rank_push(job, 9, step_points(10 ** 12) + step_points(10 ** 12 + 1))
    huge_id = rank_push("x" * (1 << 20), 0, step_points(1))
    valid = agent_push("decoy-valid", late_rank=None, steps=range(0, 3))
    for req, n_bad in ((merged(bad, valid), 6), (forged, 10), (merged(valid, huge_id), 5)):
        for ctype in (PB, JS):
            body = req.SerializeToString() if ctype == PB else json_format.MessageToJson(
                req).encode()
            status, n = _post(stack.otlp, body, ctype)
            statuses.append(status)
            rejected += n
            expected += n_bad
    assert rejected == expected, (rejected, expected)
    return statuses, rejected


def _framing_attacks(port: int, head: bytes) -> list[int]:
    """Lying or hostile Content-Length values, a 300 MiB body: the statuses answered."""
    out = []
    for length in (b"-1", b"abc", b"1e3", b"314572800", b"99999999999999999999999"):
        out.append(_status(_send(port, head + b"Content-Length: " + length + b"\r\n\r\n",
                                 "read", timeout_s=10)))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # streamed
        answer = b""
        try:
            s.sendall(head + b"Content-Length: 314572800\r\n\r\n")
            for _ in range(300):
                s.sendall(bytes(1 << 20))
        except OSError:
            pass
        try:
            answer = s.recv(4096)
        except OSError:
            pass
    out.append(_status(answer) or 413)  # answered 413; a reset may hide it from us
    return out


def _slow_clients(port: int, head: bytes, n: int) -> list[int]:
    """``n`` clients that send part of a request and stall: the statuses they get."""
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(head[:12])
            socks.append(s)
        except OSError:
            socks.append(None)
    statuses = []
    for s in socks:
        if s is None:
            statuses.append(0)
            continue
        answer = b""
        try:
            s.settimeout(READ_TIMEOUT_S + 5)
            while chunk := s.recv(4096):
                answer += chunk
        except OSError:
            pass
        s.close()
        statuses.append(_status(answer))
    return statuses


def _newer_push(stack: Stack, live: str, seen: int | None) -> int | None:
    """The live job's last push time (ns) if newer than ``seen``."""
    jobs = {j["job"]: j for j in _get_json(stack, "/api/v1/jobs")["jobs"]}
    at = jobs[live]["last_push_ns"]  # KeyError: the live job was evicted
    return at if at != seen else None


def _job_flood(stack: Stack, live: str, n: int) -> list[str]:
    """``n`` decoy jobs with a straggler each, pushed in bursts just after the live job's
    agent pushed, so the live job is never the one silent longest; returns their ids."""
    decoys = [f"decoy-{i:03d}" for i in range(n)]
    burst = MAX_JOBS - 2
    last = None
    for start in range(0, n, burst):
        last = wait_for(lambda seen=last: _newer_push(stack, live, seen), 30,
                        "a push of the live job")
        for job in decoys[start:start + burst]:
            assert _post(stack.otlp, agent_push(job, late_rank=1).SerializeToString()) \
                == (200, 0)
        time.sleep(1.2)  # an analysis round over them
    return decoys


def test_serve_finds_the_straggler_while_attacked(tmp_path):
    need_netns()
    stack = Stack(tmp_path, tmp_path / "run", serve_args=(
        "--max-connections", str(CAP), "--read-timeout-s", str(READ_TIMEOUT_S),
        "--max-jobs", str(MAX_JOBS)))
    sampler = Sampler(stack.serve.pid)
    sampler.start()
    ran: dict = {}

    def job() -> None:
        try:
            ran["truth"], _ = stack.run_cluster(
                "--nproc", "4", "--hosts", "2", "--steps", "150", "--fault", "straggler",
                "--straggler-mode", "work", "--at-step", "30", "--", "--step-sleep-ms", "60")
        except BaseException as exc:  # noqa: B036 - raised again in the test's thread
            ran["error"] = exc

    t0 = time.monotonic()
    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    try:
        live = wait_for(lambda: [j["job"] for j in _get_json(stack, "/api/v1/jobs")["jobs"]
                                 if j["max_step"] >= 5], 90, "the live job's first steps")[0]
        otlp_head = b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: " + PB.encode() \
            + b"\r\n"
        api_head = b"POST /api/v1/control HTTP/1.1\r\nHost: x\r\nContent-Type: " \
            + JS.encode() + b"\r\n"
        marks = [("live", time.monotonic() - t0)]
        threads_before = _proc_status(stack.serve.pid)["Threads"]
        point_statuses, rejected = _point_attacks(stack, live)
        framing = {"otlp": _framing_attacks(stack.otlp, otlp_head),
                   "api": _framing_attacks(stack.api, api_head)}
        marks.append(("points+framing", time.monotonic() - t0))
        decoys = _job_flood(stack, live, 4 * (MAX_JOBS - 2))
        marks.append(("flood", time.monotonic() - t0))
        slow: dict[str, list[int]] = {}
        threads = [threading.Thread(target=lambda k=k, p=p, h=h: slow.__setitem__(
            k, _slow_clients(p, h, SLOW_CLIENTS)))
            for k, p, h in (("otlp", stack.otlp, otlp_head), ("api", stack.api, api_head))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        attack_s = time.monotonic() - t0
        runner.join(240)
        marks.append(("job done", time.monotonic() - t0))
        assert "error" not in ran, ran.get("error")
        truth = ran["truth"]
        found = wait_for(lambda: [
            t["finding"] for t in _get_json(stack, f"/api/v1/findings?job={live}")["findings"]
            if t["finding"]["kind"] == "straggler" and t["finding"]["ranks"] == [truth["rank"]]],
            30, "the straggler")
        marks.append(("found", time.monotonic() - t0))
        metrics = _metrics(stack)
        held = {j["job"] for j in _get_json(stack, "/api/v1/jobs")["jobs"]}
    finally:
        sampler.stop.set()
        stack.stop()
    print(f"\nattack {attack_s:.1f} s; RSS max {max(sampler.rss_kb)} kB, threads max "
          f"{max(sampler.threads)} (before {threads_before}) {sampler.names}; slow clients "
          f"{[(k, sorted(set(v))) for k, v in slow.items()]}; at {marks}")

    # the straggler is found, the right rank, in the right job, from its onset (another rank
    # starved of CPU by the attack on this small machine may show as well; it is not asked
    # about)
    assert truth["job_id"] == live
    assert any(truth["onset_step"] - 2 <= (f["since_step"] if f["since_step"] is not None
                                           else -99) <= truth["onset_step"] + 5
               for f in found), (truth, found)
    assert metrics[("ringwatch_serve_analysis_errors_total", ())] == 0

    # bad points: 200 with each counted; framing: 4xx; slow clients: 408 or 503
    assert set(point_statuses) == {200}
    assert metrics[("ringwatch_serve_rejected_points_total", ())] >= rejected
    for port, got in framing.items():
        assert got == [400, 400, 400, 413, 413, 413], (port, got)
    assert metrics[("ringwatch_serve_requests_total", (("code", "400"), ("protocol", "http")))] \
        == 3
    assert metrics[("ringwatch_serve_requests_total", (("code", "413"), ("protocol", "http")))] \
        == 3
    assert metrics[("ringwatch_serve_api_requests_total", (("code", "400"),))] == 3
    assert metrics[("ringwatch_serve_api_requests_total", (("code", "413"),))] == 3
    for port, got in slow.items():
        assert set(got) <= {408, 503}, (port, sorted(set(got)))
        assert got.count(503) >= SLOW_CLIENTS - CAP, (port, got.count(503))
        server = "otlp_http" if port == "otlp" else "api"
        assert metrics[("ringwatch_serve_connections_refused_total",
                        (("server", server),))] >= got.count(503)
        assert metrics[("ringwatch_serve_request_timeouts_total",
                        (("server", server),))] >= got.count(408)

    # bounded: memory and threads
    assert max(sampler.rss_kb) < RSS_LIMIT_KB, max(sampler.rss_kb)
    assert max(sampler.threads) <= threads_before + THREADS_ADDED_LIMIT, (
        threads_before, max(sampler.threads), sampler.names)

    # eviction: nothing of an evicted job on /metrics
    assert live in held and len(held) <= MAX_JOBS
    evicted = set(decoys) - held
    assert len(evicted) >= len(decoys) - MAX_JOBS
    assert metrics[("ringwatch_serve_jobs_evicted_total", ())] >= len(evicted)
    on_metrics = {dict(labels)["job"] for _, labels in metrics if "job" in dict(labels)}
    assert on_metrics <= held, on_metrics - held
    assert not any("x" * 300 in j for j in on_metrics | held)
