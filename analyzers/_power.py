"""Power per GPU from NVML samples: the energy counter first, the instantaneous field beside it.

Input frames (built from a recording by :func:`recording_frames`, or from any other source with
the same columns):

``fast`` (one row per fast sample, ~20 Hz)
    ``host`` (Utf8), ``gpu`` (Int64, NVML index), ``t_ns`` (Int64, wall clock: the recording's
    start plus the sample's offset), ``energy_mj`` (Int64, the cumulative counter), and when
    read ``power_instant_mw``, ``power_average_mw``, ``sm_clock_mhz`` (Int64, null when the
    GPU did not give it).
``slow`` (one row per slow sample, ~1 Hz)
    ``host``, ``gpu``, ``t_ns``, ``power_limit_enforced_mw``, ``temperature_c``,
    ``throttle_reasons_mask`` and one cumulative ``throttle_<reason>_ns`` column per reason
    the GPU reports (``power``, ``thermal``, ``sync_boost``, ...).

The energy counter is the primary source (:func:`compute_energy_intervals`): it integrates
everything the GPU drew, while an instantaneous reading is one point of a sensor that (on
A100/H100) samples only part of the time. But the counter moves only every ~100 ms on an H200
(half of 20 Hz samples repeat the last value), so a repeated value is not a zero-power
interval: only the samples where the counter changed are kept, and the power over each
interval between two changes is its energy over its length. A counter that goes backwards
wrapped (its width is inferred: 32 or 64 bits, whichever gives a plausible power) or was reset
(a driver reload: that interval is dropped). A source that is a 1 s average (``power_average``,
``nvmlDeviceGetPowerUsage`` on Ampere and newer) carries nothing faster than ~0.5 Hz.

:func:`compute_sampling` states, per GPU, the sampling rate, the rate at which each source
really changes and the Nyquist frequency that follows; every spectral figure elsewhere stops
there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

FAST_COLUMNS = ("energy_mj", "power_instant_mw", "power_average_mw", "sm_clock_mhz")
#: The averaging window of ``nvmlDeviceGetPowerUsage`` on Ampere and newer (nvml.h).
AVERAGE_WINDOW_S = 1.0


def recording_frames(rec) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(fast, slow)`` frames (module docstring) from a loaded recording
    (:class:`ringwatch.collectors._recording.Recording`); lost-GPU samples (``None``) are left
    out."""
    fast_rows, slow_rows = [], []
    t0 = rec.started_wall_ns
    for gpu, (times, values) in rec.fast.items():
        for t, r in zip(times, values, strict=True):
            if r is not None:
                fast_rows.append((rec.host, gpu, t0 + t, *(getattr(r, c) for c in FAST_COLUMNS)))
    reasons: set[str] = set()
    for gpu, (times, values) in rec.slow.items():
        for t, r in zip(times, values, strict=True):
            if r is not None:
                reasons.update(r.throttle_time_ns)
                slow_rows.append((rec.host, gpu, t0 + t, r))
    reasons_sorted = sorted(reasons)
    fast = pl.DataFrame(fast_rows, schema={"host": pl.Utf8, "gpu": pl.Int64, "t_ns": pl.Int64,
                                           **{c: pl.Int64 for c in FAST_COLUMNS}}, orient="row")
    slow_schema = {"host": pl.Utf8, "gpu": pl.Int64, "t_ns": pl.Int64,
                   "power_limit_enforced_mw": pl.Int64, "temperature_c": pl.Int64,
                   "throttle_reasons_mask": pl.Int64,
                   **{f"throttle_{k}_ns": pl.Int64 for k in reasons_sorted}}
    slow = pl.DataFrame([(h, g, t, r.power_limit_enforced_mw, r.temperature_c,
                          r.throttle_reasons_mask,
                          *(r.throttle_time_ns.get(k) for k in reasons_sorted))
                         for h, g, t, r in slow_rows], schema=slow_schema, orient="row")
    return fast.sort("host", "gpu", "t_ns"), slow.sort("host", "gpu", "t_ns")


@dataclass(frozen=True)
class GpuSampling:
    """How one GPU was sampled, and what that allows.

    Attributes:
        host, gpu: Which GPU.
        samples: Fast samples.
        sample_hz: Rate the agent read at (median interval).
        energy_update_s: Median interval between changes of the energy counter (None: no
            counter).
        instant_update_s: Median interval between changes of the instantaneous power.
        source: The power series the analyses use: ``energy`` (the counter), ``instant``, or
            ``average_1s`` (only a 1 s average: nothing faster than 0.5 Hz survives).
        resolution_s: Time resolution of that series (its update interval; 1 s for an
            average).
        nyquist_hz: Highest frequency that series can show: half its update rate.
        repeated_share: Share of fast samples that repeated the counter's last value.
        wraps, resets: Counter wraps unfolded, and resets (intervals dropped).
    """

    host: str
    gpu: int
    samples: int
    sample_hz: float
    energy_update_s: float | None
    instant_update_s: float | None
    source: str
    resolution_s: float
    nyquist_hz: float
    repeated_share: float
    wraps: int = 0
    resets: int = 0


def _median_change_interval_s(t_ns: np.ndarray, v: np.ndarray) -> float | None:
    ok = ~np.isnan(v)
    t, v = t_ns[ok], v[ok]
    if len(v) < 3:
        return None
    changed = np.flatnonzero(np.diff(v) != 0) + 1
    if len(changed) < 2:
        return None
    return float(np.median(np.diff(t[changed]))) / 1e9


def _unwrap(t_ns: np.ndarray, e: np.ndarray, max_power_w: float) -> tuple[np.ndarray, int, int]:
    """Energy increments (mJ) of a counter, with wraps unfolded and resets as NaN."""
    d = np.diff(e)
    dt_s = np.diff(t_ns) / 1e9
    wraps = resets = 0
    for i in np.flatnonzero(d < 0):
        for bits in (32, 64):
            if e[i] < 2.0 ** bits:
                step = d[i] + 2.0 ** bits
                if 0 <= step <= max_power_w * 1e3 * max(dt_s[i], 1e-3):
                    d[i] = step
                    wraps += 1
                    break
        else:
            d[i] = np.nan
            resets += 1
    return d, wraps, resets


def energy_intervals(t_ns: np.ndarray, energy_mj: np.ndarray, *, max_power_w: float = 5000.0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`compute_energy_intervals` of one GPU on arrays (the agent's path, no frame):
    ``(t_start_ns, t_end_ns, energy_j)`` of the intervals between the counter's observed
    changes, each change timed at the midpoint of the sample that showed it and the one
    before; wraps unfolded, resets dropped."""
    t = np.asarray(t_ns, dtype=np.int64)
    e = np.asarray(energy_mj, dtype=np.float64)
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    if len(e) < 3:
        return empty
    keep = np.concatenate([[True], np.diff(e) != 0])
    # the counter moved somewhere between the sample before and the one that saw it:
    # the midpoint is the unbiased guess (the sample's own time is up to a period late)
    seen = t.copy()
    seen[1:] = np.where(keep[1:], (t[:-1] + t[1:]) // 2, t[1:])
    # the first value was taken at some unknown time before the first sample: intervals
    # run between observed changes only
    keep[0] = False
    t, e = seen[keep], e[keep]
    if len(e) < 2:
        return empty
    d, _, _ = _unwrap(t, e, max_power_w)
    ok = ~np.isnan(d)
    return t[:-1][ok], t[1:][ok], d[ok] / 1e3


def compute_energy_intervals(fast: pl.DataFrame, *, max_power_w: float = 5000.0) -> pl.DataFrame:
    """Per GPU, the intervals between changes of its energy counter and the power over each.

    Args:
        fast: The fast frame (module docstring).
        max_power_w: Highest power a GPU can draw (W): a backwards step of the counter is a
            wrap only when unfolding it gives at most this; otherwise a reset.

    Returns:
        Columns ``host``, ``gpu``, ``t_start_ns``, ``t_end_ns`` (when the counter took its
        value and its next one: the midpoint between the sample that first showed a value
        and the sample before it; the
        first value's own start is unknown, so the first interval starts at the first
        change), ``energy_j`` (the increment) and
        ``power_w`` (``energy_j`` over the interval), sorted by host, gpu, t_start_ns. A
        counter that repeats its value makes one longer interval, not a zero one; a reset
        interval is left out.
    """
    out = []
    for (host, gpu), g in fast.filter(pl.col("energy_mj").is_not_null()).group_by(
            "host", "gpu", maintain_order=True):
        t0, t1, e_j = energy_intervals(g["t_ns"].to_numpy(), g["energy_mj"].to_numpy(),
                                       max_power_w=max_power_w)
        if not len(e_j):
            continue
        out.append(pl.DataFrame({"host": host, "gpu": gpu, "t_start_ns": t0, "t_end_ns": t1,
                                 "energy_j": e_j, "power_w": e_j / ((t1 - t0) / 1e9)}))
    if not out:
        return pl.DataFrame(schema={"host": pl.Utf8, "gpu": pl.Int64, "t_start_ns": pl.Int64,
                                    "t_end_ns": pl.Int64, "energy_j": pl.Float64,
                                    "power_w": pl.Float64})
    return pl.concat(out).with_columns(pl.col("gpu").cast(pl.Int64)).sort(
        "host", "gpu", "t_start_ns")


def compute_sampling(fast: pl.DataFrame, *, max_power_w: float = 5000.0
                     ) -> tuple[GpuSampling, ...]:
    """How each GPU of ``fast`` was sampled and which power series the analyses use.

    The series is the energy counter's where the GPU has one, else the instantaneous field,
    else the 1 s average. Its resolution is its median update interval (a counter that moves
    every 100 ms read at 20 Hz resolves 100 ms, not 50) and its Nyquist frequency is half the
    rate that follows: nothing above it is reported anywhere.
    """
    out = []
    for (host, gpu), g in fast.group_by("host", "gpu", maintain_order=True):
        t = g["t_ns"].to_numpy()
        n = len(t)
        hz = 1e9 / float(np.median(np.diff(t))) if n > 1 else 0.0

        def col(c: str, g=g) -> np.ndarray:
            return g[c].cast(pl.Float64).fill_null(np.nan).to_numpy()

        e, inst = col("energy_mj"), col("power_instant_mw")
        e_up, i_up = _median_change_interval_s(t, e), _median_change_interval_s(t, inst)
        wraps = resets = 0
        repeated = 0.0
        if e_up is not None:
            ok = ~np.isnan(e)
            ev = e[ok]
            repeated = float(np.mean(np.diff(ev) == 0)) if len(ev) > 1 else 0.0
            keep = np.concatenate([[True], np.diff(ev) != 0])
            _, wraps, resets = _unwrap(t[ok][keep], ev[keep], max_power_w)
            source, res = "energy", e_up
        elif i_up is not None:
            source, res = "instant", i_up
        else:
            source, res = "average_1s", max(AVERAGE_WINDOW_S, 1.0 / hz if hz else 1.0)
        out.append(GpuSampling(host=str(host), gpu=int(gpu), samples=n, sample_hz=hz,
                               energy_update_s=e_up, instant_update_s=i_up, source=source,
                               resolution_s=res, nyquist_hz=0.5 / res, repeated_share=repeated,
                               wraps=wraps, resets=resets))
    return tuple(out)


def compute_power_grid(fast: pl.DataFrame, *, step_s: float | None = None,
                       sampling: tuple[GpuSampling, ...] | None = None) -> pl.DataFrame:
    """Every GPU's power on one shared time grid: the input of the swing and synchrony
    figures.

    Each GPU's series (its :func:`compute_sampling` source: the energy counter's piecewise
    constant power, else the instantaneous field held, else the 1 s average held) is averaged
    over each grid cell ``[t, t + step_s)``, so no GPU's value is invented between its
    updates. The grid spans the time every GPU has data; an interval dropped at a counter
    reset (a driver reload) adds no energy to the cells it spans.

    Args:
        fast: The fast frame.
        step_s: Grid step (s); default the coarsest resolution among the GPUs.
        sampling: :func:`compute_sampling` of ``fast`` (computed when not given).

    Returns:
        Columns ``t_ns`` (cell start) and one ``host/gpu`` column of power (W) per GPU.
    """
    sampling = sampling or compute_sampling(fast)
    if not sampling:
        return pl.DataFrame(schema={"t_ns": pl.Int64})
    step_s = step_s or max(s.resolution_s for s in sampling)
    series = {}
    for s in sampling:
        g = fast.filter((pl.col("host") == s.host) & (pl.col("gpu") == s.gpu))
        if s.source == "energy":
            iv = compute_energy_intervals(g)
            # each interval's two ends, so that a dropped (reset) interval is a gap that adds
            # no energy rather than one stretched over its neighbour
            e = iv["energy_j"].to_numpy()
            after = np.cumsum(e)
            bounds = np.column_stack([iv["t_start_ns"].to_numpy(),
                                      iv["t_end_ns"].to_numpy()]).ravel()
            cum = np.column_stack([after - e, after]).ravel()
        else:
            c = "power_instant_mw" if s.source == "instant" else "power_average_mw"
            h = g.filter(pl.col(c).is_not_null())
            bounds = h["t_ns"].to_numpy()
            p = h[c].to_numpy()[:-1] / 1e3
            cum = np.concatenate([[0.0], np.cumsum(p * np.diff(bounds) / 1e9)])
        series[f"{s.host}/{s.gpu}"] = (bounds, cum)
    lo = max(b[0] for b, _ in series.values())
    hi = min(b[-1] for b, _ in series.values())
    step_ns = int(step_s * 1e9)
    if hi - lo < 2 * step_ns:
        return pl.DataFrame(schema={"t_ns": pl.Int64})
    edges = np.arange(lo, hi + 1, step_ns)
    cols = {"t_ns": edges[:-1]}
    for name, (bounds, cum) in series.items():
        e = np.interp(edges, bounds, cum)  # cumulative energy is linear between updates
        cols[name] = np.diff(e) / step_s
    return pl.DataFrame(cols)


__all__ = ["AVERAGE_WINDOW_S", "FAST_COLUMNS", "GpuSampling", "compute_energy_intervals",
           "energy_intervals",
           "compute_power_grid", "compute_sampling", "recording_frames"]
