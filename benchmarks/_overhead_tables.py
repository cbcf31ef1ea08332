"""The tables and small statistics of ``overhead.py``: what a run prints, from its results."""

from __future__ import annotations

import os
import random
import statistics


# ---- small statistics ---------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def bootstrap_median_ci(values: list[float], *, n: int = 4000, seed: int = 0) -> tuple[float,
                                                                                         float]:
    """95% percentile-bootstrap interval of the median of ``values``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def step_table(res: dict) -> list[str]:
    lines = [f"{'arm':<8} {'runs':>4}  {'median step ms':>14}  {'overhead':>9}  "
             f"{'paired (median of pairs) [95% CI]':<36} logs",
             "-" * 87]
    for a, e in res["arms"].items():
        head = f"{a:<8} {e['runs']:>4}  {1e3 * e['median_step_s']:>14.3f}  "
        if a == "off":
            lines.append(head + f"{'(base)':>9}")
            continue
        lo, hi = e["paired_ci95"]
        paired = f"{pct(e['paired_overhead'])} [{pct(lo)}, {pct(hi)}]"
        logs = "-" if a == "pyhook" else ("ok" if e["logs_ok"] else "MISSING")
        lines.append(head + f"{pct(e['overhead']):>9}  {paired:<36} {logs}")
    aborts = {a: e["teardown_aborts"] for a, e in res["arms"].items() if e["teardown_aborts"]}
    if aborts:
        lines.append(f"PyTorch teardown aborts (after the measurement, tolerated): {aborts}")
    lines.append("per-run medians, ms: " + "; ".join(
        f"{a} " + " ".join(f"{1e3 * s:.2f}" for s in e["per_run_step_s"])
        for a, e in res["arms"].items()))
    loads = [r["loadavg_1min_before"] for r in res["runs"]]
    lines.append(f"1-min load average before the runs: {min(loads):.1f} .. {max(loads):.1f} "
                 f"(this machine: {os.cpu_count()} CPUs)")
    return lines


# ---- (b) hook cost per collective ---------------------------------------------------------------


def hook_table(res: dict) -> list[str]:
    def cell(row: dict, arm: str, key: str) -> str:
        return f"{row[arm][key]:.1f} ({row[arm]['paired_delta_' + key]:+.1f})"

    arms = [a for a in ("ringwatch", "native", "profiler")
            if a in next(iter(res["ops"].values()))]
    head = "".join(f"  {a + ' µs (+Δ)':>20}" for a in arms)
    rule = "-" * (35 + 22 * len(arms))
    lines = [f"{'op':<25} {'bare µs':>8}{head}", rule]
    for op, row in res["ops"].items():
        lines.append(f"{op:<25} {row['bare']['us_per_call']:>8.1f}"
                     + "".join(f"  {cell(row, a, 'us_per_call'):>20}" for a in arms))
    lines.append("wall µs per call: median over rounds of the slower rank's block time / K; "
                 "Δ: median over rounds of (arm - bare) in the same round")
    lines += ["", f"{'CPU time per call':<25} {'bare µs':>8}{head}", rule]
    for label, key in (("proc", "cpu_us_per_call"), ("main", "main_thread_cpu_us_per_call")):
        for op, row in res["ops"].items():
            lines.append(f"{op + ' [' + label + ']':<25} {row['bare'][key]:>8.1f}"
                         + "".join(f"  {cell(row, a, key):>20}" for a in arms))
    lines.append("CPU: [proc] = all threads of a rank (Gloo's, the agent's writer), [main] = the "
                 "calling thread; mean of the two ranks, median over rounds")
    lines.append(f"ringwatch recorded every call: {'yes' if res['recorded_ok'] else 'NO'} "
                 f"(rank 0 rows {res['recorded_rank0']}); profiler saw every call: "
                 f"{'yes' if res['profiler_ok'] else 'NO'}")
    return lines
