"""`ringwatch agent` as a real process: OTLP pushes decoded by a real receiver, /metrics checked
by promtool and scraped by a real Prometheus, the ranks' summaries from a real DDP job's logs,
record then replay, SIGTERM, an unreachable collector. GPUs are a synthetic recording replayed
(this machine has none), labelled so in every output."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from ringwatch._logs import read_events
from ringwatch.collectors._recording import load_recording

from jobtools import job_env, ringwatch_cmd, wait_for
from otlp_receiver import OtlpReceiver, points
from promtools import free_port, promtool_check_metrics, running_prometheus, samples


class Agent:
    def __init__(self, *args: str, cwd):
        self.port = free_port()
        self.cmd = ringwatch_cmd("agent", "--prometheus", f"127.0.0.1:{self.port}",
                                 "--host", "node-t", *args)
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=job_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        wait_for(self._up, 30, "the agent's /metrics")

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.proc.stdout.read()
        try:
            self.scrape()
            return True
        except OSError:
            return False

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def terminate(self, timeout_s: float = 10) -> tuple[int, float, str]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, time.monotonic() - t0, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def live(ddp_run, tmp_path_factory):
    """An agent replaying 2 synthetic GPUs and following the DDP job's logs, pushing OTLP
    every 0.5 s to a real receiver; yields (agent, receiver, logs) and stops it with SIGTERM."""
    logs, _, _ = ddp_run
    cwd = tmp_path_factory.mktemp("agent")
    (cwd / "token").write_text("s3cret\n")  # a file: a token on argv shows in `ps`
    with OtlpReceiver() as rx:
        agent = Agent("--replay", "synthetic:2", "--otlp-endpoint", rx.url,
                      "--token-file", str(cwd / "token"),
                      "--export-interval-s", "0.5", "--logs-interval-s", "0.5",
                      "--log-dir", str(logs), "--stale-after-s", "86400", cwd=cwd)
        try:
            wait_for(lambda: len(rx.snapshot()) >= 3, 30, "three OTLP pushes")
            yield agent, rx, logs
            n_before = len(rx.snapshot())
            rc, took, out = agent.terminate()
            assert rc == 0, out
            assert took < 5, took
            assert len(rx.snapshot()) == n_before + 1, "a last push on SIGTERM"
        finally:
            agent.kill()


def test_otlp_pushes_carry_gpu_resources_and_climbing_energy(live):
    _, rx, _ = live
    reqs = rx.snapshot()
    headers, first = reqs[0]
    assert headers.get("authorization") == "Bearer s3cret"
    energy = points(first, "hw.energy")
    assert sorted(r["hw.id"] for r, _, _ in energy) == ["GPU-synthetic-0000",
                                                         "GPU-synthetic-0001"]
    for res, _, _ in energy:
        assert res["ringwatch.source"] == "replay:synthetic" and res["ringwatch.replayed"]
        assert res["host.name"] == "node-t" and res["service.name"] == "ringwatch-agent"
    e0 = [v for _, req in reqs for r, _, v in points(req, "hw.energy")
          if r["hw.gpu.index"] == 0]
    assert all(b >= a for a, b in zip(e0, e0[1:], strict=False)) and e0[-1] > e0[0], e0
    # 0.5 s between pushes at ~500 W of synthetic load: a few hundred joules each
    assert 100 < (e0[-1] - e0[0]) / (len(e0) - 1) < 400
    assert points(first, "system.network.io"), "host NIC counters travel too"


def test_rank_summaries_match_the_logs(live):
    _, rx, logs = live
    # "unknown": recovered from the Flight Recorder without a completion state; they ended
    ev = read_events(logs).filter(pl.col("status").is_in(["ok", "unknown"]))
    want = {(r["rank"], r["pg"], r["op"]): r["len"]
            for r in ev.group_by("rank", "pg", "op").len().iter_rows(named=True)}
    _, last = rx.snapshot()[-1]
    got = {(r["ringwatch.rank"], a["ringwatch.pg"], a["ringwatch.op"]): v
           for r, a, v in points(last, "ringwatch.collective.count")}
    assert got == want
    busy = {(r["ringwatch.rank"]): v for r, a, v in points(last, "ringwatch.collective.time")
            if a["ringwatch.op"] == "all_reduce" and a["ringwatch.pg"] == "0"}
    expect = ev.filter((pl.col("op") == "all_reduce") & (pl.col("pg") == "0")).group_by(
        "rank").agg(pl.col("duration_ns").sum())
    for rank, ns in expect.iter_rows():
        assert busy[rank] == pytest.approx(ns / 1e9)


def test_metrics_pass_promtool_and_a_real_prometheus_scrapes_them(live, tmp_path):
    agent, _, _ = live
    text = agent.scrape()
    ok, out = promtool_check_metrics(text)
    assert ok, out
    assert len(samples(text, "ringwatch_gpu_info", source="replay:synthetic")) == 2
    assert samples(text, "ringwatch_collectives_total", rank="3", op="all_reduce")
    with running_prometheus([f"127.0.0.1:{agent.port}"], tmp_path=tmp_path) as prom:
        res = prom.wait_for('ringwatch_gpu_info{source="replay:synthetic"}')
        assert {r["metric"]["uuid"] for r in res} == {"GPU-synthetic-0000",
                                                       "GPU-synthetic-0001"}
        res = prom.wait_for("ringwatch_gpu_energy_joules_total")
        assert len(res) == 2
        assert prom.query('up{job="ringwatch"}')[0]["value"][1] == "1"
        res = prom.wait_for('ringwatch_collective_completed_seq{pg="0"}')
        assert {r["metric"]["rank"] for r in res} == {"0", "1", "2", "3"}


def test_record_then_replay_and_sigterm(tmp_path):
    rec = tmp_path / "node.jsonl.gz"
    agent = Agent("--replay", "synthetic:1", "--record", str(rec), "--log-dir", "off",
                  cwd=tmp_path)
    try:
        time.sleep(2.0)
        rc, took, out = agent.terminate()
    finally:
        agent.kill()
    assert rc == 0 and took < 5, out
    r = load_recording(rec)
    assert r.complete and r.origin == "replay:synthetic"
    times = r.fast[0][0]
    rate = (len(times) - 1) / ((times[-1] - times[0]) / 1e9)
    assert 15 <= rate <= 21, rate  # 20 Hz asked
    assert r.host_readings[0] and r.slow[0][0]
    again = Agent("--replay", str(rec), "--log-dir", "off", cwd=tmp_path)
    try:
        text = again.scrape()
        assert samples(text, "ringwatch_gpu_info", source="replay:replay:synthetic")
    finally:
        again.kill()


def test_an_unreachable_collector_costs_nothing_but_a_count(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1/metrics"
    agent = Agent("--replay", "synthetic:2", "--otlp-endpoint", dead, "--export-interval-s",
                  "0.2", "--log-dir", "off", cwd=tmp_path)
    try:
        wait_for(lambda: (samples(agent.scrape(), "ringwatch_agent_errors_total",
                                  cause="otlp_export") or [0])[0] >= 5, 30,
                 "five failed pushes counted")
        text = agent.scrape()
        before = samples(text, "ringwatch_gpu_samples_total", gpu="0")[0]
        time.sleep(1.0)
        assert samples(agent.scrape(), "ringwatch_gpu_samples_total", gpu="0")[0] >= \
            before + 15, "sampling goes on at 20 Hz while pushes fail"
        rc, _, out = agent.terminate()
        assert rc == 0, out
    finally:
        agent.kill()


def test_once_prints_the_metrics_and_exits(tmp_path):
    out = subprocess.run(ringwatch_cmd("agent", "--once", "--replay", "synthetic:1",
                                       "--log-dir", "off", "--host", "n"),
                         capture_output=True, text=True, env=job_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert samples(out.stdout, "ringwatch_gpu_energy_joules_total", uuid="GPU-synthetic-0000")
    ok, msg = promtool_check_metrics(out.stdout)
    assert ok, msg


def test_nvml_or_a_one_line_reason_and_the_host_anyway(tmp_path):
    out = subprocess.run(ringwatch_cmd("agent", "--once", "--log-dir", "off"),
                         capture_output=True, text=True, env=job_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert samples(out.stdout, "ringwatch_host_cpu_seconds_total", mode="user")
    if Path("/dev/nvidiactl").exists():  # a GPU node: real readings, labelled nvml
        assert samples(out.stdout, "ringwatch_gpu_info", source="nvml"), out.stdout
        return
    lines = [ln for ln in out.stderr.splitlines() if "NVML" in ln]
    assert len(lines) == 1 and "no NVIDIA driver" in lines[0], out.stderr
    assert "ringwatch_gpu_" not in out.stdout
