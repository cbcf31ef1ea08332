"""Every query of every dashboard returns data from a real Prometheus that scraped real runs
on the local cluster, one after the other, analysed live by `ringwatch serve`: a 4-rank DDP job
on 2 emulated hosts with a straggler injected (and one rank paused for a few steps first: a
hiccup), then a job that hangs, then a 4-host job whose host2 link slows down; and three node
agents:

* ``host0`` follows the job's logs and pushes to the service; its GPUs are a synthetic replay
  (``--replay synthetic:4``), so they carry the job's label (job power, energy per step);
* ``h200`` replays readings recorded on a real NVIDIA H200 (tests/data/h200/);
* ``gpu-faults`` replays a recording written here with what this machine cannot produce:
  XID events, ECC errors, PCIe replays, NVLink errors, hardware throttling, a GPU that falls off
  the bus, InfiniBand ports; it pushes to a dead endpoint, so its failed pushes are counted.

Prometheus scrapes them with the scrape jobs of deploy/prometheus/prometheus.yml (honor_labels,
the relabelling), every second. Each panel query is run as Grafana would run it (variables
substituted, ``$__rate_interval`` = 4 scrapes): range queries over the runs, instant queries
at their end; then the job dashboard's again with ``job`` = the straggler's job, over its run.
A query with no data fails the test, with its dashboard, panel title and refId; none is exempt.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import yaml
from test_serve_live import Stack

from ringwatch._clock import FakeClock
from ringwatch.cluster._faults import DutyCycle
from ringwatch.cluster._run import read_steps
from ringwatch.collectors._recording import RecordingWriter
from ringwatch.collectors._synthetic import synthetic_gpus
from ringwatch.collectors._types import (
    FastReading,
    HostReading,
    IbPortReading,
    NicReading,
    NvLinkReading,
    SlowReading,
)
from ringwatch.dashboards import load_all
from ringwatch.dashboards._queries import substitute, targets

from jobtools import job_env, need_netns, ringwatch_cmd
from promtools import free_port, running_prometheus

REPO = Path(__file__).resolve().parents[2]
H200 = REPO / "tests" / "data" / "h200" / "nvml-ddp-nccl.jsonl.gz"
SCRAPE_S = 1
RATE_INTERVAL = f"{4 * SCRAPE_S}s"  # Grafana's $__rate_interval: at least 4 scrape intervals


def write_fault_recording(path: Path, seconds: float = 900.0) -> Path:
    """3 GPUs and a host, replayed as ``gpu-faults``: GPU 0 takes XID 13 every 5 s and is held
    down by hardware slowdown (and the power cap) from 3 s on; GPU 1 logs XID 79 at 12 s and
    gives no reading from 15 s on (fallen off the bus); GPU 2 counts ECC errors (an
    uncorrected one every 6 s), PCIe replays, NVLink CRC errors, and goes hot (thermal
    throttling) every other 10 s. The host has a NIC counting errors and drops and an
    InfiniBand port counting symbol errors and waits."""
    clock = FakeClock()
    gpus = synthetic_gpus(3)
    w = RecordingWriter(path, host="gpu-faults", gpus=gpus, start_mono_ns=clock.mono_ns(),
                        started_wall_ns=clock.wall_ns(), clock=clock, origin="synthetic")
    energy = [5_000_000_000] * 3
    for tenth in range(int(seconds * 10) + 1):
        t = tenth / 10
        now = clock.mono_ns()
        for i in range(3):
            lost = i == 1 and t >= 15
            power = 300_000 + 250_000 * (int(t * 2) % 2) + 20_000 * i
            energy[i] += power // 10
            w.fast(i, now, None if lost else FastReading(
                energy_mj=energy[i], power_instant_mw=power, power_average_mw=420_000,
                sm_clock_mhz=1410 if i == 0 and t >= 3 else 1980, memory_clock_mhz=2619))
        if tenth % 10 == 0:
            s = int(t)
            for i in range(3):
                if i == 1 and t >= 15:
                    w.slow(i, now, None)
                    continue
                mask = (0x8 | 0x4 if i == 0 and t >= 3 else 0) | (
                    0x40 if i == 2 and (s // 10) % 2 else 0)
                xid = {13: s // 5} if i == 0 else {79: int(t >= 12)} if i == 1 else {}
                link = NvLinkReading(link=0, remote_pci_bus_id="00000000:05:00.0",
                                     tx_bytes=s * 5_000_000_000, rx_bytes=s * 4_000_000_000,
                                     crc_errors=s * 3 if i == 2 else 0, replay_errors=s // 4,
                                     recovery_errors=0)
                w.slow(i, now, SlowReading(
                    power_limit_enforced_mw=700_000, gpu_utilization_pct=88,
                    memory_utilization_pct=35, memory_used_bytes=50 << 30,
                    memory_total_bytes=80 << 30, temperature_c=84 if mask & 0x40 else 66,
                    throttle_reasons_mask=mask,
                    throttle_time_ns={"power": s * 200_000_000 if i == 0 else 0,
                                      "thermal": s * 500_000_000 if i == 2 else 0},
                    ecc_corrected_total=s * 2 if i == 2 else 0,
                    ecc_uncorrected_total=s // 6 if i == 2 else 0,
                    pcie_replay_total=s * 7 if i == 2 else 0, nvlinks=(link,), xid_total=xid))
            w.host(now, HostReading(
                nics=(NicReading(name="eth0", rx_bytes=s * 2_000_000, tx_bytes=s * 1_000_000,
                                 rx_packets=s * 1500, tx_packets=s * 900, rx_errors=s // 2,
                                 tx_errors=0, rx_dropped=s, tx_dropped=0, up=True,
                                 speed_mbps=100_000),),
                ib_ports=(IbPortReading(device="mlx5_0", port=1, rx_bytes=s * 3_000_000_000,
                                        tx_bytes=s * 3_100_000_000,
                                        counters={"symbol_error": s // 3, "link_downed": 0,
                                                  "port_xmit_wait": s * 1000,
                                                  "port_xmit_data": s * 775_000_000},
                                        state="ACTIVE", rate="400 Gb/sec (4X NDR)"),),
                cpu_seconds={"user": 50.0 + s, "system": 5.0, "idle": 1e4}, load1=3.0,
                memory_total_bytes=1 << 40, memory_available_bytes=1 << 39))
        clock.advance(100_000_000)
    w.close()
    return path


def _scrape_configs(agents: list[str], serve: str) -> list[dict]:
    """The ringwatch jobs of deploy/prometheus/prometheus.yml, discovering these targets and
    scraping every second."""
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    out = []
    for name, where in (("ringwatch-agent", agents), ("ringwatch-serve", [serve])):
        job = {k: v for k, v in jobs[name].items() if not k.endswith("_sd_configs")}
        job.update(static_configs=[{"targets": where}], scrape_interval=f"{SCRAPE_S}s",
                   scrape_timeout=f"{SCRAPE_S}s")
        out.append(job)
    return out


def _agent(port: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(ringwatch_cmd("agent", "--prometheus", f"127.0.0.1:{port}",
                                          *args), env=job_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def _hiccup(run_dir: Path, rank: int, first: int, last: int, done: threading.Event,
            severity: float = 0.8) -> None:
    """Pause ``rank`` ``severity`` of every 100 ms from step ``first`` to ``last``: late for
    a few steps, then caught up."""
    steps = run_dir / "steps"

    def at(step: int) -> int:
        while not done.is_set():
            marks = read_steps(steps).get(rank) if steps.is_dir() else None
            if marks and marks[0] and marks[1] and marks[1][-1][0] >= step:
                return marks[0]
            time.sleep(0.01)
        return 0

    pid = at(first)
    if pid:
        pause = DutyCycle(pid, severity, 0.1)
        pause.start()
        at(last)
        pause.stop()


def test_every_panel_query_returns_data(tmp_path):
    need_netns()
    t_start = time.time()
    rec = write_fault_recording(tmp_path / "gpu-faults.jsonl.gz")
    stack = Stack(tmp_path, tmp_path / "run")
    ports = [free_port() for _ in range(3)]
    stack.agent.kill()  # the stack's own agent has no GPUs and no /metrics: replaced
    stack.agent.wait()
    stack.agent = _agent(ports[0], "--host", "host0", "--replay", "synthetic:4",
                         "--log-dir", str(stack.run_dir / "logs"), "--otlp-endpoint",
                         f"http://127.0.0.1:{stack.otlp}/v1/metrics", "--export-interval-s",
                         "1", "--logs-interval-s", "0.5")
    others = [_agent(ports[1], "--host", "h200", "--replay", str(H200), "--log-dir", "off"),
              _agent(ports[2], "--host", "gpu-faults", "--replay", str(rec), "--log-dir",
                     "off", "--otlp-endpoint", f"http://127.0.0.1:{free_port()}/v1/metrics",
                     "--export-interval-s", "1")]
    done = threading.Event()
    hiccup = threading.Thread(target=_hiccup, args=(stack.run_dir, 1, 22, 27, done),
                              daemon=True)
    try:
        agents = [f"127.0.0.1:{p}" for p in ports]
        with running_prometheus([], scrape_interval_s=SCRAPE_S, tmp_path=tmp_path,
                                extra_config={"scrape_configs": _scrape_configs(
                                    agents, f"127.0.0.1:{stack.api}")}) as prom:
            prom.wait_for('ringwatch_gpu_info{host="gpu-faults"}', timeout_s=60)
            hiccup.start()
            truth, _ = stack.run_cluster(
                "--nproc", "4", "--hosts", "2", "--steps", "100", "--fault", "straggler",
                "--straggler-mode", "work", "--at-step", "40", "--", "--step-sleep-ms", "60")
            job = truth["job_id"]
            prom.wait_for(f'ringwatch_whatif_gain_seconds{{job="{job}"}}', timeout_s=30)
            time.sleep(2 * SCRAPE_S)
            t_job = time.time()  # the straggler's job ends; its finding is still open
            _next_job(stack, "hang")
            stack.run_cluster("--nproc", "4", "--hosts", "2", "--steps", "40", "--fault",
                              "hang", "--victim-rank", "1", "--at-step", "15", "--hold-s",
                              "12")
            _next_job(stack, "link")
            stack.run_cluster("--nproc", "4", "--hosts", "4", "--tp", "2", "--steps", "50",
                              "--fault", "link", "--victim-host", "2", "--at-step", "26",
                              "--rate-mbit", "50", "--", "--batch", "64",
                              "--step-sleep-ms", "60")
            kinds = {f["finding"]["kind"] for _, f in stack.seen.values()}
            assert {"straggler", "hang", "slow_link"} <= kinds, kinds
            time.sleep(3 * SCRAPE_S)
            t_end = time.time()
            empty, checked = _run_queries(prom, ".*", t_start, t_end)
            # the job dashboard on the straggler's job alone, over its run (that job neither
            # hung nor had a slow link: those two panels are the other jobs')
            empty_job, _ = _run_queries(prom, job, t_start, t_job, only="ringwatch-job",
                                        skip={"Hang suspects", "Link suspects"})
    finally:
        done.set()
        stack.stop()
        for p in others:
            p.terminate()
        for p in others:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
    assert checked > 60
    assert empty == [], "panel queries with no data:\n" + "\n".join(empty)
    assert empty_job == [], f"with job={job}, no data:\n" + "\n".join(empty_job)


def _next_job(stack: Stack, name: str) -> None:
    """The next cluster run goes to ``name`` (its job id), its logs where the agent reads."""
    run_dir = stack.tmp / name
    run_dir.mkdir()
    (run_dir / "logs").symlink_to(stack.run_dir / "logs")
    stack.run_dir = run_dir


def _run_queries(prom, job: str, t0: float, t1: float, *, only: str | None = None,
                 skip=frozenset()) -> tuple[list[str], int]:
    """Each query (of dashboard ``only``, less the panels titled in ``skip``) with the
    variables at All and ``job`` as given, over [t0, t1]: those that returned nothing, and
    how many ran."""
    assert job == ".*" or job.replace("-", "").replace("_", "").isalnum(), job  # a regex
    panels_seen = {t.panel for d in load_all().values() for t in targets(d)}
    assert set(skip) <= panels_seen, set(skip) - panels_seen
    empty, checked = [], 0
    for dash in load_all().values():
        if only not in (None, dash["uid"]):
            continue
        variables = {v["name"]: ".*" for v in dash["templating"]["list"]}
        variables["job"] = job
        for t in targets(dash):
            if t.panel in skip:
                continue
            expr = substitute(t.expr, variables, rate_interval=RATE_INTERVAL,
                              range_=f"{int(t1 - t0)}s")
            if t.instant:
                result = prom._api("query", query=expr, time=f"{t1:.3f}")["result"]
            else:
                result = prom._api("query_range", query=expr, start=f"{t0:.3f}",
                                   end=f"{t1:.3f}", step="2")["result"]
            checked += 1
            if not result:
                empty.append(f"{t.where()}: {expr}")
    return empty, checked
