"""Ingest throughput of one ``ringwatch serve``: OTLP pushes of N simulated nodes, as fast as
the service takes them, and what its analysis loop makes of the job meanwhile.

    .venv/bin/python benchmarks/serve_ingest.py                 # 64-1024 ranks, 3 runs, ~11 min
    .venv/bin/python benchmarks/serve_ingest.py --quick         # smoke run, ~30 s
    .venv/bin/python benchmarks/serve_ingest.py --json out.json # also save every number

Method
------
Pushes (built once per job size, before anything is timed). Each simulated node runs the
agent's own code path from its state to the wire: a :class:`NodeState` holding, per rank, a
:class:`RankSummary` (per-(group, op) totals, sequence frontier, step, log age) with the
:class:`StepTotals` of its last finished steps, plus by default the node's 8 GPUs and its host
reading (synthetic values, the shapes of ``collectors/_synthetic.py``), turned into points by
``agent._points.collect_points``, into the SDK's ``MetricsData`` by
``agent._otlp_export.metrics_data`` and into bytes by the SDK's ``encode_metrics`` ->
``SerializeToString()``: what ``OtlpPusher`` posts. The job has ``--ranks-per-node`` (8) ranks
per node and two groups per rank, each with its own process-group name as torch gives them: a
tensor-parallel group of the node's ranks (``0-7``) and a data-parallel group of the ranks with
the same local rank on every node (``3,11,19,...``: strided, so its compact form grows with the
node count; the agent sends it on a group's first step gauge of each push). A step lasts
``--step-s`` (0.5 s): each rank runs the tp group's 4 collectives early in the step and the dp
group's 4 buckets near its end, with a per-(rank, step) jitter that is the same in every push,
so every node tells the same story about the same step. As the agent does (``steps_after``),
a push carries only the finished steps not delivered yet: ``--push-interval-s / --step-s`` of
them (2 by default: the live tests' 1 s pushes), at most ``PUSH_STEPS`` (32).

Each node gets a pool of ``--pool`` pushes one push interval apart. The senders go through the
job in rounds, every node once per round, round ``r`` carrying the steps of the ``r``-th push
interval, so the service sees new steps all along: round ``r`` sends pool entry ``r mod pool``
with its step labels moved on by whole pool periods. The labels are fixed-width strings (the job
is at step 100,000+), so the move rewrites their digits in place in the encoded bytes (positions
found once; one vectorised write, well under a millisecond a push); the other values of the
entry (times, counters, sequence numbers) repeat from period to period. Before the timed part
every node sends catch-up pushes of 32 new steps each (what an agent sends after an outage)
until the service holds ``--prefill-steps`` (200: the service's ``keep_steps``) steps of every
rank, so the analysis is timed on a job in its steady state.

Load. The service runs in its own process, as deployed:
``python -m ringwatch._cli serve --otlp-listen 127.0.0.1:P --listen 127.0.0.1:Q --state-dir off
--window-s 1``, a fresh one for every run. ``--senders`` threads (4) each keep one HTTP/1.1
connection (``http.client.HTTPConnection``) and post the next (round, node) push as soon as the
previous answer is in (closed loop) for ``--seconds`` (20, after ``--warmup-s``). Every answer
must be 200 (else the exit status is 2).

Measurements, all from the service itself: accepted requests/s (``ringwatch_serve_requests_total
{code="200"}``) and data points/s (``ringwatch_serve_points_total``) over the timed span; the
service process's CPU (user + system from ``/proc/<pid>/stat``, all its threads) as a share of
one core, and the points per CPU-second it implies; the analysis, scraped every 0.25 s:
``ringwatch_serve_analysis_seconds{job}`` (the analyzers' part of a round, one value per round)
and ``ringwatch_serve_analysis_lag_seconds``. A round first takes a deep copy of the job's state
(``Jobs.snapshot``), which that gauge leaves out, so the whole round is read from the rounds
counter: a round starts ``window_s`` after the previous one ended, so it took the interval
between two ends minus ``window_s``. After the timed span the senders stop and the rounds are
timed again on the same state with no ingest competing for the interpreter (``idle``; scraped
every 50 ms, at least 3 rounds or 6 s, 2 rounds after 20 s), along with the service's CPU
seconds per idle round: the round's cost, whatever else runs on the machine (the wall times
spread with the load of a shared machine; this one hardly does). A scrape that fails is
retried (counted in ``failed_scrapes``).

Derived: ranks per instance at the default window. A rank sends ``P = fixed + per_step x new
steps`` points per push (both measured on the pool: the rank's counters and frontier plus its
share of the node's GPU/host/agent series, and 5 gauges x 2 groups per step), every push
interval ``I`` (the agent's default 10 s; the live tests use 1 s), ``I / step-s`` new steps. One
instance carries ``min(ingest points/s / (P / I), R_window)`` ranks, where ingest is the median
points/s over the sizes and ``R_window`` is the job size at which a whole idle round reaches
``window_s``, interpolated between the two measured sizes around it on a log-log scale (else
extrapolated along a least-squares line through all sizes). The same size by the idle round's
CPU time and by the round under full ingest are printed beside it. The ingest rate is measured
with pushes of ``--push-interval-s``; the mix of step gauges and other points changes with the
interval, so check another interval with that ``--push-interval-s`` (at 10 s: the same points/s,
see ``benchmarks/README.md``).

The benchmark's own process (senders, scrapes) shares the machine: its CPU is printed too, and
the checkout's revision heads the output (the measured code is the working tree's).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ringwatch._schema import format_ranks
from ringwatch.agent._node_state import NodeState
from ringwatch.agent._otlp_export import metrics_data
from ringwatch.agent._points import PUSH_STEPS, collect_points
from ringwatch.agent._rank_tail import OpTotals, RankSummary, StepTotals

JOB = "bench-job"
STEP0 = 100_000  # first step of the simulated job; labels stay 6 digits wide
DIGITS = 6
_STEP_KEY = re.compile(rb"\x0a\x0eringwatch\.step\x12\x08\x0a\x06(?=\d{6})")
_POW10 = 10 ** np.arange(DIGITS - 1, -1, -1, dtype=np.int64)

TP_OPS = (("all_gather", 2), ("reduce_scatter", 2))  # per step: op, calls
DP_OPS = (("all_reduce", 4),)
TP_BYTES = 16 << 20
DP_BYTES = 25 << 20


# --- the simulated job -------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    nodes: int
    ranks_per_node: int = 8

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    def tp(self, rank: int) -> tuple[str, str, int, int]:
        """(pg name, members, size, rank in group) of the rank's tensor-parallel group."""
        node, local = divmod(rank, self.ranks_per_node)
        first = node * self.ranks_per_node
        return (str(1 + node), format_ranks(range(first, first + self.ranks_per_node)),
                self.ranks_per_node, local)

    def dp(self, rank: int) -> tuple[str, str, int, int]:
        """(pg name, members, size, rank in group) of the rank's data-parallel group."""
        node, local = divmod(rank, self.ranks_per_node)
        members = range(local, self.world, self.ranks_per_node)
        return str(1 + self.nodes + local), format_ranks(members), self.nodes, node


def _jitter(rank: int, step: int, scale_s: float) -> int:
    """Same value for the same (rank, step) on every push, ns."""
    return int(random.Random(step * 1_000_003 + rank).random() * scale_s * 1e9)


def _step_totals(t0_ns: int, step: int, rank: int, step_s: float) -> dict[str, tuple]:
    """Per phase (tp, dp): (count, nbytes, busy ns, first start ns, last end ns)."""
    begin = t0_ns + int((step - STEP0) * step_s * 1e9)
    j = _jitter(rank, step, 0.02 * step_s)
    tp_start = begin + int(0.05 * step_s * 1e9) + j
    tp_busy = int(0.10 * step_s * 1e9)
    dp_start = begin + int(0.70 * step_s * 1e9) + j
    dp_busy = int(0.25 * step_s * 1e9) - j  # a late rank waits less in the all-reduce
    return {"tp": (sum(n for _, n in TP_OPS), TP_BYTES * sum(n for _, n in TP_OPS), tp_busy,
                   tp_start, tp_start + tp_busy + int(0.05 * step_s * 1e9)),
            "dp": (sum(n for _, n in DP_OPS), DP_BYTES * sum(n for _, n in DP_OPS), dp_busy,
                   dp_start, dp_start + dp_busy)}


def rank_summary(layout: Layout, rank: int, *, last_done: int, t0_ns: int, step_s: float,
                 now_ns: int, host: str) -> RankSummary:
    """One rank as the agent's log tail would hold it once ``last_done`` is finished."""
    node, local = divmod(rank, layout.ranks_per_node)
    s = RankSummary(job=JOB, rank=rank, local_rank=local, host=host)
    groups = {"tp": layout.tp(rank), "dp": layout.dp(rank)}
    for pg, members, size, grank in groups.values():
        s.groups[pg] = (members, size, grank)
    done = last_done - STEP0 + 1  # steps finished since the job (as the demo job) started
    for phase, ops in (("tp", TP_OPS), ("dp", DP_OPS)):
        pg = groups[phase][0]
        calls = sum(n for _, n in ops)
        for op, n in ops:
            s.ops[(pg, op)] = OpTotals(
                count=done * n, nbytes=done * n * (TP_BYTES if phase == "tp" else DP_BYTES),
                busy_ns=int(done * n * step_s * 0.04e9), gap_ns=int(done * n * step_s * 0.2e9))
        s.last_started_seq[pg] = s.last_completed_seq[pg] = done * calls
    for step in range(last_done - PUSH_STEPS, last_done + 1):
        per = {}
        for phase, (count, nbytes, busy, first, last) in _step_totals(
                t0_ns, step, rank, step_s).items():
            per[groups[phase][0]] = StepTotals(count=count, nbytes=nbytes, closed_ns=busy,
                                               first_start_ns=first, last_end_ns=last)
        s.steps[step] = per
    s.step = last_done + 1
    s.written_ns = now_ns - int(0.5e9)
    s.last_end_ns = now_ns - int(0.1e9)
    return s


def _gpu_readings(state: NodeState, gpus: int, t_s: float) -> None:
    from ringwatch.collectors._synthetic import synthetic_gpus
    from ringwatch.collectors._types import (
        FastReading,
        HostReading,
        NicReading,
        NvLinkReading,
        SlowReading,
    )

    if gpus:
        state.set_devices(synthetic_gpus(gpus))
    for i in range(gpus):
        g = state.gpus[i]
        g.samples = int(t_s * 20)
        mono = int(t_s * 1e9)
        for k in range(5):  # a few power samples in the window: peak and min
            state.record_fast(i, FastReading(
                energy_mj=int(1e9 + t_s * 415_000), power_instant_mw=600_000 + 10_000 * k,
                power_average_mw=415_000, sm_clock_mhz=1755, memory_clock_mhz=2619),
                mono + k * 50_000_000)
        links = tuple(NvLinkReading(link=j, remote_pci_bus_id="00000000:05:00.0",
                                    tx_bytes=int(t_s * 9e9), rx_bytes=int(t_s * 9e9),
                                    crc_errors=0, replay_errors=0, recovery_errors=0)
                      for j in range(2))
        state.record_slow(i, SlowReading(
            power_limit_enforced_mw=700_000, gpu_utilization_pct=92, memory_utilization_pct=41,
            memory_used_bytes=61 << 30, memory_total_bytes=80 << 30, temperature_c=62,
            throttle_reasons_mask=0, throttle_time_ns={"power": int(t_s * 4e7), "thermal": 0},
            ecc_corrected_total=0, ecc_uncorrected_total=0, pcie_replay_total=0, nvlinks=links,
            xid_total={}))
    nic = int(t_s * 1.2e9)
    state.host_reading = HostReading(
        nics=(NicReading(name="ib0", rx_bytes=nic, tx_bytes=nic, rx_packets=nic // 4096,
                         tx_packets=nic // 4096, rx_errors=0, tx_errors=0, rx_dropped=0,
                         tx_dropped=0, up=True, speed_mbps=400_000),),
        cpu_seconds={"user": 100.0 + t_s * 12, "system": 10.0 + t_s, "idle": 1e4},
        load1=12.0, memory_total_bytes=2 << 40, memory_available_bytes=1 << 40)


@dataclass(frozen=True)
class Push:
    body: bytes
    points: int  # all of the node's points
    step_points: int  # the ringwatch.step.collective.* gauges among them


def encode_push(layout: Layout, node: int, *, last_done: int, new_steps: int, t0_ns: int,
                step_s: float, gpus: int) -> Push:
    """One node's push once ``last_done`` is finished, carrying the ``new_steps`` finished steps
    not delivered before (as ``OtlpPusher`` does: ``steps_after``)."""
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    host = f"node{node:04d}"
    now_ns = t0_ns + int((last_done + 1 - STEP0) * step_s * 1e9)
    state = NodeState(host=host, job=JOB, source="replay:synthetic")
    _gpu_readings(state, gpus, (now_ns - t0_ns) / 1e9 + 3600)
    sent = {}
    for local in range(layout.ranks_per_node):
        rank = node * layout.ranks_per_node + local
        state.ranks[(JOB, rank)] = rank_summary(layout, rank, last_done=last_done, t0_ns=t0_ns,
                                                step_s=step_s, now_ns=now_ns, host=host)
        sent[(JOB, rank)] = last_done - new_steps
    points = collect_points(state, now_wall_ns=now_ns, steps_after=sent)
    data = metrics_data(points, start_ns=t0_ns, now_ns=now_ns, source=state.source)
    body = encode_metrics(data).SerializeToString()
    return Push(body, len(points), sum(1 for p in points if p.spec.entity == "rank_step"))


@dataclass
class Entry:
    """One pre-encoded push and where its step labels are."""

    body: bytes
    positions: np.ndarray  # offset of each label's first digit
    steps: np.ndarray  # the label's step

    @classmethod
    def of(cls, body: bytes) -> Entry:
        pos = np.array([m.end() for m in _STEP_KEY.finditer(body)], dtype=np.int64)
        steps = np.array([int(body[p:p + DIGITS]) for p in pos], dtype=np.int64)
        return cls(body, pos, steps)

    def moved(self, shift: int) -> bytes:
        """The body with every step label ``shift`` steps on (same width)."""
        if shift == 0 or not len(self.positions):
            return self.body
        new = self.steps + shift
        if new.max() >= 10 ** DIGITS or new.min() < 10 ** (DIGITS - 1):
            raise OverflowError("step labels out of 6 digits: lower --seconds")
        buf = np.frombuffer(self.body, dtype=np.uint8).copy()
        digits = (new[:, None] // _POW10[None, :]) % 10 + 48
        buf[self.positions[:, None] + np.arange(DIGITS)[None, :]] = digits.astype(np.uint8)
        return buf.tobytes()


@dataclass
class Pool:
    """Every node's pushes for one job size."""

    layout: Layout
    pool: list[list[Entry]]  # [node][i]: finished steps up to first + i * steps_per_push
    steps_per_push: int
    catch_up: list[Entry]  # [node]: a push of PUSH_STEPS new steps, moved for the prefill
    prefill_shifts: list[int]
    points_per_push: float  # per node, median over the pool
    step_points_per_push: float
    body_bytes: float
    build_s: float

    @property
    def period(self) -> int:
        return len(self.pool[0]) * self.steps_per_push

    def body(self, node: int, round_: int) -> bytes:
        """Round ``round_`` (0-based, after the prefill) of ``node``."""
        k = len(self.pool[node])
        return self.pool[node][round_ % k].moved((round_ // k) * self.period)

    def prefill_body(self, node: int, i: int) -> bytes:
        return self.catch_up[node].moved(self.prefill_shifts[i])

    def points_per_rank(self, new_steps: float) -> float:
        """P: points a rank sends in a push carrying ``new_steps`` new steps (its share of
        the node's GPU, host and agent series included)."""
        rpn = self.layout.ranks_per_node
        fixed = (self.points_per_push - self.step_points_per_push) / rpn
        per_step = self.step_points_per_push / rpn / self.steps_per_push
        return fixed + min(new_steps, PUSH_STEPS) * per_step


def build_pool(layout: Layout, *, pool: int, steps_per_push: int, prefill_steps: int,
               step_s: float, gpus: int, max_bytes: int) -> Pool:
    """Encode every node's pushes (the slow part: the agent's own encoding, 10-100 ms a push).

    Entry ``i`` of a node's pool has the steps up to ``first + i * steps_per_push`` finished
    and carries the last ``steps_per_push`` of them; the prefill moves one push of 32 new steps
    back, so that before the pool the service has seen ``prefill_steps`` steps of every rank.
    """
    t_build = time.perf_counter()
    t0_ns = time.time_ns() - int(3600e9)
    n_pre = max(1, math.ceil(prefill_steps / PUSH_STEPS))
    base = STEP0 + n_pre * PUSH_STEPS - 1  # last step of the prefill (its first: STEP0)
    first = base + steps_per_push  # last finished step of pool entry 0
    shifts = [-PUSH_STEPS * (n_pre - 1 - j) for j in range(n_pre)]
    common = {"t0_ns": t0_ns, "step_s": step_s, "gpus": gpus}
    probe = encode_push(layout, 0, last_done=first, new_steps=steps_per_push, **common)
    k = max(1, min(pool, max_bytes // max(1, layout.nodes * len(probe.body))))
    main, catch_up, pushes = [], [], []
    for node in range(layout.nodes):
        push = encode_push(layout, node, last_done=base, new_steps=PUSH_STEPS, **common)
        catch_up.append(Entry.of(push.body))
        main.append([])
        for i in range(k):
            push = encode_push(layout, node, last_done=first + i * steps_per_push,
                               new_steps=steps_per_push, **common)
            main[-1].append(Entry.of(push.body))
            pushes.append(push)
    return Pool(layout, main, steps_per_push, catch_up, shifts,
                statistics.median(p.points for p in pushes),
                statistics.median(p.step_points for p in pushes),
                statistics.median(len(p.body) for p in pushes), time.perf_counter() - t_build)


# --- the service ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class ServeProcess:
    """``ringwatch serve`` in its own process, memory-only state."""

    def __init__(self, window_s: float):
        self.otlp_port, self.api_port = _free_port(), _free_port()
        self.failed_scrapes = 0
        self.log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "ringwatch._cli", "serve",
               "--otlp-listen", f"127.0.0.1:{self.otlp_port}",
               "--listen", f"127.0.0.1:{self.api_port}", "--state-dir", "off",
               "--window-s", f"{window_s:g}"]
        self.proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.metrics(tries=1)
                self.failed_scrapes = 0
                return
            except RuntimeError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    out = self.output()
                    self.stop()
                    raise RuntimeError(f"ringwatch serve did not start:\n{out}") from None
                time.sleep(0.2)

    def metrics(self, tries: int = 5) -> dict[str, float]:
        """``/metrics`` as {'name{labels}': value} (a failed scrape is retried and counted)."""
        url = f"http://127.0.0.1:{self.api_port}/metrics"
        for i in range(tries):
            try:
                with urllib.request.urlopen(url, timeout=30) as r:
                    text = r.read().decode()
                break
            except OSError as exc:
                self.failed_scrapes += 1
                if i == tries - 1 or self.proc.poll() is not None:
                    raise RuntimeError(f"cannot scrape the service ({exc}); it "
                                       f"{'exited' if self.proc.poll() is not None else 'runs'}"
                                       f":\n{self.output()}") from exc
                time.sleep(0.2)
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def cpu_s(self) -> float:
        return _cpu_s(self.proc.pid)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


_POINTS = "ringwatch_serve_points_total"
_OK = 'ringwatch_serve_requests_total{code="200"}'
_BYTES = "ringwatch_serve_received_bytes_total"
_ROUNDS = "ringwatch_serve_analysis_rounds_total"
_ERRORS = "ringwatch_serve_analysis_errors_total"
_ANALYSIS = f'ringwatch_serve_analysis_seconds{{job="{JOB}"}}'
_LAG = f'ringwatch_serve_analysis_lag_seconds{{job="{JOB}"}}'


# --- the senders -------------------------------------------------------------------------------
class Senders:
    """``n`` threads, one keep-alive connection each, posting the next push as soon as the
    previous answer is in. Work items are (phase, index) taken in order under a lock, so the
    nodes stay within one round of each other."""

    HEADERS = {"Content-Type": "application/x-protobuf"}

    def __init__(self, pool: Pool, port: int, n: int):
        self.pool, self.port, self.n = pool, port, n
        self.lock = threading.Lock()
        self.sent = 0
        self.bad: dict[str, int] = {}
        self._items = iter(())
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def run(self, items) -> None:
        """Start posting ``items`` (an iterator of zero-argument body makers)."""
        self._items = iter(items)
        self._stop.clear()
        self._threads = [threading.Thread(target=self._loop, daemon=True, name=f"sender-{i}")
                         for i in range(self.n)]
        for t in self._threads:
            t.start()

    def join(self, stop: bool = False) -> None:
        if stop:
            self._stop.set()
        for t in self._threads:
            t.join()

    def _next(self):
        with self.lock:
            return next(self._items, None)

    def _loop(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while not self._stop.is_set():
            make = self._next()
            if make is None:
                break
            body = make()
            try:
                conn.request("POST", "/v1/metrics", body, self.HEADERS)
                resp = conn.getresponse()
                resp.read()
                status = str(resp.status)
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            with self.lock:
                if status == "200":
                    self.sent += 1
                else:
                    self.bad[status] = self.bad.get(status, 0) + 1
        conn.close()


def _prefill_items(pool: Pool):
    for i in range(len(pool.prefill_shifts)):
        for node in range(pool.layout.nodes):
            yield lambda node=node, i=i: pool.prefill_body(node, i)


def _round_items(pool: Pool):
    r = 0
    while True:
        for node in range(pool.layout.nodes):
            yield lambda node=node, r=r: pool.body(node, r)
        r += 1


# --- one measurement ---------------------------------------------------------------------------
def _rounds_timing(samples: list[tuple[float, dict, float]], window_s: float) -> tuple:
    """From scrapes (time, metrics, service CPU s): (whole round s, analyzers s per round,
    rounds seen, service CPU s per round) from when the rounds counter moved and the analysis
    gauge then."""
    changes, analysis = [], []
    prev = None
    for t, m, cpu in samples:
        r = m.get(_ROUNDS)
        if prev is not None and r is not None and r > prev and _ANALYSIS in m:
            changes.append((t, r, cpu))
            analysis.append(m[_ANALYSIS])
        prev = r if r is not None else prev
    whole = cpu_per_round = None
    if len(changes) >= 2 and changes[-1][1] > changes[0][1]:
        n = changes[-1][1] - changes[0][1]
        whole = max(0.0, (changes[-1][0] - changes[0][0]) / n - window_s)
        cpu_per_round = (changes[-1][2] - changes[0][2]) / n
    return whole, (statistics.median(analysis) if analysis else None), len(changes), \
        cpu_per_round


def _scrape_for(svc: ServeProcess, seconds: float, every_s: float = 0.25) -> list:
    out, t_end = [], time.monotonic() + seconds
    while time.monotonic() < t_end:
        m = svc.metrics()
        out.append((time.monotonic(), m, svc.cpu_s()))
        time.sleep(every_s)
    return out


def _scrape_rounds(svc: ServeProcess, *, min_s: float, max_s: float, every_s: float = 0.05,
                   changes: int = 3) -> list:
    """Scrapes until the rounds counter has moved ``changes`` times (and ``min_s`` passed),
    or two moves after 20 s, or ``max_s``. Every 50 ms: nothing else runs in the service
    then, and a round's end is placed to within that."""
    out, t0 = [], time.monotonic()
    first = None
    while True:
        m = svc.metrics()
        now = time.monotonic()
        out.append((now, m, svc.cpu_s()))
        rounds = m.get(_ROUNDS, 0)
        first = rounds if first is None else first
        moved, elapsed = rounds - first, now - t0
        if (moved >= changes and elapsed >= min_s) or (moved >= 2 and elapsed >= 20) \
                or elapsed >= max_s:
            return out
        time.sleep(every_s)


def measure(pool: Pool, *, seconds: float, senders: int, window_s: float, warmup_s: float,
            idle_min_s: float, idle_max_s: float) -> dict:
    """One fresh service: prefill, ``seconds`` of closed-loop pushes, then the idle rounds."""
    load1 = os.getloadavg()[0]
    svc = ServeProcess(window_s)
    try:
        snd = Senders(pool, svc.otlp_port, senders)
        t = time.monotonic()
        snd.run(_prefill_items(pool))
        snd.join()
        prefill_s = time.monotonic() - t
        snd.run(_round_items(pool))
        time.sleep(warmup_s)
        m0, c0, s0, t0 = svc.metrics(), svc.cpu_s(), _self_cpu_s(), time.monotonic()
        samples = _scrape_for(svc, seconds)
        m1, c1, s1, t1 = svc.metrics(), svc.cpu_s(), _self_cpu_s(), time.monotonic()
        snd.join(stop=True)
        time.sleep(window_s)  # a round in progress ends with the answers it waited on
        idle = _scrape_rounds(svc, min_s=idle_min_s, max_s=idle_max_s)
        span = t1 - t0
        whole, analysis, n_rounds, _ = _rounds_timing(samples, window_s)
        idle_whole, idle_analysis, _, idle_cpu = _rounds_timing(idle, window_s)
        lags = [m[_LAG] for _, m, _ in samples if _LAG in m]
        return {
            "ranks": pool.layout.world, "nodes": pool.layout.nodes, "load1": load1,
            "prefill_s": prefill_s, "span_s": span,
            "req_per_s": (m1.get(_OK, 0) - m0.get(_OK, 0)) / span,
            "points_per_s": (m1[_POINTS] - m0[_POINTS]) / span,
            "mb_per_s": (m1[_BYTES] - m0[_BYTES]) / span / 1e6,
            "service_cpu_pct": 100 * (c1 - c0) / span,
            "bench_cpu_pct": 100 * (s1 - s0) / span,
            "analysis_s": analysis, "round_s": whole, "rounds": n_rounds,
            "lag_s_median": statistics.median(lags) if lags else None,
            "lag_s_max": max(lags) if lags else None,
            "idle_analysis_s": idle_analysis, "idle_round_s": idle_whole,
            "idle_round_cpu_s": idle_cpu,
            "analysis_errors": m1.get(_ERRORS, 0), "bad_answers": dict(snd.bad),
            "failed_scrapes": svc.failed_scrapes,
        }
    finally:
        svc.stop()


# --- derived figures and output ----------------------------------------------------------------
def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def ranks_at_window(sizes: list[int], round_s: list[float | None], window_s: float):
    """Job size at which a round takes ``window_s``: log-log interpolation between the two
    measured sizes around it, or else extrapolation of a least-squares line through all of them.
    (ranks, how) or (None, why)."""
    pts = sorted((r, t) for r, t in zip(sizes, round_s, strict=True) if t is not None and t > 0)
    if len(pts) < 2:
        return None, "fewer than two sizes with a round time"
    for (r0, t0), (r1, t1) in zip(pts, pts[1:], strict=False):
        if t0 <= window_s <= t1 and t1 > t0:
            slope = math.log(t1 / t0) / math.log(r1 / r0)
            return r0 * (window_s / t0) ** (1 / slope), \
                f"interpolated {r0}-{r1}, round ~ ranks^{slope:.2f}"
    xs = [math.log(r) for r, _ in pts]
    ys = [math.log(t) for _, t in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope <= 0:
        return None, "round time does not grow with the size"
    side = "below" if pts[0][1] > window_s else "above"
    return math.exp(mx + (math.log(window_s) - my) / slope), \
        f"extrapolated {side} the sizes, fit round ~ ranks^{slope:.2f}"


def _f(x, fmt: str = ".2f", width: int = 8) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def report(pools: dict[int, Pool], results: dict[int, list[dict]], *, window_s: float,
           step_s: float, intervals: tuple[float, ...]) -> dict:
    sizes = sorted(results)
    print()
    print("medians over runs; analyzers = ringwatch_serve_analysis_seconds (the analyzers' part "
          "of a round),")
    print("round = whole round from the rounds counter (snapshot copy + analyzers + store), "
          "idle = after the senders stopped,")
    print("idle cpu = the service's CPU seconds per idle round (what the round costs, whatever "
          "else runs on the machine)")
    head = (f"{'ranks':>6} {'nodes':>5} {'runs':>4} {'kB/push':>8} {'pts/push':>8} {'req/s':>7} "
            f"{'points/s':>9} {'MB/s':>6} {'serve%':>6} {'pts/cpu-s':>9} {'bench%':>6} "
            f"{'analyz s':>8} {'round s':>8} {'lag s':>6} {'idle an.':>8} {'idle rnd':>8} "
            f"{'idle cpu':>8} {'load':>5}")
    print(head)
    print("-" * len(head))
    summary = {}
    for r in sizes:
        rows, pool = results[r], pools[r]
        pps, cpu = _median(rows, "points_per_s"), _median(rows, "service_cpu_pct")
        per_cpu = statistics.median(x["points_per_s"] / (x["service_cpu_pct"] / 100)
                                    for x in rows if x["service_cpu_pct"] > 0)
        med = {k: _median(rows, k) for k in rows[0] if not isinstance(rows[0][k], dict)}
        med["points_per_cpu_s"] = per_cpu
        summary[r] = med
        print(f"{r:>6} {pool.layout.nodes:>5} {len(rows):>4} {pool.body_bytes / 1e3:>8.1f} "
              f"{pool.points_per_push:>8.0f} {med['req_per_s']:>7.1f} {pps:>9.0f} "
              f"{med['mb_per_s']:>6.1f} {cpu:>6.1f} {per_cpu:>9.0f} "
              f"{med['bench_cpu_pct']:>6.1f} {_f(med['analysis_s'])} {_f(med['round_s'])} "
              f"{_f(med['lag_s_median'], '.2f', 6)} {_f(med['idle_analysis_s'])} "
              f"{_f(med['idle_round_s'])} {_f(med['idle_round_cpu_s'])} "
              f"{med['load1']:>5.1f}")
    pool0 = pools[sizes[0]]
    ingest = statistics.median(summary[r]["points_per_s"] for r in sizes)
    r_win, how = ranks_at_window(sizes, [summary[r]["idle_round_s"] for r in sizes], window_s)
    r_win_load, how_load = ranks_at_window(sizes, [summary[r]["round_s"] for r in sizes],
                                           window_s)
    r_win_cpu, how_cpu = ranks_at_window(
        sizes, [summary[r]["idle_round_cpu_s"] for r in sizes], window_s)
    print()
    fixed = pool0.points_per_rank(0)
    per_step = pool0.points_per_rank(1) - fixed
    print(f"points per rank per push P = {fixed:.1f} + {per_step:.0f} per new step carried "
          f"({per_step:.0f} = 5 gauges x 2 groups; {fixed:.1f} = the rank's counters and "
          f"frontier, and its share of the node's GPU/host/agent series)")
    print(f"ingest: {ingest:.0f} points/s (median over sizes)")
    print(f"analysis round = window ({window_s:g} s) at: {_f(r_win, '.0f', 0)} ranks idle "
          f"({how}); {_f(r_win_cpu, '.0f', 0)} by its CPU time ({how_cpu}); "
          f"{_f(r_win_load, '.0f', 0)} under full ingest ({how_load})")
    derived = {"P_fixed": fixed, "P_per_step": per_step, "ingest_points_per_s": ingest,
               "ranks_at_window_idle": r_win, "ranks_at_window_cpu": r_win_cpu,
               "ranks_at_window_loaded": r_win_load, "intervals": {}}
    for interval in intervals:
        new_steps = min(PUSH_STEPS, interval / step_s)
        p = pool0.points_per_rank(new_steps)
        by_ingest = ingest / (p / interval)
        limits = {"ingest": by_ingest, "analysis window": r_win}
        which = min((v, k) for k, v in limits.items() if v is not None)
        derived["intervals"][f"{interval:g}"] = {
            "new_steps": new_steps, "P": p, "by_ingest": by_ingest, "by_window": r_win,
            "ranks_max": which[0], "limit": which[1]}
        print(f"push every {interval:g} s ({new_steps:g} new steps of {step_s:g} s, P = {p:.0f}):"
              f" ingest carries {by_ingest:.0f} ranks, the window {_f(r_win, '.0f', 0)}: "
              f"ranks per instance = {which[0]:.0f} (limit: {which[1]})")
    one = derived["intervals"]
    parts = ", ".join(f"{v['ranks_max']:.0f} ranks at {k} s pushes ({v['limit']})"
                      for k, v in one.items())
    print(f"\nSUMMARY: one ringwatch serve ingests {ingest:.0f} points/s "
          f"({statistics.median(summary[r]['req_per_s'] for r in sizes):.0f} node pushes/s); "
          f"its analysis round reaches the {window_s:g} s window at "
          f"{_f(r_win, '.0f', 0)} ranks; ranks per instance: {parts}")
    return {"per_size": summary, "derived": derived}


def _revision() -> str:
    """The checkout's commit, ``+changes`` when the measured code differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service", "agent",
                                "analyzers", "ringwatch"], cwd=root, text=True,
                               capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return (head or "unknown revision") + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 and 128 ranks, 1 run of 5 s, 64 prefill steps (~30 s)")
    ap.add_argument("--ranks", default="64,128,256,1024", help="job sizes (default %(default)s)")
    ap.add_argument("--ranks-per-node", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8,
                    help="GPU series in each push (0: ranks and host only)")
    ap.add_argument("--runs", type=int, default=3, help="fresh services per size (default 3)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed span of each run")
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--senders", type=int, default=4, help="sender threads (connections)")
    ap.add_argument("--window-s", type=float, default=1.0, help="the service's --window-s")
    ap.add_argument("--step-s", type=float, default=0.5, help="simulated step time")
    ap.add_argument("--push-interval-s", type=float, default=1.0,
                    help="simulated agent push interval: a push carries interval / step-s new "
                    "steps (default 1 s, as the live tests; the agent's default is 10 s)")
    ap.add_argument("--prefill-steps", type=int, default=200,
                    help="steps sent before timing (the service keeps 200)")
    ap.add_argument("--pool", type=int, default=2, help="pushes encoded per node")
    ap.add_argument("--pool-mb", type=int, default=256, help="memory cap of one size's pool")
    ap.add_argument("--idle-max-s", type=float, default=90.0,
                    help="longest wait for the idle analysis rounds")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args(argv)
    if args.quick:
        args.ranks, args.runs, args.seconds, args.warmup_s = "64,128", 1, 5.0, 1.0
        args.prefill_steps, args.pool = 64, 1
    sizes = [int(x) for x in args.ranks.split(",")]
    steps_per_push = max(1, min(PUSH_STEPS, round(args.push_interval_s / args.step_s)))
    if any(r % args.ranks_per_node for r in sizes):
        ap.error("every size must be a multiple of --ranks-per-node")
    idle_min_s = 3.0 if args.quick else 6.0

    print(f"ringwatch serve ingest at {_revision()}: sizes {sizes}, {args.ranks_per_node} "
          f"ranks and {args.gpus_per_node} GPUs per node, {args.senders} senders, "
          f"{args.runs} run(s) of {args.seconds:g} s, window {args.window_s:g} s, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    pools = {}
    for r in sizes:
        pools[r] = build_pool(Layout(r // args.ranks_per_node, args.ranks_per_node),
                              pool=args.pool, steps_per_push=steps_per_push,
                              prefill_steps=args.prefill_steps, step_s=args.step_s,
                              gpus=args.gpus_per_node, max_bytes=args.pool_mb << 20)
        p = pools[r]
        print(f"  pool {r:>5} ranks: {p.layout.nodes} nodes x {len(p.pool[0])} push(es) of "
              f"{steps_per_push} new step(s), {p.body_bytes / 1e3:.1f} kB and "
              f"{p.points_per_push:.0f} points a push ({p.step_points_per_push:.0f} step "
              f"gauges), encoded in {p.build_s:.1f} s", flush=True)
    results: dict[int, list[dict]] = {r: [] for r in sizes}
    for run in range(args.runs):  # sizes interleaved: slow drifts of the machine spread out
        for r in sizes:
            res = measure(pools[r], seconds=args.seconds, senders=args.senders,
                          window_s=args.window_s, warmup_s=args.warmup_s,
                          idle_min_s=idle_min_s, idle_max_s=args.idle_max_s)
            res["run"] = run
            results[r].append(res)
            print(f"  run {run + 1} {r:>5} ranks: {res['req_per_s']:6.1f} req/s "
                  f"{res['points_per_s']:8.0f} points/s, service CPU "
                  f"{res['service_cpu_pct']:5.1f}%, analyzers {_f(res['analysis_s'], '.2f', 0)}"
                  f" s, round {_f(res['round_s'], '.2f', 0)} s, idle round "
                  f"{_f(res['idle_round_s'], '.2f', 0)} s "
                  f"({_f(res['idle_round_cpu_s'], '.2f', 0)} CPU s), lag "
                  f"{_f(res['lag_s_median'], '.2f', 0)} s, prefill {res['prefill_s']:.1f} s, "
                  f"load {res['load1']:.1f}"
                  + (f", NOT 200: {res['bad_answers']}" if res["bad_answers"] else "")
                  + (f", {res['failed_scrapes']} scrape(s) retried" if res["failed_scrapes"]
                     else ""),
                  flush=True)
    out = report(pools, results, window_s=args.window_s, step_s=args.step_s,
                 intervals=(1.0, 10.0))
    bad = sum(sum(x["bad_answers"].values()) + x["analysis_errors"]
              for rows in results.values() for x in rows)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "runs": results, **out}, indent=1, default=str))
    if bad:
        print(f"{bad:.0f} push(es) not answered 200 or analyses failed", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
