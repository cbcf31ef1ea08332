"""The agent's power figures over its windows: the quantile, headroom and ramp of each GPU's
instantaneous power, and its power while its rank computes and while it communicates.

Small and cheap on purpose (the agent's CPU budget is under 1% of a core): the window figures
are a sort and a pass over ``power_window_s`` of samples, taken only when an exporter asks;
the phase split reuses the post-mortem analyzer
(:func:`ringwatch.analyzers._power_phase.split_rank_energy`) over the energy counter's last
``phase_window_s`` and the rank's collectives read from its logs, up to the newest row (the
rows arrive a flush interval late, so the split covers the window's older part).
"""

from __future__ import annotations

import math


def window_figures(window, limit_mw: int | None) -> dict:
    """``power_p99_mw``, ``power_headroom_mw`` (limit minus that) and ``power_ramp_mw_per_s``
    (the largest change between two successive updates of the reading over the time between
    them) of ``window``: ``(mono ns, power mW)`` pairs, oldest first."""
    pts = list(window)
    if not pts:
        return {}
    values = sorted(p for _, p in pts)
    k = 0.99 * (len(values) - 1)  # numpy's linear quantile
    lo = int(math.floor(k))
    hi = min(lo + 1, len(values) - 1)
    p99 = values[lo] + (k - lo) * (values[hi] - values[lo])
    ramp = None
    last_t, last_p = pts[0]
    for t, p in pts[1:]:
        if p != last_p and t > last_t:
            r = abs(p - last_p) / ((t - last_t) / 1e9)
            ramp = r if ramp is None or r > ramp else ramp
            last_t, last_p = t, p
    return {"power_p99_mw": p99, "power_headroom_mw": None if limit_mw is None
            else limit_mw - p99, "power_ramp_mw_per_s": ramp}


def phase_figures(energy, comm) -> dict:
    """``power_compute_mw`` and ``power_comm_mw`` of one GPU from ``energy`` (``(wall ns,
    energy mJ)`` pairs, oldest first) and its rank's collectives ``comm`` (``(start, end)``
    wall ns), over the time both cover; nothing where that time holds no phase of one kind."""
    import numpy as np
    import polars as pl

    from ringwatch.analyzers._power import compute_energy_intervals
    from ringwatch.analyzers._power_phase import split_rank_energy

    pts = list(energy)
    spans = list(comm)
    if len(pts) < 3 or not spans:
        return {}
    fast = pl.DataFrame({"host": "", "gpu": 0, "t_ns": [t for t, _ in pts],
                         "energy_mj": [e for _, e in pts]})
    iv = compute_energy_intervals(fast)
    if iv.is_empty():
        return {}
    starts = np.array([s for s, _ in spans], dtype=np.int64)
    ends = np.array([e for _, e in spans], dtype=np.int64)
    a = max(int(iv["t_start_ns"][0]), int(starts.min()))
    b = min(int(iv["t_end_ns"][-1]), int(ends.max()))
    if b <= a:
        return {}
    c = split_rank_energy(iv, starts, ends, np.array([a, b]))
    d = {k: float(v[1] - v[0]) for k, v in c.items()}
    comm_s, all_s = d["comm_covered_s"], d["covered_s"]
    out = {}
    if comm_s > 0:
        out["power_comm_mw"] = d["comm_energy_j"] / comm_s * 1e3
    if all_s - comm_s > 0:
        out["power_compute_mw"] = (d["energy_j"] - d["comm_energy_j"]) / (all_s - comm_s) * 1e3
    return out
