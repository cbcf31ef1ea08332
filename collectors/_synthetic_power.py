"""Synthetic NVML readings whose power follows real ranks' compute and communication phases.

For machines without GPUs (the local cluster runs Gloo on CPUs): given a job's rows, each rank's
GPU (NVML index = its ``local_rank`` on its host) draws ``compute_w`` while the rank is between
collectives, ``comm_w`` while it has one in flight (its collectives' wall-clock intervals) and
``idle_w`` before its first and after its last. The readings mimic what a real H200 showed
(``tests/data/h200``): sampled at ``fast_hz``, the energy counter (the exact integral of that
power, at 1 ms) and the instantaneous field both change only every ``update_s`` (so half of
20 Hz samples repeat), slow readings at 1 Hz with the enforced limit and the cumulative
violation counters. A ``throttle`` window per rank caps that rank's GPU at ``cap_w`` while it
computes (its enforced limit is lowered to ``cap_w`` over the window, as an operator or a
domain power service would), lowers its SM clock and counts the capped time as power
violation time.

Every recording made here has ``origin = "synthetic"``: replayed, its series say
``source="replay:synthetic"``; analyzed, the reports say synthetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ringwatch.collectors._recording import Recording
from ringwatch.collectors._types import FastReading, GpuIdentity, SlowReading


@dataclass(frozen=True)
class PhasePowerModel:
    """How the synthetic GPUs draw power (W), are sampled, and are throttled."""

    compute_w: float = 620.0
    comm_w: float = 180.0
    idle_w: float = 70.0
    limit_w: float = 700.0
    noise_w: float = 5.0
    fast_hz: float = 20.0
    update_s: float = 0.1
    slow_hz: float = 1.0
    clock_mhz: int = 1980
    #: rank -> (from wall ns, to wall ns): its GPU capped at ``cap_w`` while computing.
    throttle: dict[int, tuple[int, int]] = field(default_factory=dict)
    cap_w: float = 420.0
    throttled_clock_mhz: int = 1350
    margin_s: float = 1.0
    seed: int = 0


def _in_union(t: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Whether each ``t`` lies inside any ``[start, end)``."""
    if not len(starts):
        return np.zeros(len(t), bool)
    order = np.argsort(starts)
    s, e = starts[order], np.maximum.accumulate(ends[order])
    j = np.searchsorted(s, t, side="right") - 1
    return (j >= 0) & (t < e[np.clip(j, 0, None)])


def phase_recordings(events: pl.DataFrame, model: PhasePowerModel = PhasePowerModel()
                     ) -> list[Recording]:
    """One synthetic :class:`Recording` per host of ``events`` (module docstring)."""
    rng = np.random.default_rng(model.seed)
    ev = events.select("rank", "host", "local_rank", "t_start_ns", "t_end_ns").drop_nulls()
    t_lo = int(ev["t_start_ns"].min() - model.margin_s * 1e9)
    t_hi = int(ev["t_end_ns"].max() + model.margin_s * 1e9)
    fine_ns = 1_000_000
    t = np.arange(t_lo, t_hi, fine_ns)
    out = []
    for host in sorted(ev["host"].unique().to_list()):
        ranks = ev.filter(pl.col("host") == host).group_by("rank").agg(
            pl.col("local_rank").first()).sort("local_rank")
        gpus, fast, slow = [], {}, {}
        for r, local in ranks.iter_rows():
            mine = ev.filter(pl.col("rank") == r)
            s, e = mine["t_start_ns"].to_numpy(), mine["t_end_ns"].to_numpy()
            active = (t >= s.min()) & (t < e.max())
            comm = _in_union(t, s, e)
            p = np.where(active, np.where(comm, model.comm_w, model.compute_w), model.idle_w)
            held = np.zeros(len(t), bool)
            if r in model.throttle:
                a, b = model.throttle[r]
                held = (t >= a) & (t < b) & active & ~comm & (p > model.cap_w)
                p = np.where(held, model.cap_w, p)
            p = p + rng.normal(0, model.noise_w, len(t))
            energy_mj = 10_000_000 + 1_000_000 * local + np.cumsum(p * fine_ns / 1e6)
            held_ns = np.cumsum(held) * fine_ns
            # the sensor publishes every update_s (at a phase of its own); readers see the
            # last published value
            phase = rng.uniform(0, model.update_s)
            pub = np.arange(t_lo + phase * 1e9, t_hi, model.update_s * 1e9).astype(np.int64)
            pub_i = np.clip((pub - t_lo) // fine_ns, 0, len(t) - 1)
            reads = np.arange(t_lo, t_hi, 1e9 / model.fast_hz).astype(np.int64)
            k = np.searchsorted(pub, reads, side="right") - 1
            times, values = [], []
            for tr, kk in zip(reads, k, strict=True):
                i = pub_i[max(kk, 0)]
                if kk < 0:
                    i = 0
                ti = int((tr - t_lo) // fine_ns)
                clock = model.throttled_clock_mhz if held[min(ti, len(t) - 1)] else model.clock_mhz
                times.append(int(tr - t_lo))
                values.append(FastReading(energy_mj=int(energy_mj[i]),
                                          power_instant_mw=int(p[i] * 1e3),
                                          power_average_mw=None, sm_clock_mhz=clock,
                                          memory_clock_mhz=3201))
            fast[local] = (times, values)
            st, sv = [], []
            for ts in np.arange(t_lo, t_hi, 1e9 / model.slow_hz).astype(np.int64):
                i = int(min((ts - t_lo) // fine_ns, len(t) - 1))
                st.append(int(ts - t_lo))
                capped = r in model.throttle and model.throttle[r][0] <= ts < model.throttle[r][1]
                limit = model.cap_w if capped else model.limit_w  # the limit lowered
                sv.append(SlowReading(power_limit_enforced_mw=int(limit * 1e3),
                                      temperature_c=60, throttle_reasons_mask=4 if held[i] else 0,
                                      throttle_time_ns={"power": int(held_ns[i]), "thermal": 0}))
            slow[local] = (st, sv)
            gpus.append(GpuIdentity(index=int(local), uuid=f"GPU-synthetic-{host}-{local}",
                                    name="Synthetic GPU (no GPU)",
                                    power_limit_default_mw=int(model.limit_w * 1e3),
                                    power_limit_max_mw=int(model.limit_w * 1e3),
                                    driver_version="synthetic"))
        out.append(Recording(host=host, started_wall_ns=t_lo, gpus=tuple(gpus), fast=fast,
                             slow=slow, host_readings=([], []), duration_ns=t_hi - t_lo,
                             origin="synthetic"))
    return out


def write_phase_recordings(events: pl.DataFrame, out_dir: str | Path,
                           model: PhasePowerModel = PhasePowerModel()) -> list[Path]:
    """Write :func:`phase_recordings` as ``OUT_DIR/<host>.synthetic.jsonl.gz`` (the format
    of ``ringwatch agent --record``, ``origin`` synthetic); returns the paths."""
    from ringwatch._clock import FakeClock
    from ringwatch.collectors._recording import RecordingWriter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rec in phase_recordings(events, model):
        clock = FakeClock()
        path = out_dir / f"{rec.host}.synthetic.jsonl.gz"
        w = RecordingWriter(path, host=rec.host, gpus=rec.gpus, start_mono_ns=clock.mono_ns(),
                            started_wall_ns=rec.started_wall_ns, clock=clock, origin="synthetic")
        lines = [(t, kind, i, r) for kind, part in ((0, rec.fast), (1, rec.slow))
                 for i, (ts, vs) in part.items() for t, r in zip(ts, vs, strict=True)]
        for t, kind, i, r in sorted(lines, key=lambda x: (x[0], x[1], x[2])):
            (w.fast if kind == 0 else w.slow)(i, clock.mono_ns() + t, r)
        w.close()
        paths.append(path)
    return paths


__all__ = ["PhasePowerModel", "phase_recordings", "write_phase_recordings"]
