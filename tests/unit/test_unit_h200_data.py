"""What ringwatch reads from the captures of a real NVIDIA H200 (``tests/data/h200/``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import polars as pl

import ringwatch
from ringwatch._clock import FakeClock
from ringwatch.analyzers import compare_flight_recorder
from ringwatch.collectors._recording import ReplayClient, load_recording

DATA = Path(__file__).resolve().parents[1] / "data" / "h200"


def test_the_real_nvml_recording_replays_with_its_load_phases():
    rec = load_recording(DATA / "nvml-ddp-nccl.jsonl.gz")
    assert rec.origin == "nvml" and rec.complete
    assert [g.name for g in rec.gpus] == ["NVIDIA H200"]
    ts, readings = rec.fast[0]
    gaps_ms = [(b - a) / 1e6 for a, b in zip(ts, ts[1:], strict=False)]
    assert 45 < statistics.median(gaps_ms) < 55  # 20 Hz
    energy = [r.energy_mj for r in readings]
    steps = [b - a for a, b in zip(energy, energy[1:], strict=False)]
    assert min(steps) >= 0  # a counter
    # The driver refreshes the energy counter about every 100 ms: half the 50 ms samples
    # repeat the previous value, which a power estimate must not read as zero power.
    assert 0.3 < sum(d == 0 for d in steps) / len(steps) < 0.7

    def watts(t0_s: float, t1_s: float) -> float:
        pts = [(t, e) for t, e in zip(ts, energy, strict=True) if t0_s <= t / 1e9 < t1_s]
        (ta, ea), (tb, eb) = pts[0], pts[-1]
        return (eb - ea) / 1e3 / ((tb - ta) / 1e9)

    idle, loaded = watts(0, 8), watts(20, 70)
    assert 50 < idle < 120 and loaded > 2.5 * idle  # the DDP job's compute shows
    clock = FakeClock()
    replay = ReplayClient(rec, clock=clock, loop=False)
    assert replay.source == "replay:nvml"
    assert replay.devices()[0].uuid == rec.gpus[0].uuid
    clock.advance(ts[1000])
    assert replay.read_fast(0) == readings[1000]  # the reading of that moment
    assert replay.read_slow(0).power_limit_enforced_mw == 700_000


def test_real_nccl_logs_match_their_flight_recorder():
    """DDP's start-up collectives reach ringwatch only through the NCCL completion hook,
    without sizes: the comparison with the Flight Recorder skips the sizes it cannot know
    instead of calling them 0 B."""
    logs = DATA / "logs" / "nccl-ops"
    df = ringwatch.read_events(logs)
    hook_only = df.filter(pl.col("api") == "nccl_hook")
    # DDP's parameter-shape check and module-state broadcasts, and its bucket-rebuild
    # broadcasts after the first step.
    assert hook_only["op"].to_list() == ["all_gather"] + ["broadcast"] * 4
    assert hook_only["nbytes"].null_count() == 5
    dump = json.loads((logs / "rank-00000" / "flight_recorder.json").read_text())
    cmp = compare_flight_recorder(df.filter(pl.col("rank") == 0), dump)
    assert cmp.ok, cmp
    assert cmp.matched == df.height


def test_real_nccl_rows_carry_device_durations_and_watchdog_late_ends():
    df = ringwatch.read_events(DATA / "logs" / "train-nccl-idle")
    ddp = df.filter(pl.col("api") == "ddp")
    assert ddp.height == 1 + 149 * 8  # 150 steps: 1 bucket in the first, then 8 each
    assert ddp["device_duration_ns"].null_count() == 0
    late = ddp.filter(pl.col("end_source") == "watchdog")
    # The host sees the end when the watchdog polls, tens of ms after the µs-long kernel.
    assert statistics.median(late["duration_ns"].to_list()) > 1000 * statistics.median(
        late["device_duration_ns"].to_list())
