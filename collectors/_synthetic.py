"""A synthetic recording, for machines without GPUs: clearly marked, never taken for real.

The file has the format of ``ringwatch agent --record`` with ``"origin": "synthetic"`` in its
header, and a replay of it labels every series ``source="replay:synthetic"``. The readings follow
a training step's shape: a compute phase near the power limit, a communication phase well
below it, energy the integral of power (so a rate() of the energy counter gives the mean power),
clocks dipping at the power limit. Tests and the local demo use it; real recordings taken on a
GPU node replace it wherever one exists (``tests/data/``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from ringwatch._clock import FakeClock
from ringwatch.collectors._recording import RecordingWriter
from ringwatch.collectors._types import (
    FastReading,
    GpuIdentity,
    HostReading,
    NicReading,
    NvLinkReading,
    SlowReading,
)

_LIMIT_MW = 700_000


def synthetic_gpus(n: int) -> list[GpuIdentity]:
    return [GpuIdentity(index=i, uuid=f"GPU-synthetic-{i:04d}", name="Synthetic H100 (no GPU)",
                        pci_bus_id=f"00000000:{0x18 + i:02X}:00.0", memory_total_bytes=80 << 30,
                        mig_enabled=False, power_limit_default_mw=_LIMIT_MW,
                        power_limit_min_mw=200_000, power_limit_max_mw=_LIMIT_MW,
                        driver_version="synthetic") for i in range(n)]


def _power_mw(t_s: float, gpu: int, step_s: float, rng: random.Random) -> int:
    phase = (t_s + 0.01 * gpu) % step_s / step_s
    base = 650_000 if phase < 0.7 else 180_000  # compute, then communication
    return int(base + rng.gauss(0, 8_000))


def write_synthetic_recording(path: str | Path, *, gpus: int = 8, seconds: float = 30.0,
                              fast_hz: float = 20.0, step_s: float = 0.8,
                              seed: int = 0) -> Path:
    """Write a synthetic recording of ``gpus`` GPUs over ``seconds``; returns its path."""
    rng = random.Random(seed)
    clock = FakeClock()
    ids = synthetic_gpus(gpus)
    w = RecordingWriter(path, host="synthetic-node", gpus=ids, start_mono_ns=clock.mono_ns(),
                        started_wall_ns=clock.wall_ns(), clock=clock, origin="synthetic")
    period_ns = int(1e9 / fast_hz)
    energy = [1_000_000_000 + 37_000_000 * i for i in range(gpus)]
    nic_bytes = 0
    steps = int(seconds * fast_hz)
    for k in range(steps + 1):
        t_s = k / fast_hz
        now = clock.mono_ns()
        for i in range(gpus):
            p = _power_mw(t_s, i, step_s, rng)
            energy[i] += p * period_ns // 1_000_000_000
            sm = 1980 if p < 600_000 else 1755
            w.fast(i, now, FastReading(energy_mj=energy[i], power_instant_mw=p,
                                       power_average_mw=415_000, sm_clock_mhz=sm,
                                       memory_clock_mhz=2619))
        if k % int(fast_hz) == 0:
            sec = k // int(fast_hz)
            for i in range(gpus):
                links = tuple(NvLinkReading(link=j, remote_pci_bus_id="00000000:05:00.0",
                                            tx_bytes=sec * 9_000_000_000 + j,
                                            rx_bytes=sec * 9_000_000_000 + j, crc_errors=0,
                                            replay_errors=0, recovery_errors=0)
                              for j in range(2))
                w.slow(i, now, SlowReading(
                    power_limit_enforced_mw=_LIMIT_MW, gpu_utilization_pct=92,
                    memory_utilization_pct=41, memory_used_bytes=61 << 30,
                    memory_total_bytes=80 << 30,
                    temperature_c=62 + int(3 * math.sin(sec / 10)), throttle_reasons_mask=0,
                    throttle_time_ns={"power": sec * 40_000_000, "thermal": 0},
                    ecc_corrected_total=0, ecc_uncorrected_total=0, pcie_replay_total=0,
                    remapped_rows_correctable_total=0, remapped_rows_uncorrectable_total=0,
                    row_remap_pending=0, row_remap_failed=0, nvlinks=links, xid_total={}))
            nic_bytes += 1_200_000_000
            w.host(now, HostReading(nics=(NicReading(
                name="ib0-synthetic", rx_bytes=nic_bytes, tx_bytes=nic_bytes,
                rx_packets=nic_bytes // 4096, tx_packets=nic_bytes // 4096, rx_errors=0,
                tx_errors=0, rx_dropped=0, tx_dropped=0, up=True, speed_mbps=400_000),),
                cpu_seconds={"user": 100.0 + sec * 12, "system": 10.0 + sec, "idle": 1e4},
                load1=12.0, memory_total_bytes=2 << 40, memory_available_bytes=1 << 40))
        clock.advance(period_ns)
    w.close()
    return Path(path)
