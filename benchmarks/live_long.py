"""A straggler that lasts the whole job, watched live across a kill -9 of the service.

One real run: `ringwatch serve` (a state folder), one `ringwatch agent` pushing every second,
and `ringwatch cluster` (4 Gloo DDP ranks on 2 emulated hosts, ``--steps`` steps, 40 ms of host
idle time a step) with rank 2 doing twice the work from step 40 to the end. The findings API is
polled every 0.5 s. Halfway through the job the service is killed with SIGKILL and started again
on the same state folder and ports. At the end, `ringwatch analyze` reads the same logs.

Reported, and checked (exit status 1 when one fails):

* the straggler is opened for rank 2 and, from then to the end of the job, every poll the
  service answered shows it open; the service never shows it as imbalance;
* after the restart it is the same finding (same id) with the same onset;
* `ringwatch analyze` names the same rank and class, and an onset within 3 steps of the
  service's (both estimate it: the service against the frozen baseline of the job's first
  steps, analyze against a rolling one).

    .venv/bin/python benchmarks/live_long.py --steps 1000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _procs import free_port

PY = sys.executable
VICTIM = 2


def _rw(*args: str) -> list[str]:
    return [PY, "-m", "ringwatch._cli", *args]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--keep", default=None, help="keep the run's folder here")
    a = ap.parse_args(argv)
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="rw-live-long-"))
    run = tmp / "run"
    (run / "logs").mkdir(parents=True, exist_ok=True)
    otlp, api = free_port(), free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    serve_cmd = _rw("serve", "--otlp-listen", f"127.0.0.1:{otlp}", "--listen",
                    f"127.0.0.1:{api}", "--state-dir", str(tmp / "state"))
    serve = subprocess.Popen(serve_cmd, **quiet)
    agent = subprocess.Popen(_rw("agent", "--log-dir", str(run / "logs"), "--prometheus", "off",
                                 "--otlp-endpoint", f"http://127.0.0.1:{otlp}/v1/metrics",
                                 "--export-interval-s", "1", "--logs-interval-s", "0.5",
                                 "--no-gpu"), **quiet)
    polls: list[tuple[float, list[dict] | None]] = []

    def poll() -> None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{api}/api/v1/findings?state=open",
                                        timeout=5) as r:
                polls.append((time.time(), json.loads(r.read())["findings"]))
        except (OSError, ValueError):
            polls.append((time.time(), None))  # the service was down

    env = dict(os.environ, RINGWATCH_FLUSH_INTERVAL_S="0.5")
    t0 = time.time()
    cl = subprocess.Popen(_rw("cluster", "--run-dir", str(run), "--nproc", "4", "--hosts", "2",
                              "--steps", str(a.steps), "--fault", "straggler",
                              "--straggler-mode", "work", "--victim-rank", str(VICTIM),
                              "--at-step", "40", "--timeout-s", "1800", "--",
                              "--step-sleep-ms", "40"), env=env, **quiet)
    killed_at = None
    while cl.poll() is None:
        poll()
        opened = any(p and any(t["finding"]["kind"] == "straggler" for t in p)
                     for _, p in polls)
        # halfway: the run's steps are ~70 ms; kill once the straggler is open and half of
        # the expected time is gone
        if killed_at is None and opened and time.time() - t0 > a.steps * 0.07 / 2:
            serve.send_signal(signal.SIGKILL)
            serve.wait(10)
            killed_at = time.time()
            serve = subprocess.Popen(serve_cmd, **quiet)
        time.sleep(0.5)
    for _ in range(4):
        poll()
        time.sleep(0.5)
    job_end = time.time()
    for p in (agent, serve):
        p.send_signal(signal.SIGTERM)
        p.wait(15)
    rep = json.loads(subprocess.run(_rw("analyze", "--json", str(run / "logs")),
                                    capture_output=True, text=True, check=True).stdout)
    pm = [f for f in rep["findings"] if f["kind"] in ("straggler", "imbalance")]

    def ours(p):
        return [t for t in p if VICTIM in t["finding"]["ranks"]
                and t["finding"]["kind"] in ("straggler", "imbalance")]

    answered = [(t, ours(p)) for t, p in polls if p is not None]
    first = next((i for i, (_, fs) in enumerate(answered)
                  if any(f["finding"]["kind"] == "straggler" for f in fs)), None)
    checks = {}
    checks["opened for rank 2"] = first is not None
    shown = answered[first:] if first is not None else []
    checks["open in every answered poll to the end"] = bool(shown) and all(
        any(f["finding"]["kind"] == "straggler" for f in fs) for _, fs in shown)
    checks["never imbalance"] = all(f["finding"]["kind"] != "imbalance"
                                    for _, fs in answered for f in fs)
    ids = {f["id"] for _, fs in shown for f in fs}
    since = {f["finding"]["since_step"] for _, fs in shown for f in fs}
    checks["one id, one onset across the restart"] = len(ids) == 1 and len(since) == 1
    checks["killed and restarted mid-fault"] = killed_at is not None and any(
        t > killed_at and p is not None for t, p in polls)
    # the onset is an estimate on both sides (the service's from the frozen baseline of the
    # job's first steps, analyze's from a rolling one): within 3 steps, the detection target
    checks["analyze agrees (rank, class, onset within 3 steps)"] = bool(pm) and len(
        since) == 1 and (pm[0]["ranks"], pm[0]["cls"]) == ([VICTIM], "compute straggler") \
        and abs(pm[0]["since_step"] - next(iter(since))) <= 3
    down = sum(1 for _, p in polls if p is None)
    print(json.dumps({"steps": a.steps, "job_s": round(job_end - t0, 1),
                      "polls": len(polls), "polls_unanswered": down,
                      "serve_ids": sorted(ids), "serve_since": sorted(since),
                      "analyze": [(f["kind"], f["cls"], f["ranks"], f["since_step"])
                                  for f in pm],
                      "killed_after_s": None if killed_at is None else round(killed_at - t0, 1)
                      }, indent=1))
    for what, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not a.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
