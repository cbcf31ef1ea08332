"""The node sidecar above the device seam: metric table, state, points, exporters, replay."""

from __future__ import annotations

import dataclasses
import gzip

import pytest

from ringwatch._clock import FakeClock
from ringwatch._config import AgentConfig, ConfigError
from ringwatch._metrics import COUNTER, METRICS, POINT_LABELS, RESOURCE_LABELS
from ringwatch.agent.sidecar._otlp_export import metrics_data
from ringwatch.agent.sidecar._points import collect_points
from ringwatch.agent.sidecar._prom_export import build_registry, exposition
from ringwatch.agent.sidecar._sidecar import Sidecar
from ringwatch.collectors._recording import (
    RecordingWriter,
    ReplayClient,
    ReplayHost,
    load_recording,
)
from ringwatch.collectors._synthetic import write_synthetic_recording
from ringwatch.collectors._types import (
    FastReading,
    GpuIdentity,
    HostReading,
    IbPortReading,
    NicReading,
    NvLinkReading,
    SlowReading,
)

_DERIVED = {"gpu": {"power_peak_mw", "power_min_mw", "samples", "info", "power_p99_mw",
                    "power_headroom_mw", "power_ramp_mw_per_s", "power_compute_mw",
                    "power_comm_mw"}, "ib": {"active"},
            "rank_op": {"count", "nbytes", "busy_ns", "gap_ns"},
            "rank_pg": {"last_started_seq", "last_completed_seq"},
            "rank": {"pending_ns", "step", "log_age_ns"},
            "rank_step": {"count", "nbytes", "busy_ns", "first_start_ns", "last_end_ns"},
            "rank_p2p": {"count"},
            "rank_work": {"step_ns", "blocked_ns"},
            "rank_recv": {"count", "nbytes", "duration_ns"},
            "agent": {"errors", "late_ticks", "cpu_ns"}}
_READINGS = {"gpu": (GpuIdentity, FastReading, SlowReading), "nvlink": (NvLinkReading,),
             "nic": (NicReading,), "ib": (IbPortReading,), "host": (HostReading,)}


def _fields(entity: str) -> set[str]:
    out = set(_DERIVED.get(entity, ()))
    for cls in _READINGS.get(entity, ()):
        out |= {f.name for f in dataclasses.fields(cls)}
    return out


def test_metric_table_is_consistent():
    by_name: dict[str, list] = {}
    for m in METRICS:
        by_name.setdefault(m.prom, []).append(m)
        assert m.field in _fields(m.entity), (m.prom, m.entity, m.field)
        assert m.prom.endswith("_total") == (m.kind == COUNTER), m.prom
        for label in (*m.labels, *m.const_labels, *([m.key_label] if m.key_label else [])):
            assert label in POINT_LABELS, (m.prom, label)
            assert label not in RESOURCE_LABELS, (m.prom, label)
    for name, specs in by_name.items():
        assert len({(s.kind, s.unit, s.help, s.otel) for s in specs}) == 1, name
        # specs sharing a name differ by their fixed labels, never collide
        assert len({tuple(sorted(s.const_labels.items())) for s in specs}) == len(specs), name


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "syn.jsonl.gz"
    return write_synthetic_recording(path, gpus=2, seconds=4.0)


def test_replay_plays_the_original_timing(recording):
    rec = load_recording(recording)
    assert rec.origin == "synthetic" and rec.complete
    times, values = rec.fast[1]
    clock = FakeClock()
    client = ReplayClient(rec, clock=clock, loop=False)
    assert [g.uuid for g in client.devices()] == ["GPU-synthetic-0000", "GPU-synthetic-0001"]
    assert client.read_fast(1) == values[0]
    clock.advance(1_525_000_000)  # between the samples at 1.50 s and 1.55 s
    assert client.read_fast(1) == values[times.index(1_500_000_000)]
    clock.advance(10_000_000_000)  # past the end: the last readings hold
    assert client.read_fast(1) == values[-1]
    assert client.read_slow(1) == rec.slow[1][1][-1]


def test_replay_loop_keeps_the_energy_counter_climbing(recording):
    rec = load_recording(recording)
    clock = FakeClock()
    client = ReplayClient(rec, clock=clock, loop=True)
    client.devices()
    seen = []
    for _ in range(60):  # 3 loops of a 4 s recording, every 0.2 s
        seen.append(client.read_fast(0).energy_mj)
        clock.advance(200_000_000)
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False)), seen
    assert seen[-1] - seen[0] > 2 * (rec.fast[0][1][-1].energy_mj - rec.fast[0][1][0].energy_mj)


def test_a_cut_recording_keeps_what_came_before(recording, tmp_path):
    raw = gzip.decompress(recording.read_bytes())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    rec = load_recording(cut)
    assert not rec.complete
    assert 0 < len(rec.fast[0][0]) < len(load_recording(recording).fast[0][0])


def test_slow_and_host_readings_survive_the_round_trip(tmp_path):
    clock = FakeClock()
    gpu = GpuIdentity(index=0, uuid="GPU-x", name="n")
    slow = SlowReading(power_limit_enforced_mw=500_000, throttle_time_ns={"power": 7},
                       nvlinks=(NvLinkReading(link=3, remote_pci_bus_id="0:5", tx_bytes=9),),
                       xid_total={79: 2})
    host = HostReading(nics=(NicReading(name="eth0", rx_bytes=5, up=True),),
                       ib_ports=(IbPortReading(device="mlx5_0", port=1, counters={"a": 1}),),
                       cpu_seconds={"user": 1.5}, pressure_some_us={"io": 3})
    w = RecordingWriter(tmp_path / "r.gz", host="h", gpus=[gpu], start_mono_ns=clock.mono_ns(),
                        started_wall_ns=clock.wall_ns(), clock=clock)
    w.fast(0, clock.mono_ns(), FastReading(energy_mj=1))
    clock.advance(10**9)
    w.slow(0, clock.mono_ns(), slow)
    w.fast(0, clock.mono_ns(), None)  # the GPU was lost
    w.host(clock.mono_ns(), host)
    w.close()
    rec = load_recording(tmp_path / "r.gz")
    assert rec.slow[0][1] == [slow]
    assert rec.fast[0] == ([0, 10**9], [FastReading(energy_mj=1), None])
    assert rec.host_readings == ([10**9], [host])
    assert ReplayHost(rec, clock=FakeClock()).read() == HostReading()  # nothing at t=0 yet


def _sidecar(recording, clock, **cfg):
    client = ReplayClient(recording, clock=clock, loop=False)
    host = HostReading(nics=(NicReading(name="eth9", rx_bytes=2048, up=True, speed_mbps=100),),
                       ib_ports=(IbPortReading(device="mlx5_0", port=1, tx_bytes=40,
                                               counters={"symbol_error": 3}, state="ACTIVE"),))
    s = Sidecar(AgentConfig(host="node-a", job_id="job-7", power_window_s=1.0, **cfg),
                device_client=client, host_collector=type("H", (), {"read": lambda _: host})(),
                clock=clock)
    s.open_devices()
    return s


def _value(points, prom, **labels):
    hits = [p.value for p in points if p.spec.prom == prom
            and labels.items() <= dict(p.resource + p.labels).items()]
    assert len(hits) == 1, (prom, labels, hits)
    return hits[0]


def test_points_are_in_base_units_and_say_where_they_come_from(recording):
    clock = FakeClock()
    s = _sidecar(recording, clock)
    rec = load_recording(recording)
    s.once()
    pts = collect_points(s.state, now_wall_ns=clock.wall_ns())
    first = rec.fast[0][1][0]
    assert _value(pts, "ringwatch_gpu_energy_joules_total", gpu="0",
                  uuid="GPU-synthetic-0000", host="node-a", job="job-7") == \
        pytest.approx(first.energy_mj / 1000)
    assert _value(pts, "ringwatch_gpu_power_watts", gpu="1") == \
        pytest.approx(rec.fast[1][1][0].power_instant_mw / 1000)
    assert _value(pts, "ringwatch_gpu_clock_hertz", gpu="0", clock="sm") == \
        first.sm_clock_mhz * 1e6
    assert _value(pts, "ringwatch_gpu_info", gpu="0", source="replay:synthetic") == 1
    assert _value(pts, "ringwatch_gpu_power_limit_watts", gpu="0", kind="enforced") == 700
    assert _value(pts, "ringwatch_gpu_throttle_seconds_total", gpu="0", reason="power") == 0
    assert _value(pts, "ringwatch_gpu_nvlink_bytes_total", gpu="1", link="1",
                  direction="transmit") == 1
    assert _value(pts, "ringwatch_network_speed_bytes_per_second", device="eth9") == 12.5e6
    assert _value(pts, "ringwatch_infiniband_port_counter_total", device="mlx5_0",
                  counter="symbol_error") == 3
    assert _value(pts, "ringwatch_infiniband_port_active", device="mlx5_0") == 1


def test_power_window_keeps_peak_and_trough_of_the_last_window(recording):
    clock = FakeClock()
    s = _sidecar(recording, clock)
    rec = load_recording(recording)
    for _ in range(40):  # 2 s at 20 Hz; the window is the last 1 s
        s.sample_fast()
        clock.advance(50_000_000)
    pts = collect_points(s.state)
    times, values = rec.fast[0]
    last = [v.power_instant_mw for t, v in zip(times, values, strict=True)
            if 950_000_000 <= t <= 1_950_000_000]
    assert _value(pts, "ringwatch_gpu_power_peak_watts", gpu="0") == pytest.approx(max(last) / 1000)
    assert _value(pts, "ringwatch_gpu_power_min_watts", gpu="0") == pytest.approx(min(last) / 1000)
    assert _value(pts, "ringwatch_gpu_samples_total", gpu="0") == 40


def test_prometheus_text_and_otlp_batch_carry_the_same_series(recording):
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    clock = FakeClock()
    s = _sidecar(recording, clock)
    s.once()
    text = exposition(build_registry(s.state))
    pts = collect_points(s.state, now_wall_ns=clock.wall_ns())
    req = encode_metrics(metrics_data(pts, start_ns=1, now_ns=clock.wall_ns(),
                                      source=s.state.source))
    n_points = 0
    gpu_resources = []
    for rm in req.resource_metrics:
        attrs = {a.key: a.value for a in rm.resource.attributes}
        if "hw.id" in attrs:
            gpu_resources.append(attrs)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                data = m.sum if m.HasField("sum") else m.gauge
                n_points += len(data.data_points)
                if m.name == "hw.energy":
                    assert m.unit == "J" and m.sum.is_monotonic
                    assert m.sum.aggregation_temporality == 2  # cumulative
                    assert data.data_points[0].start_time_unix_nano == 1
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert n_points == len(pts)
    assert len(samples) == len([p for p in pts if not p.spec.otlp_only])
    assert sorted(a["hw.id"].string_value for a in gpu_resources) == \
        ["GPU-synthetic-0000", "GPU-synthetic-0001"]
    assert all(a["ringwatch.source"].string_value == "replay:synthetic" and
               a["ringwatch.replayed"].bool_value and
               a["ringwatch.job.id"].string_value == "job-7" for a in gpu_resources)


def test_sampling_threads_run_on_schedule_and_stop(recording):
    s = _sidecar(recording, FakeClock(), fast_interval_s=0.01, slow_interval_s=0.05)
    s.clock = __import__("ringwatch._clock", fromlist=["SystemClock"]).SystemClock()
    s.start()
    import time

    time.sleep(0.5)
    s.stop(timeout_s=2)
    assert all(not t.is_alive() for t in s._threads)
    samples = s.state.gpus[0].samples
    assert 25 <= samples <= 52, samples
    assert s.state.host_reading is not None


def test_a_failing_reading_is_counted_not_raised(recording):
    s = _sidecar(recording, FakeClock())

    def boom(_index):
        raise RuntimeError("driver went away")

    s.client.read_slow = boom
    s._guarded("slow", s.sample_slow)
    s._guarded("slow", s.sample_slow)
    assert s.state.errors["slow"] == 2


def test_agent_config_precedence_and_errors():
    env = {"RINGWATCH_AGENT_FAST_INTERVAL_S": "0.1", "OTEL_EXPORTER_OTLP_ENDPOINT":
           "http://c:4318/", "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20t0k",
           "RINGWATCH_HOST": "n1", "RINGWATCH_AGENT_PROMETHEUS": "off"}
    cfg = AgentConfig.from_env(env, fast_interval_s=0.02)
    assert cfg.fast_interval_s == 0.02 and cfg.host == "n1"
    assert cfg.otlp_endpoint == "http://c:4318/v1/metrics"
    assert cfg.otlp_headers == (("authorization", "Bearer t0k"),)
    assert cfg.prometheus_listen is None
    env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] = "http://m/x"
    assert AgentConfig.from_env(env).otlp_endpoint == "http://m/x"
    with pytest.raises(ConfigError, match="positive"):
        AgentConfig.from_env({"RINGWATCH_AGENT_SLOW_INTERVAL_S": "-1"})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        AgentConfig.from_env({}, prometheus_listen="localhost")
    with pytest.raises(ConfigError, match="key=value"):
        AgentConfig.from_env({"OTEL_EXPORTER_OTLP_HEADERS": "novalue"})


def test_docs_metrics_md_is_generated_from_the_table():
    from pathlib import Path

    from ringwatch._metrics import metrics_markdown

    path = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
    assert path.read_text() == metrics_markdown(), \
        "regenerate with: ringwatch schema --metrics > docs/metrics.md"


def test_a_push_carries_the_token_read_from_a_file(recording, tmp_path):
    from ringwatch.service._receiver import OtlpReceiver

    f = tmp_path / "token"
    f.write_text("s3cret\n")
    seen = []
    with OtlpReceiver(handler=lambda req, info: seen.append(req), port=0,
                      token="s3cret") as rcv:
        for token_file, ok in ((f, True), (None, False)):
            cfg = AgentConfig.from_env({}, token_file=token_file)
            clock = FakeClock()
            s = _sidecar(recording, clock, otlp_endpoint=rcv.url, token=cfg.token)
            s.once()
            pusher = s.make_pusher()
            assert pusher.push(clock.wall_ns()) is ok
            pusher.close()
        assert len(seen) == 1 and rcv.stats().requests_total[401] >= 1
