"""The agent's power figures: quantile, headroom, ramp over the power window, and the phase
power of each GPU from its rank's collectives, against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from ringwatch.agent.sidecar._node_state import NodeState
from ringwatch.agent.sidecar._points import collect_points
from ringwatch.agent.sidecar._power_window import phase_figures, window_figures
from ringwatch.agent.sidecar._rank_tail import RankSummary
from ringwatch.collectors._types import FastReading, GpuIdentity, SlowReading

MS = 1_000_000


def test_window_quantile_headroom_and_ramp_by_hand():
    # updates every 100 ms read at 20 Hz: 100, 100, 300, 300, 200, 200 W
    window = [(i * 50 * MS, p * 1000) for i, p in enumerate([100, 100, 300, 300, 200, 200])]
    f = window_figures(window, 700_000)
    assert f["power_p99_mw"] == pytest.approx(np.quantile([100, 100, 300, 300, 200, 200], 0.99)
                                              * 1000)
    assert f["power_headroom_mw"] == pytest.approx(700_000 - f["power_p99_mw"])
    # +200 W over the 100 ms between the two updates; then -100 W over 100 ms
    assert f["power_ramp_mw_per_s"] == pytest.approx(200_000 / 0.1)
    assert window_figures([], 700_000) == {}
    assert window_figures(window, None)["power_headroom_mw"] is None


def test_phase_power_by_hand():
    # energy counter read every 50 ms, moving every 100 ms: 200 W, then in the rank's
    # collective [250, 450) ms it falls to 100 W, then 200 W again
    t = np.arange(0, 1000, 1)
    p = np.where((t >= 250) & (t < 450), 100.0, 200.0)
    e = np.cumsum(p)  # mJ
    reads = np.arange(0, 1000, 50)
    energy = [(int(r * MS), int(e[(r // 100) * 100])) for r in reads]
    f = phase_figures(energy, [(250 * MS, 450 * MS), (850 * MS, 860 * MS)])
    # the counter publishes at 0, 100, ... ms the energy through that ms; it is first read
    # at the next 100 ms and that change is timed to the midpoint, 25 ms earlier...: e.g.
    # [175, 275) holds ms 201-300: 49 ms at 200 W and 51 at 100 W = 14.9 J (149 W);
    # [275, 375) 10 J (100 W); [375, 475) ms 401-500: 49 at 100 W, 51 at 200 W (151 W).
    # The collective [250, 450) overlaps them by 25, 100 and 75 ms (the one at 850 ms is in
    # an interval of 200 W: it adds 10 ms at 200 W):
    comm_j = 0.025 * 149 + 0.1 * 100 + 0.075 * 151 + 0.01 * 200
    assert f["power_comm_mw"] == pytest.approx(comm_j / 0.21 * 1000)
    assert f["power_compute_mw"] > f["power_comm_mw"]
    assert phase_figures(energy, []) == {}


def test_the_agent_exports_headroom_ramp_and_phase_power():
    st = NodeState(host="n", job="j", power_window_s=10.0, phase_window_s=30.0)
    st.set_devices([GpuIdentity(index=0, uuid="GPU-0", name="test")])
    st.record_slow(0, SlowReading(power_limit_enforced_mw=700_000))
    energy = 0
    for i in range(40):  # 2 s: 600 W computing, 150 W in collectives [k s + 0.6, k s + 1.0)
        t = i * 50 * MS
        inside = (i * 50) % 1000 >= 600
        p = 150 if inside else 600
        if i % 2 == 0:
            energy += p * 100  # mJ per 100 ms
        st.record_fast(0, FastReading(energy_mj=energy, power_instant_mw=p * 1000), t,
                       10**18 + t)
    s = RankSummary(job="j", rank=0, local_rank=0, host="n")
    s.recent.extend([(10**18 + 600 * MS, 10**18 + 1000 * MS),
                     (10**18 + 1600 * MS, 10**18 + 2000 * MS)])
    s.last_end_ns = 10**18 + 2000 * MS
    st.ranks[("j", 0)] = s
    pts = {(p.spec.prom, dict(p.labels).get("phase")): p.value for p in collect_points(st)}
    assert pts[("ringwatch_gpu_power_headroom_watts", None)] == pytest.approx(700 - 600)
    assert pts[("ringwatch_gpu_power_p99_watts", None)] == pytest.approx(600)
    assert pts[("ringwatch_gpu_power_ramp_watts_per_second", None)] > 0
    compute = pts[("ringwatch_gpu_phase_power_watts", "compute")]
    comm = pts[("ringwatch_gpu_phase_power_watts", "comm")]
    assert comm < compute and 150 <= comm < 400 and 400 < compute <= 600
