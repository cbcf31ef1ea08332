"""A live loop for the benchmarks: `ringwatch serve` and one `ringwatch agent` on loopback.

The agent follows a run's log folder (reads every 0.5 s, pushes every second; or, with
``agent_defaults``, at its own defaults: reads every 2 s, pushes every 10 s or sooner when
steps wait); the service's
findings API is polled every 0.5 s while a command (a `ringwatch cluster` run) goes on, and a
few seconds after it, so that the last steps reach the service.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _procs import free_port, stop

PY = sys.executable


def rw(*args: str) -> list[str]:
    """A `ringwatch` command line, with this interpreter."""
    return [PY, "-m", "ringwatch._cli", *args]


class LiveStack:
    """Serve + agent over ``log_dir``, state in ``state_dir``; a context manager."""

    def __init__(self, log_dir: Path, state_dir: Path, *, agent_defaults: bool = False):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.otlp, self.api = free_port(), free_port()
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.serve = subprocess.Popen(rw(
            "serve", "--otlp-listen", f"127.0.0.1:{self.otlp}", "--listen",
            f"127.0.0.1:{self.api}", "--state-dir", str(state_dir)), **quiet)
        self.agent = subprocess.Popen(rw(
            "agent", "--log-dir", str(log_dir), "--prometheus", "off", "--otlp-endpoint",
            f"http://127.0.0.1:{self.otlp}/v1/metrics", *(() if agent_defaults else (
                "--export-interval-s", "1", "--logs-interval-s", "0.5")), "--no-gpu"),
            **quiet)
        #: finding id -> (wall ns first seen, the API's document of it as last seen: a
        #: finding's ranks and hosts are refined while it is open, as more groups slow)
        self.seen: dict[str, tuple[int, dict]] = {}

    def __enter__(self) -> LiveStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def poll(self) -> None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api}/api/v1/findings",
                                        timeout=5) as r:
                for t in json.loads(r.read())["findings"]:
                    first = self.seen.get(t["id"])
                    self.seen[t["id"]] = (time.time_ns() if first is None else first[0], t)
        except OSError:
            pass

    def run(self, cmd: list[str], *, after_s: float = 3.0, **popen) -> int:
        """Run ``cmd`` (ranks flushing every 0.5 s) while polling; its exit status."""
        env = dict(os.environ, RINGWATCH_FLUSH_INTERVAL_S="0.5", **popen.pop("env", {}))
        proc = subprocess.Popen(cmd, env=env, **popen)
        while proc.poll() is None:
            self.poll()
            time.sleep(0.5)
        for _ in range(int(after_s / 0.5)):
            self.poll()
            time.sleep(0.5)
        return proc.returncode

    def findings(self) -> list[tuple[int, dict]]:
        """``(first seen wall ns, finding as last seen)`` of every finding seen, oldest
        first."""
        return [(ns, t["finding"]) for ns, t in sorted(self.seen.values(),
                                                       key=lambda x: x[0])]

    def close(self) -> None:
        stop(self.agent, self.serve)
