"""The live loop end to end on the local cluster: ranks write their logs, `ringwatch agent`
follows them and pushes OTLP, `ringwatch serve` analyses every second; `ringwatch status` and
the service's /metrics name the culprit while the job runs. No post-processing."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request

import pytest

from jobtools import job_env, need_netns, ringwatch_cmd
from promtools import free_port


class Stack:
    """`ringwatch serve` and one `ringwatch agent` on loopback, following ``run_dir/logs``."""

    def __init__(self, tmp_path, run_dir):
        self.tmp, self.run_dir = tmp_path, run_dir
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.otlp, self.api = free_port(), free_port()
        self.serve = self._start_serve()
        self.agent = subprocess.Popen(ringwatch_cmd(
            "agent", "--log-dir", str(run_dir / "logs"), "--prometheus", "off",
            "--otlp-endpoint", f"http://127.0.0.1:{self.otlp}/v1/metrics",
            "--export-interval-s", "1", "--logs-interval-s", "0.5", "--no-gpu"),
            env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.seen: dict[str, tuple[float, dict]] = {}

    def _start_serve(self):
        proc = subprocess.Popen(ringwatch_cmd(
            "serve", "--otlp-listen", f"127.0.0.1:{self.otlp}", "--listen",
            f"127.0.0.1:{self.api}", "--state-dir", str(self.tmp / "state")),
            env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for _ in range(100):
            try:
                self.get("/healthz")
                return proc
            except OSError:
                time.sleep(0.1)
        raise AssertionError("ringwatch serve did not come up")

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api}{path}", timeout=5) as r:
            body = r.read().decode()
        return json.loads(body) if path.startswith(("/api", "/healthz")) else body

    def poll(self) -> None:
        """Remember when each finding was first seen (wall ns)."""
        try:
            found = self.get("/api/v1/findings")["findings"]
        except OSError:
            return
        for t in found:
            self.seen.setdefault(t["id"], (time.time_ns(), t))

    def run_cluster(self, *args: str, timeout_s: float = 240):
        env = job_env(RINGWATCH_FLUSH_INTERVAL_S="0.5")
        proc = subprocess.Popen(ringwatch_cmd("cluster", "--run-dir", str(self.run_dir),
                                              "--timeout-s", "200", *args),
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < timeout_s:
            self.poll()
            time.sleep(0.5)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        for _ in range(6):  # the last steps reach the service a few seconds later
            self.poll()
            time.sleep(0.5)
        return json.loads((self.run_dir / "ground_truth.json").read_text()), out

    def status(self) -> str:
        return subprocess.run(ringwatch_cmd("status", "--url", f"http://127.0.0.1:{self.api}",
                                            "--all"), capture_output=True, text=True,
                              env=job_env(), timeout=30).stdout

    def stop(self) -> None:
        for p in (self.agent, self.serve):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (self.agent, self.serve):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def stack(tmp_path):
    need_netns()
    s = Stack(tmp_path, tmp_path / "run")
    yield s
    s.stop()


def test_a_straggler_is_named_live_within_seconds(stack):
    truth, _ = stack.run_cluster("--nproc", "4", "--hosts", "2", "--steps", "90",
                                 "--fault", "straggler", "--straggler-mode", "work",
                                 "--at-step", "30", "--", "--step-sleep-ms", "60")
    found = [(t, f) for t, f in stack.seen.values() if f["finding"]["kind"] == "straggler"]
    assert len(found) == 1, stack.seen
    first_ns, tracked = found[0]
    f = tracked["finding"]
    assert f["ranks"] == [truth["rank"]] and f["hosts"] == [truth["host"]], f
    lag_s = (first_ns - truth["onset_wall_ns"]) / 1e9
    assert lag_s < 10, lag_s  # seen by a poller of the API, not only detected
    assert f["detected_step"] - truth["onset_step"] <= 5, f
    assert f"straggler  compute straggler        {truth['rank']}" in stack.status()
    metrics = stack.get("/metrics")
    assert f'ringwatch_straggler_suspect{{cls="compute straggler",host="{truth["host"]}",' \
           f'job="{truth["job_id"]}",rank="{truth["rank"]}"}}' in metrics, metrics


def test_a_hang_is_named_live_within_ten_seconds(stack):
    truth, _ = stack.run_cluster("--nproc", "4", "--hosts", "2", "--steps", "40",
                                 "--fault", "hang", "--victim-rank", "1", "--at-step", "15",
                                 "--hold-s", "15")
    hangs = sorted((t, f) for t, f in stack.seen.values() if f["finding"]["kind"] == "hang")
    assert hangs, stack.seen
    first_ns, tracked = hangs[0]
    f = tracked["finding"]
    assert (f["cls"], f["ranks"]) == ("never arrived", [1]), f
    lag_s = (first_ns - truth["onset_wall_ns"]) / 1e9
    assert lag_s < 10, lag_s
    # the job went on after the hold: the hang is over, the store resolves it in time
    assert tracked["state"] == "open"


def test_a_healthy_run_shows_no_finding(stack):
    stack.run_cluster("--nproc", "4", "--hosts", "2", "--steps", "60", "--fault", "none")
    assert stack.seen == {}, stack.seen
    assert "no findings" in stack.status()
    jobs = stack.get("/api/v1/jobs")["jobs"]
    assert len(jobs) == 1 and jobs[0]["ranks"] == 4 and jobs[0]["max_step"] >= 55, jobs
