"""Cost of the power analysis: 1 hour x 8 GPUs x 20 Hz of one node, and what 1,000 nodes take.

The samples are synthetic (no GPU here) and built directly as the analyzers' documented fast and
slow frames: per GPU an energy counter that moves every 100 ms (a random phase per GPU) read at
20 Hz, as the real H200 recording shows, a square compute/communication power wave and 1 Hz slow
readings. Timed, per node: sampling facts, energy intervals, the shared grid, headroom, swing
and synchrony, time throttled (what ``ringwatch power`` runs without a job). The job-level
figures of 1,000 nodes need every node's summed series on one grid: that sum is timed over
``--nodes`` nodes' grids and scaled. Also timed: the agent's per-export phase split of one GPU
(30 s of energy samples against 4,096 collectives), which the agent runs per GPU per export.

    .venv/bin/python benchmarks/power.py [--hours 1] [--gpus 8] [--runs 3] [--nodes 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import polars as pl

from ringwatch.analyzers._power import (
    compute_energy_intervals,
    compute_power_grid,
    compute_sampling,
)
from ringwatch.analyzers._power_headroom import compute_headroom, compute_throttle
from ringwatch.analyzers._power_swing import compute_swing


def node_frames(hours: float, gpus: int, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Synthetic fast and slow frames of one node (module docstring)."""
    rng = np.random.default_rng(seed)
    n = int(hours * 3600 * 20)
    t = np.arange(n, dtype=np.int64) * 50_000_000
    fast, slow = [], []
    for g in range(gpus):
        phase = rng.integers(0, 100_000_000)
        upd = (t - phase) // 100_000_000  # the counter's update each read shows
        upd_t = upd * 100_000_000 + phase
        power = np.where((upd_t // 1_000_000) % 800 < 560, 620.0, 180.0) + rng.normal(0, 5, n)
        energy = 10**9 + np.cumsum(power * 50).astype(np.int64)  # mJ per 50 ms
        shown = energy[np.clip((upd_t // 50_000_000), 0, n - 1)]
        fast.append(pl.DataFrame({"host": "node", "gpu": g, "t_ns": t, "energy_mj": shown,
                                  "power_instant_mw": (power * 1e3).astype(np.int64),
                                  "power_average_mw": None, "sm_clock_mhz": 1980},
                                 schema_overrides={"gpu": pl.Int64, "sm_clock_mhz": pl.Int64,
                                                   "power_average_mw": pl.Int64}))
        ts = t[::20]
        slow.append(pl.DataFrame({"host": "node", "gpu": g, "t_ns": ts,
                                  "power_limit_enforced_mw": 700_000, "temperature_c": 60,
                                  "throttle_reasons_mask": 0,
                                  "throttle_power_ns": np.arange(len(ts)) * 1_000_000,
                                  "throttle_thermal_ns": 0},
                                 schema_overrides={"gpu": pl.Int64}))
    return pl.concat(fast), pl.concat(slow)


def analyze_node(fast: pl.DataFrame, slow: pl.DataFrame) -> pl.DataFrame:
    sampling = compute_sampling(fast)
    compute_energy_intervals(fast)
    grid = compute_power_grid(fast, sampling=sampling)
    compute_headroom(grid, slow, fast=fast)
    compute_swing(grid)
    compute_throttle(slow)
    return grid


def agent_phase_split_s(reps: int = 20) -> float:
    """Seconds per call of the agent's phase split for one GPU (median of 5 batches)."""
    from ringwatch.agent.sidecar._power_window import phase_figures

    t0 = 10**18
    energy = [(t0 + i * 50_000_000, 10**9 + (i // 2) * 40_000) for i in range(600)]
    comm = [(t0 + i * 7_000_000, t0 + i * 7_000_000 + 3_000_000) for i in range(4096)]
    phase_figures(energy, comm)  # warm the imports
    batches = []
    for _ in range(5):  # the median batch: the machine is shared
        start = time.perf_counter()
        for _ in range(reps):
            phase_figures(energy, comm)
        batches.append((time.perf_counter() - start) / reps)
    return statistics.median(batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=50, help="nodes whose grids are summed")
    a = ap.parse_args()
    fast, slow = node_frames(a.hours, a.gpus)
    print(f"one node: {fast.height:,} fast samples ({a.hours:g} h x {a.gpus} GPUs x 20 Hz), "
          f"{slow.height:,} slow; {fast.estimated_size() / 2**20:.0f} MiB")
    times = []
    grid = None
    for run in range(a.runs):
        start = time.perf_counter()
        grid = analyze_node(fast, slow)
        times.append(time.perf_counter() - start)
        print(f"  run {run + 1}: {times[-1]:.2f} s")
    per_node = statistics.median(times)
    cols = [c for c in grid.columns if c != "t_ns"]
    node_sum = grid.select(pl.sum_horizontal(cols)).to_series().to_numpy()
    start = time.perf_counter()
    job = np.zeros_like(node_sum)
    for _ in range(a.nodes):  # the job's sum over nodes' grids (the same grid here)
        job += node_sum
    np.quantile(job, [0.99, 0.999])
    sum_s = (time.perf_counter() - start) / a.nodes
    print(f"per node (median of {a.runs}): {per_node:.2f} s "
          f"({fast.height / per_node / 1e6:.2f} M samples/s)")
    print(f"1,000 nodes: {1000 * per_node / 60:.1f} CPU-minutes for the nodes "
          f"(independent: {1000 * per_node / 16 / 60:.1f} min on 16 cores) + "
          f"{1000 * sum_s:.2f} s for the job's sum over nodes; "
          f"{1000 * fast.height / 1e6:,.0f} M samples")
    split = agent_phase_split_s()
    print(f"agent phase split: {split * 1e3:.2f} ms per GPU per export; 8 GPUs, an export "
          f"every 10 s and a scrape every 15 s: {8 * split * (1 / 10 + 1 / 15) * 100:.3f}% "
          f"of one core")


if __name__ == "__main__":
    main()
