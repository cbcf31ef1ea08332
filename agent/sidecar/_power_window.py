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
    wall ns), over the time both cover; nothing where that time holds no phase of one kind.
    Arrays only (no frame): this runs per GPU at every export."""
    import numpy as np

    from ringwatch.analyzers._power import energy_intervals
    from ringwatch.analyzers._power_phase import split_energy

    if len(energy) < 3 or not len(comm):
        return {}
    pts = np.array(energy, dtype=np.int64)
    a, b, e_j = energy_intervals(pts[:, 0], pts[:, 1])
    if not len(e_j):
        return {}
    spans = np.array(comm, dtype=np.int64)
    spans = spans[spans[:, 1] > a[0]]  # older collectives add nothing
    if not len(spans):
        return {}
    lo, hi = max(int(a[0]), int(spans[:, 0].min())), min(int(b[-1]), int(spans[:, 1].max()))
    if hi <= lo:
        return {}
    c = split_energy(a, b, e_j / ((b - a) / 1e9), spans[:, 0], spans[:, 1],
                     np.array([lo, hi]))
    d = {k: float(v[1] - v[0]) for k, v in c.items()}
    comm_s, all_s = d["comm_covered_s"], d["covered_s"]
    out = {}
    if comm_s > 0:
        out["power_comm_mw"] = d["comm_energy_j"] / comm_s * 1e3
    if all_s - comm_s > 0:
        out["power_compute_mw"] = (d["energy_j"] - d["comm_energy_j"]) / (all_s - comm_s) * 1e3
    return out
