"""Power analyzers against hand computations on small recordings."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from ringwatch.analyzers._power import (
    compute_energy_intervals,
    compute_power_grid,
    compute_sampling,
    recording_frames,
)
from ringwatch.analyzers._power_headroom import (
    PowerThresholds,
    compute_headroom,
    compute_throttle,
    detect_power_headroom,
)
from ringwatch.analyzers._power_phase import (
    compute_step_energy,
    fit_phase_power,
    summarize_phase_power,
)
from ringwatch.analyzers._power_swing import band_power, compute_swing
from ringwatch.analyzers._power_whatif import estimate_cap_cost, estimate_oversubscription

from fakes import frame, row

MS = 1_000_000


def fast_frame(host: str, gpu: int, t_ms: list[float], energy_mj: list[int | None], *,
               instant_w: list[float] | None = None, average_w: list[float] | None = None):
    n = len(t_ms)
    return pl.DataFrame({
        "host": [host] * n, "gpu": [gpu] * n, "t_ns": [int(t * MS) for t in t_ms],
        "energy_mj": energy_mj,
        "power_instant_mw": [None if w is None else int(w * 1e3) for w in instant_w]
        if instant_w else [None] * n,
        "power_average_mw": [int(w * 1e3) for w in average_w] if average_w else [None] * n,
        "sm_clock_mhz": [1980] * n}, schema={"host": pl.Utf8, "gpu": pl.Int64,
                                             "t_ns": pl.Int64, "energy_mj": pl.Int64,
                                             "power_instant_mw": pl.Int64,
                                             "power_average_mw": pl.Int64,
                                             "sm_clock_mhz": pl.Int64})


def slow_frame(host: str, gpu: int, t_ms: list[float], limit_w: float, *,
               power_ns: list[int] | None = None):
    n = len(t_ms)
    return pl.DataFrame({"host": [host] * n, "gpu": [gpu] * n,
                         "t_ns": [int(t * MS) for t in t_ms],
                         "power_limit_enforced_mw": [int(limit_w * 1e3)] * n,
                         "temperature_c": [60] * n, "throttle_reasons_mask": [0] * n,
                         "throttle_power_ns": power_ns or [0] * n,
                         "throttle_thermal_ns": [0] * n})


def held(values: list[int]) -> list[int]:
    """A counter that moves every other 50 ms sample (the H200's energy counter at 20 Hz)."""
    return [v for v in values for _ in (0, 1)][:-1]


# An energy counter read every 50 ms that changes every 100 ms: 100 W, then 300 W, then 400 W
# over three 100 ms intervals (10, 30, 40 J). The change is first seen at t = 100, 200,
# 300 ms; it happened between the sample before (50, 150, 250 ms) and that one: midpoint.
T = [0, 50, 100, 150, 200, 250, 300]
E = held([0, 10_000, 40_000, 80_000])


def test_power_from_an_energy_counter_that_repeats_half_its_samples():
    f = fast_frame("h", 0, T, E)
    iv = compute_energy_intervals(f)
    # when the first value was taken is unknown: the intervals start at the first change
    assert iv["t_start_ns"].to_list() == [75 * MS, 175 * MS]
    assert iv["t_end_ns"].to_list() == [175 * MS, 275 * MS]
    assert iv["energy_j"].to_list() == [30.0, 40.0]
    assert iv["power_w"].to_list() == pytest.approx([300.0, 400.0])
    (s,) = compute_sampling(f)
    assert s.sample_hz == pytest.approx(20.0) and s.energy_update_s == pytest.approx(0.1)
    assert s.source == "energy" and s.resolution_s == pytest.approx(0.1)
    assert s.nyquist_hz == pytest.approx(5.0) and s.repeated_share == pytest.approx(0.5)


def test_counter_wrap_is_unfolded_and_a_reset_dropped():
    top = 2 ** 32
    f = fast_frame("h", 0, [0, 100, 200, 300, 400],
                   [top - 15_000, top - 5_000, 5_000, 25_000, 1_000])
    iv = compute_energy_intervals(f)
    # 10 J over the 32-bit wrap, 20 J after it; the drop to 1000 mJ is a reset: left out
    assert iv["energy_j"].to_list() == [10.0, 20.0]
    (s,) = compute_sampling(f)
    assert (s.wraps, s.resets) == (1, 1)


def test_a_one_second_average_only_allows_half_a_hertz():
    f = fast_frame("h", 0, [0, 50, 100, 150], [None] * 4, average_w=[300, 300, 310, 310])
    (s,) = compute_sampling(f)
    assert s.source == "average_1s" and s.resolution_s == 1.0 and s.nyquist_hz == 0.5


def two_gpus():
    """GPU 0: the counter above (cells of 100 ms from t = 0: 100, 300, 400 W on a grid
    aligned to its changes); GPU 1: a steady 200 W."""
    t = [0, 100, 200, 300]
    f0 = fast_frame("h", 0, t, [0, 10_000, 40_000, 80_000])
    f1 = fast_frame("h", 1, t, [0, 20_000, 40_000, 60_000])
    slow = pl.concat([slow_frame("h", 0, [0, 300], 500.0), slow_frame("h", 1, [0, 300], 500.0)])
    return pl.concat([f0, f1]), slow


def test_headroom_per_gpu_node_and_job_is_the_limit_minus_the_quantile():
    fast, slow = two_gpus()
    grid = compute_power_grid(fast, step_s=0.1)
    # midpoints: changes seen at 100/200/300 ms after samples at 0/100/200: at 50, 150, 250
    assert grid["t_ns"].to_list() == [50 * MS, 150 * MS]
    assert grid["h/0"].to_list() == pytest.approx([300.0, 400.0])
    assert grid["h/1"].to_list() == pytest.approx([200.0, 200.0])
    hr = compute_headroom(grid, slow)
    by = {(r["scope"], r["name"]): r for r in hr.iter_rows(named=True)}

    def q(v, p):  # numpy's default (linear) quantile, by hand
        v = sorted(v)
        k = p * (len(v) - 1)
        return v[int(k)] + (k - int(k)) * (v[min(int(k) + 1, len(v) - 1)] - v[int(k)])

    assert by[("gpu", "h/0")]["p99_w"] == pytest.approx(q([300, 400], 0.99))
    assert by[("gpu", "h/0")]["headroom_p99_w"] == pytest.approx(500 - q([300, 400], 0.99))
    assert by[("gpu", "h/0")]["headroom_p99_9_w"] == pytest.approx(500 - q([300, 400], 0.999))
    assert by[("node", "h")]["limit_w"] == 1000.0
    assert by[("node", "h")]["headroom_p99_w"] == pytest.approx(1000 - q([500, 600], 0.99))
    assert by[("job", "job")]["mean_w"] == pytest.approx(550.0)
    assert not detect_power_headroom(hr, compute_throttle(slow))
    tight = detect_power_headroom(hr, compute_throttle(slow),
                                  thresholds=PowerThresholds(min_headroom_share=0.45))
    assert {f.cls for f in tight} == {"gpu at its power limit", "node at its power limit",
                                      "job at its power limit"}
    assert all(f.kind == "power_headroom" for f in tight) and len(tight) == 3  # not GPU 1


def test_time_throttled_from_the_violation_counter():
    slow = slow_frame("h", 0, [0, 1000, 2000, 3000], 700.0,
                      power_ns=[5 * 10**9, 5 * 10**9 + 100 * MS, 5 * 10**9 + 400 * MS, 0])
    th = compute_throttle(slow, end_ns=2000 * MS)
    assert th["power_share"][0] == pytest.approx(0.4 / 2.0)  # 400 ms of 2 s
    (f,) = detect_power_headroom(pl.DataFrame(), th)
    assert f.cls == "throttled GPU" and "20%" in f.evidence[0]
    # the reset (back to 0) counts from zero, not as a negative time
    assert compute_throttle(slow)["power_share"][0] == pytest.approx(0.4 / 3.0)


def events_one_rank():
    """Rank 0's collectives: [0, 50], [150, 200], [270, 300] ms, steps 0, 1, 2."""
    spans = [(0, 50), (150, 200), (270, 300)]
    return frame([row(0, i, i + 1, pg_ranks="0", step=i, mono_start_ns=a * MS,
                      mono_end_ns=b * MS) for i, (a, b) in enumerate(spans)])


def test_phase_split_and_energy_per_step_by_hand():
    # Power 100 W on [0, 100), 300 W on [100, 200), 400 W on [200, 300) ms
    iv = pl.DataFrame({"host": ["h"] * 3, "gpu": [0] * 3,
                       "t_start_ns": [0, 100 * MS, 200 * MS],
                       "t_end_ns": [100 * MS, 200 * MS, 300 * MS],
                       "energy_j": [10.0, 30.0, 40.0], "power_w": [100.0, 300.0, 400.0]})
    se = compute_step_energy(iv, events_one_rank())
    by = {r["step"]: r for r in se.iter_rows(named=True)}
    # step 0: [0, 50] all in its collective at 100 W
    assert by[0]["energy_j"] == pytest.approx(5.0)
    assert by[0]["comm_energy_j"] == pytest.approx(5.0) and by[0]["compute_s"] == 0
    # step 1: [50, 200]: 100 W x 0.05 + 300 W x 0.1; in collectives [150, 200] at 300 W
    assert by[1]["energy_j"] == pytest.approx(35.0)
    assert by[1]["comm_energy_j"] == pytest.approx(15.0)
    assert by[1]["compute_power_w"] == pytest.approx(20.0 / 0.1)
    assert by[1]["comm_power_w"] == pytest.approx(300.0)
    # step 2: [200, 300] at 400 W; in collectives [270, 300]
    assert by[2]["energy_j"] == pytest.approx(40.0)
    assert by[2]["comm_s"] == pytest.approx(0.03)
    assert by[2]["compute_energy_j"] == pytest.approx(28.0)
    summary = summarize_phase_power(se)
    r = summary["rank"].row(0, named=True)
    assert r["compute_power_w"] == pytest.approx((20 + 28) / (0.1 + 0.07))
    assert r["comm_power_w"] == pytest.approx((5 + 15 + 12) / (0.05 + 0.05 + 0.03))
    assert r["energy_per_step_j"] == pytest.approx(35.0)  # median of 5, 35, 40
    assert summary["job"]["energy_per_step_j"][0] == pytest.approx(35.0)


def test_the_fit_resolves_phases_shorter_than_the_counter():
    # a 120 ms compute / 53 ms communication step; the counter moves every ~100 ms (with
    # jitter, as a real one does) and is read at 20 Hz
    rng = np.random.default_rng(1)
    n = 30_000
    t = np.arange(n)  # ms
    comm = t % 173 >= 120
    p = np.where(comm, 150.0, 600.0) + rng.normal(0, 3, n)
    e = np.cumsum(p)  # mJ at the end of each ms
    upd = np.cumsum(rng.integers(95, 106, n // 90))
    upd = upd[upd < n]
    reads = np.arange(upd[0], n, 50)
    last = upd[np.searchsorted(upd, reads, side="right") - 1]
    f = fast_frame("h", 0, list(reads.astype(float)), [int(x) for x in e[last]])
    starts = list(range(120, n - 60, 173))
    ev = frame([row(0, i, i + 1, pg_ranks="0", step=i, mono_start_ns=s * MS,
                    mono_end_ns=(s + 53) * MS) for i, s in enumerate(starts)])
    fit = fit_phase_power(compute_energy_intervals(f), ev).row(0, named=True)
    # the counter's change is known to half a read period (25 ms): that error pulls the
    # shorter phase towards the mean (documented); the longer one comes out within 5%
    assert fit["compute_fit_w"] == pytest.approx(600, rel=0.05)
    assert fit["comm_fit_w"] == pytest.approx(150, rel=0.35)
    # the plain split of each interval's energy by overlap blurs them much more
    se = summarize_phase_power(compute_step_energy(compute_energy_intervals(f), ev))["rank"]
    assert se["compute_power_w"][0] < fit["compute_fit_w"] - 30
    assert se["comm_power_w"][0] > fit["comm_fit_w"] + 30


def test_swing_ramp_and_synchrony_by_hand():
    grid = pl.DataFrame({"t_ns": [0, 100 * MS, 200 * MS, 300 * MS],
                         "a/0": [100.0, 300.0, 400.0, 100.0], "a/1": [100.0, 300.0, 400.0, 100.0],
                         "b/0": [200.0, 200.0, 200.0, 200.0]})
    by = {(s.scope, s.name): s for s in compute_swing(grid)}
    a = by[("node", "a")]
    assert a.peak_to_trough_w == 600.0 and a.mean_w == 450.0
    assert a.ramp_up_max_w_per_s == pytest.approx(400 / 0.1)
    assert a.ramp_down_max_w_per_s == pytest.approx(600 / 0.1)
    assert a.correlation == pytest.approx(1.0) and a.synchrony == pytest.approx(1.0)
    assert a.nyquist_hz == pytest.approx(5.0)
    job = by[("job", "job")]
    assert job.gpus == 3 and job.peak_to_trough_w == 600.0
    # a flat GPU adds nothing to the sum's swing and no spread: synchrony stays 1
    assert job.synchrony == pytest.approx(1.0)


def test_band_power_stops_at_nyquist():
    dt = 0.1
    t = np.arange(0, 60, dt)
    slow = 100 * np.sin(2 * math.pi * 0.5 * t)
    band, share, rms, dom = band_power(500 + slow, dt, (0.1, 2.0))
    assert band == (0.1, 2.0) and share == pytest.approx(1.0, abs=1e-6)
    assert rms == pytest.approx(100 / math.sqrt(2), rel=1e-3) and dom == pytest.approx(0.5)
    fast = 100 * np.sin(2 * math.pi * 4.0 * t)
    assert band_power(500 + fast, dt, (0.1, 2.0))[1] == pytest.approx(0.0, abs=1e-6)
    # sampled once a second (a 1 s average): the band ends at 0.5 Hz
    assert band_power(500 + slow[::10], 1.0, (0.1, 2.0))[0] == (0.1, 0.5)
    assert band_power(np.ones(100), 1.0, (1.0, 2.0))[0] is None  # wholly above Nyquist


def square_wave_grid(n_gpus: int, *, synchronous: bool, seconds: float = 120.0, seed: int = 0):
    """Synthetic GPU power: training-like (every GPU 650 W computing / 150 W in its
    all-reduce, in step) or inference-like (each GPU's bursts independent)."""
    rng = np.random.default_rng(seed)
    dt = 0.1
    n = int(seconds / dt)
    cols = {"t_ns": (np.arange(n) * dt * 1e9).astype(np.int64)}
    phase = (np.arange(n) % 8) < 6
    for g in range(n_gpus):
        on = phase if synchronous else rng.random(n) < 0.75
        cols[f"n/{g}"] = np.where(on, 650.0, 150.0) + rng.normal(0, 5, n)
    return pl.DataFrame(cols)


def test_training_and_inference_told_apart_and_inference_fits_more_nodes():
    out = {}
    for name, sync in (("training", True), ("inference", False)):
        grid = square_wave_grid(8, synchronous=sync)
        node = next(s for s in compute_swing(grid) if s.scope == "node")
        total = grid.select(pl.sum_horizontal(pl.exclude("t_ns"))).to_series().to_numpy()
        out[name] = (node, estimate_oversubscription(total, rho=node.correlation,
                                                     budget_w=100 * 8 * 700.0,
                                                     node_limit_w=8 * 700.0))
    train, infer = out["training"][0], out["inference"][0]
    assert train.synchrony > 0.95 and infer.synchrony < 0.5
    assert train.correlation > 0.9 and abs(infer.correlation) < 0.1
    o_train, o_infer = out["training"][1], out["inference"][1]
    assert o_infer.nodes > o_train.nodes
    # in step, every node at its own 99th percentile at once
    assert o_train.nodes == pytest.approx(o_train.nodes_synchronous, abs=1)
    assert o_train.nodes_nameplate == 100


def test_oversubscription_by_hand():
    p = np.array([100.0] * 50 + [300.0] * 50)  # mean 200, 99th percentile 300
    o = estimate_oversubscription(p, rho=1.0, budget_w=3000.0, epsilon=0.01)
    assert (o.nodes, o.nodes_synchronous) == (10, 10)  # 10 x 300 W
    o = estimate_oversubscription(p, rho=0.0, budget_w=3000.0, epsilon=0.01)
    # largest n with 200 n + 100 sqrt(n) <= 3000: n = 13 (2600 + 360.6), not 14 (3174)
    assert o.nodes == 13


def test_cap_cost_by_hand():
    se = pl.DataFrame({"rank": [0, 0], "host": ["h", "h"], "gpu": [0, 0], "step": [0, 1],
                       "step_s": [1.0, 1.0], "compute_s": [0.6, 0.6],
                       "compute_power_w": [600.0, 400.0], "comm_power_w": [100.0, 100.0]})
    c = estimate_cap_cost(se, 500.0)
    # idle 100 W; step 0 needs (500-100)/(600-100) = 0.8 of its clock: 0.6/0.8 - 0.6 s more
    assert c.capped_share == 0.5
    assert c.added_s_per_step[0] == pytest.approx((0.6 / 0.8 - 0.6) / 2)  # mean of 0.15, 0
    assert c.added_s_per_step[1] == pytest.approx((0.6 / 0.8 ** (1 / 3) - 0.6) / 2)
    assert c.cost_share == pytest.approx(c.added_s_per_step[0] / 1.0)
    # from fitted levels: rank 0 computes at 600 W, communicates at 100 W, every step
    levels = pl.DataFrame({"rank": [0], "compute_fit_w": [600.0], "comm_fit_w": [100.0]})
    f = estimate_cap_cost(se, 500.0, levels=levels)
    assert f.capped_share == 1.0 and f.added_s_per_step[0] == pytest.approx(0.6 / 0.8 - 0.6)


def test_frames_from_a_recording(tmp_path):
    from ringwatch.collectors._recording import load_recording
    from ringwatch.collectors._synthetic import write_synthetic_recording

    rec = load_recording(write_synthetic_recording(tmp_path / "r.jsonl.gz", gpus=2,
                                                   seconds=3))
    fast, slow = recording_frames(rec)
    assert fast.height == 2 * 61 and set(fast["gpu"]) == {0, 1}
    assert "throttle_power_ns" in slow.columns
    assert fast["t_ns"].min() == rec.started_wall_ns


def test_the_worst_window_by_hand():
    from ringwatch.analyzers._power_headroom import compute_window_headroom

    grid = pl.DataFrame({"t_ns": [0, 100 * MS, 200 * MS, 300 * MS, 400 * MS],
                         "h/0": [100.0, 150.0, 450.0, 480.0, 999.0]})
    slow = slow_frame("h", 0, [0, 400], 500.0)
    w = compute_window_headroom(grid, slow, window_s=0.2,
                                thresholds=PowerThresholds(quantiles=(0.5,)))
    gpu = w.filter(pl.col("scope") == "gpu").row(0, named=True)
    # two full windows of two cells (the fifth cell is no full window): medians 125, 465
    assert gpu["windows"] == 2 and gpu["worst_start_ns"] == 200 * MS
    assert gpu["worst_headroom_p50_w"] == pytest.approx(500 - 465)
    assert gpu["median_headroom_p50_w"] == pytest.approx(500 - (125 + 465) / 2)
