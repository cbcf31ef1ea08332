"""CPU cost of the node sidecar: 8 GPUs sampled at 20 Hz, host counters at 1 Hz, an OTLP push
every 10 s to a real receiver, a Prometheus scrape every 15 s. Target: <= 1% of one core.

The GPUs are a synthetic recording replayed (no GPU here): the replay client's read is a bisect
in memory, so this measures the agent's own work (sampling loop, state, power window, export
encoding), not the NVML calls themselves (a batched field read costs a few tens of µs on a real
driver; see README).

    .venv/bin/python benchmarks/agent_cpu.py --runs 5 --seconds 60

Reports, per run, the agent process's CPU time (user + system, from /proc/<pid>/stat) over the
measured span after a warm-up, as a percentage of one core, and the median.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from _procs import cpu_s, free_port

REPO = Path(__file__).resolve().parents[1]


def _receiver() -> tuple[ThreadingHTTPServer, list[int]]:
    sizes: list[int] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            sizes.append(len(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, sizes


def one_run(seconds: float, warmup_s: float, gpus: int, hz: float) -> dict:
    srv, sizes = _receiver()
    port = free_port()
    cmd = [sys.executable, "-m", "ringwatch._cli", "agent", "--replay", f"synthetic:{gpus}",
           "--fast-interval-s", str(1 / hz), "--log-dir", "off",
           "--prometheus", f"127.0.0.1:{port}",
           "--otlp-endpoint", f"http://127.0.0.1:{srv.server_address[1]}/v1/metrics"]
    proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), stderr=subprocess.DEVNULL)
    try:
        time.sleep(warmup_s)
        scrape_bytes = 0
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        next_scrape = t0
        while time.monotonic() - t0 < seconds:
            if time.monotonic() >= next_scrape:
                url = f"http://127.0.0.1:{port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as r:
                    scrape_bytes = len(r.read())
                next_scrape += 15
            time.sleep(0.2)
        c1, t1 = cpu_s(proc.pid), time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                      if ln.startswith("ringwatch_gpu_samples_total{"))
        late = [ln for ln in text.splitlines() if ln.startswith("ringwatch_agent_late_ticks")]
    finally:
        proc.terminate()
        proc.wait(10)
        srv.shutdown()
    return {"cpu_pct": 100 * (c1 - c0) / (t1 - t0), "pushes": len(sizes),
            "push_bytes": statistics.median(sizes) if sizes else 0,
            "scrape_bytes": scrape_bytes, "samples": samples,
            "late_ticks": late[0].rsplit(" ", 1)[1] if late else "?"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup-s", type=float, default=5)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--hz", type=float, default=20)
    a = ap.parse_args()
    results = []
    for i in range(a.runs):
        r = one_run(a.seconds, a.warmup_s, a.gpus, a.hz)
        results.append(r)
        print(f"run {i + 1}: {r['cpu_pct']:.2f}% of one core; {r['pushes']} OTLP pushes "
              f"(median {r['push_bytes']} B), /metrics {r['scrape_bytes']} B, "
              f"{r['samples']:.0f} GPU samples, late ticks {r['late_ticks']}", flush=True)
    med = statistics.median(r["cpu_pct"] for r in results)
    print(f"median over {a.runs} runs: {med:.2f}% of one core for {a.gpus} GPUs at "
          f"{a.hz:g} Hz (target <= 1%)")


if __name__ == "__main__":
    main()
