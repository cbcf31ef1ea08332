"""Measurement of `serve_ingest.py`: the service in its own process, closed-loop senders,
scrapes of its counters."""

from __future__ import annotations

import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from _ingest_load import JOB, Pool
from _procs import cpu_s, free_port


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class ServeProcess:
    """``ringwatch serve`` in its own process, memory-only state."""

    def __init__(self, window_s: float):
        self.otlp_port, self.api_port = free_port(), free_port()
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
        return cpu_s(self.proc.pid)

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
_OK = 'ringwatch_serve_requests_total{code="200",protocol="http"}'
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
            # the service logs a failed analysis with its traceback: keep it to read
            "service_log_tail": svc.output() if m1.get(_ERRORS, 0) else None,
        }
    finally:
        svc.stop()


# --- derived figures and output ----------------------------------------------------------------
