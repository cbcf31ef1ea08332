"""Passive link analysis: per-group transfer bandwidth, slow groups, suspects across groups."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import polars as pl
import pytest

from ringwatch.analyzers import (
    compute_group_bandwidth,
    compute_slow_groups,
    detect_slow_links,
    detect_stragglers,
)
from ringwatch.analyzers._links import compute_p2p_bandwidth, usual_bandwidth
from ringwatch.analyzers._stragglers import compute_group_lateness

from fakes import frame, row

MS = 1_000_000
NBYTES = 1_000_000


def job(groups: dict[str, list[int]], *, steps=40, onset=20, slow_hosts=(), slow=4.0,
        late=None, late_ms=0.0, seed=0, per_host=2, chain=False, late_from=None,
        spread=None, until=None):
    """Each step, one all_reduce of 1 MB per group. A transfer takes 10 ms (+-1; with
    ``spread``, times a log-normal factor of that sigma); a group with a member on a host of
    ``slow_hosts`` and members on other hosts takes ``slow`` times as long from ``onset`` on
    (to ``until``, excluded; with ``spread``, exactly ``slow`` times 10 ms). Rank ``late``
    arrives ``late_ms`` after its peers from ``late_from`` (default ``onset``).
    With ``chain`` the groups run one after the other within a step, so the members of a slow
    group come late to their next group by the extra transfer time.
    """
    rng = random.Random(seed)
    host = {r: f"host{r // per_host}" for g in groups.values() for r in g}
    rows, idx, seqs = [], dict.fromkeys(host, 0), dict.fromkeys(groups, 0)
    for step in range(steps):
        behind = dict.fromkeys(host, 0.0)  # ms each rank carries from its earlier groups
        for name, members in groups.items():
            seqs[name] += 1
            t0 = (step * 1000 + list(groups).index(name) * 100) * MS
            hosts = {host[m] for m in members}
            xfer = 10 + rng.uniform(-1, 1) if spread is None else 10 * math.exp(
                rng.gauss(0, spread))
            if (onset <= step < (until or steps) and len(hosts) > 1
                    and hosts & set(slow_hosts)):
                xfer = (xfer if spread is None else 10) * slow
            starts = {m: t0 + int((rng.uniform(0, 2) + behind[m]) * MS) for m in members}
            if late in members and step >= (onset if late_from is None else late_from):
                starts[late] = max(starts.values()) + int(late_ms * MS)
            end = max(starts.values()) + int(xfer * MS)
            if chain:
                for m in members:
                    behind[m] = (end - t0) / MS - 12
            for m in members:
                x = row(m, idx[m], seqs[name], pg=name, step=step, nbytes=NBYTES,
                        pg_ranks=",".join(map(str, members)), mono_start_ns=starts[m],
                        mono_end_ns=end)
                x["host"] = host[m]
                idx[m] += 1
                rows.append(x)
    return frame(rows).sort("rank", "idx")


WORLD = {"0": list(range(8))}
# 8 ranks on 4 hosts of 2: "tp" groups span two hosts, "dp" groups pair host h with h + 2.
LAYERED = {"tp0": [0, 1, 2, 3], "tp1": [4, 5, 6, 7], "dp0": [0, 4], "dp1": [1, 5],
           "dp2": [2, 6], "dp3": [3, 7]}


def test_bandwidth_is_bytes_over_the_shortest_duration():
    bw = compute_group_bandwidth(job(WORLD, steps=3))
    assert bw.height == 3 and set(bw["hosts"]) == {"host0,host1,host2,host3"}
    # 1 MB in ~10 ms: ~100 MB/s, whatever the arrival spread
    assert all(85 <= v <= 115 for v in bw["MBps"]), bw


def test_healthy_job_has_no_slow_group():
    for seed in range(3):
        assert detect_slow_links(job(LAYERED, seed=seed)) == ()
        assert not compute_slow_groups(compute_group_bandwidth(job(WORLD, seed=seed)))[
            "slow"].any()


def test_one_world_group_leaves_every_host_a_suspect():
    (f,) = detect_slow_links(job(WORLD, slow_hosts=("host2",)))
    assert (f.kind, f.cls, f.pg) == ("slow_link", "slow communication", "0")
    assert f.hosts == ("host0", "host1", "host2", "host3") and f.ranks == tuple(range(8))
    assert (f.since_step, f.detected_step) == (20, 23)  # 4 slow steps in a row
    assert any("ringwatch probe" in e for e in f.evidence)
    assert f.confidence <= 0.5  # not narrowed down
    # ~10 ms per step became ~40: the job loses ~30 ms per step
    assert 0.025 <= f.gain_s_per_step <= 0.035


def test_groups_over_different_hosts_narrow_it_to_one_host():
    (f,) = detect_slow_links(job(LAYERED, slow_hosts=("host1",)))
    # host1 holds ranks 2, 3: tp0 (hosts 0, 1), dp2 and dp3 (hosts 1, 3) slow; the others not
    assert f.hosts == ("host1",), f
    assert f.ranks == (0, 1, 2, 3, 6, 7)
    assert "common to the 3 slow group(s)" in f.evidence[-1]
    assert f.confidence > 0.5


def test_a_straggler_is_not_a_slow_link_and_a_slow_link_is_not_a_straggler():
    late = job(WORLD, late=5, late_ms=30)
    assert detect_slow_links(late) == ()
    assert [f.ranks for f in detect_stragglers(late)] == [(5,)]
    assert detect_stragglers(job(WORLD, slow_hosts=("host2",))) == ()


def test_a_mild_slowdown_is_below_the_ratio():
    assert detect_slow_links(job(WORLD, slow_hosts=("host2",), slow=1.5)) == ()
    (f,) = detect_slow_links(job(WORLD, slow_hosts=("host2",), slow=1.5), ratio=1.3)
    assert f.since_step == 20


def test_a_group_that_varies_much_must_fall_by_more_than_its_noise():
    raised = 0
    for seed in range(6):
        # slow below the usual / exp(2 x the robust spread of its log bandwidth over its 20
        # baseline steps: ~0.6, as far as 20 steps tell it), or the ratio (2x) if more
        healthy = job(WORLD, spread=0.6, seed=seed)
        g = compute_slow_groups(compute_group_bandwidth(healthy)).row(0, named=True)
        below, usual_ms = g["slow_below"], NBYTES / 1e3 / g["usual_MBps"]
        spread = usual_bandwidth(compute_group_bandwidth(healthy), warmup_steps=2)[
            "spread_log"][0]
        assert below == pytest.approx(max(2.0, math.exp(2 * spread)))
        if 0.85 * below <= 2:  # the noise left the ratio as the bar
            continue
        raised += 1
        # five steps at 0.85 of that factor over the usual transfer time (10 ms each, from
        # the job's): a burst of load on shared cores, beyond the ratio, within the noise
        burst = {"onset": 30, "until": 35, "slow": 0.85 * below * usual_ms / 10,
                 "slow_hosts": ("host2",)}
        noisy = job(WORLD, spread=0.6, seed=seed, **burst)
        assert detect_slow_links(noisy) == (), seed
        assert len(detect_slow_links(noisy, noise=0)) == 1  # the ratio alone: slow
        # on a quiet fabric (10 ms +-1) as far a fall is slow: the noise only raises the bar
        (f,) = detect_slow_links(job(WORLD, seed=seed, **{**burst, "slow": 0.85 * below}))
        assert (f.since_step, f.detected_step) == (30, 33)
    assert raised >= 4
    # a link fault far beyond the noise is slow, and says how far the bar was raised
    (f,) = detect_slow_links(job(WORLD, spread=0.5, onset=20, slow=30, slow_hosts=("host2",)))
    assert f.since_step == 20 and "only" in f.evidence[0], f.evidence


def test_late_to_one_group_because_another_is_slow_is_not_a_straggler():
    # tp0 crosses the slow link, so ranks 0-3 reach their dp all-reduce ~30 ms late: their dp
    # peers wait for them, but inside tp0 they are all slowed alike.
    ev = job(LAYERED, slow_hosts=("host1",), chain=True)
    assert detect_stragglers(ev) == ()
    (f,) = detect_slow_links(ev)
    assert f.hosts[0] == "host1"
    lag = compute_group_lateness(ev, [0], 25, 35)
    by = {r["pg"]: r for r in lag.iter_rows(named=True)}
    assert by["dp0"]["lag_ms"] > 20 and by["dp0"]["late"]
    assert not by["tp0"]["late"]


def test_a_compute_straggler_is_late_at_every_group():
    ev = job(LAYERED, late=5, late_ms=30, chain=True)
    (f,) = detect_stragglers(ev)
    assert f.ranks == (5,) and f.cls == "compute straggler"
    assert detect_slow_links(ev) == ()
    lag = compute_group_lateness(ev, [5], 25, 35)
    assert lag["late"].all() and set(lag["pg"]) == {"tp1", "dp1"}


def test_a_probe_narrows_the_passive_suspects(tmp_path):
    import json
    from pathlib import Path

    from ringwatch._analyze import with_probe

    doc = json.loads((Path(__file__).parents[1] / "data" /
                      "probe-3hosts-host1-egress-200mbit.json").read_text())
    (passive,) = detect_slow_links(job(WORLD, slow_hosts=("host1",), per_host=3))
    assert passive.hosts == ("host0", "host1", "host2")
    narrowed, probed = with_probe((passive,), doc)
    assert narrowed.kind == "slow_link" and narrowed.hosts == ("host1",)
    assert narrowed.confidence > passive.confidence
    assert "the probe names host1" in narrowed.evidence[-1]
    assert (probed.cls, probed.hosts) == ("sender side", ("host1",))


def test_a_group_slowed_at_another_time_is_set_aside():
    # host1's link slows tp0, dp2, dp3 from step 40; tp1 (hosts 2, 3) slowed from step 28
    # for an unrelated reason: no host is common to all four, but one fault slows at one time.
    fault = job(LAYERED, steps=55, onset=40, slow_hosts=("host1",))
    other = job(LAYERED, steps=55, onset=28, slow_hosts=("host3",), slow=2.5)
    ev = pl.concat([fault.filter(pl.col("pg") != "tp1"), other.filter(pl.col("pg") == "tp1")])
    (f,) = detect_slow_links(ev.sort("rank", "idx"))
    assert f.hosts == ("host1",) and f.since_step == 40
    assert any("1 other group(s) slowed at another time" in e for e in f.evidence)


def test_a_slow_link_without_one_host_to_blame_starting_with_a_straggler_is_its_doing():
    from ringwatch.analyzers._findings import Finding
    from ringwatch.analyzers._links import explain_by_links

    s = Finding("straggler", "compute straggler", (2,), ("host1",), since_step=31)
    wide = Finding("slow_link", "slow communication", (0, 1, 2, 3), ("host0", "host1"),
                   since_step=32)
    out = explain_by_links((s,), (wide,))
    assert [f.kind for f in out] == ["straggler"]
    assert "they wait for it inside their collectives" in out[0].evidence[-1]
    # later, while the straggler is still late: its doing too
    late = Finding("slow_link", "slow communication", (0, 1, 2, 3), ("host0", "host1"),
                   since_step=60)
    assert [f.kind for f in explain_by_links((s,), (late,))] == ["straggler"]
    # after the straggler ended, or a link that names one host: both stand
    ended = Finding("straggler", "transient straggler", (2,), ("host1",), since_step=31,
                    until_step=40)
    assert {f.kind for f in explain_by_links((ended,), (late,))} == {"straggler", "slow_link"}
    other = Finding("straggler", "compute straggler", (0,), ("host9",), since_step=31)
    assert {f.kind for f in explain_by_links((other,), (wide,))} == {"straggler", "slow_link"}


def _tied(mild: float) -> pl.DataFrame:
    """host1's link: dp2 and dp3 (hosts 1, 3) 4x slower from step 20, tp0 (hosts 0, 1) only
    ``mild`` times (small transfers): dp2 and dp3 alone name host1 and host3 alike."""
    fault = job(LAYERED, slow_hosts=("host1",))
    soft = job(LAYERED, slow_hosts=("host1",), slow=mild)
    return pl.concat([fault.filter(pl.col("pg") != "tp0"),
                      soft.filter(pl.col("pg") == "tp0")]).sort("rank", "idx")


def test_tied_suspects_are_told_apart_by_their_other_groups():
    (f,) = detect_slow_links(_tied(1.7))
    assert f.hosts == ("host1",), f.evidence
    assert "host1's other groups slowed too (pg tp0 1." in f.evidence[-1]  # ~1.7x
    assert "host3's hardly (pg tp1 1.0x)" in f.evidence[-1]
    assert 0.5 < f.confidence <= 0.75  # named by the other groups only: less sure
    assert not any("ringwatch probe" in e for e in f.evidence)


def test_tied_suspects_stay_tied_when_no_other_group_slowed():
    (f,) = detect_slow_links(_tied(1.0))
    assert f.hosts == ("host1", "host3")
    assert any("ringwatch probe` over host1, host3" in e for e in f.evidence)
    assert f.confidence <= 0.5


def test_the_demo_reading_tells_a_slow_link_from_a_straggler():
    from ringwatch._reading import interpret

    # ranks 0-3 reach their dp all-reduce late because tp0 crosses the slow host: a rank
    # late to some of its groups only is read as the network, not as a straggler
    link = interpret(job(LAYERED, slow_hosts=("host1",), chain=True), 8, onset_step=20)
    assert (link.verdict, link.rank) == ("network", None), link.lines
    assert "only to group(s) dp" in link.lines[-1] and "tp0" in link.lines[-1]
    late = interpret(job(LAYERED, late=5, late_ms=30, chain=True), 8, onset_step=20)
    assert (late.verdict, late.rank) == ("straggler", 5), late.lines
    # 4 hosts of one rank: every group of rank 1 crosses host1's slow link, so it may come
    # late to all of them; the link analyzer names host1 alone, so it is still the network
    four = {"tp0": [0, 1], "tp1": [2, 3], "dp0": [0, 2], "dp1": [1, 3]}
    behind = interpret(job(four, per_host=1, slow_hosts=("host1",), late=1, late_ms=30), 4,
                       onset_step=20)
    assert (behind.verdict, behind.rank) == ("network", None), behind.lines
    assert "crossing host1 got slower" in behind.lines[-1], behind.lines
    alone = interpret(job(four, per_host=1, late=1, late_ms=30), 4, onset_step=20)
    assert (alone.verdict, alone.rank) == ("straggler", 1), alone.lines
    # the same rank a little late already before the link slowed down (a loaded host): still
    # the network, not "slow from the start"
    before = interpret(job(four, per_host=1, slow_hosts=("host1",), late=1, late_ms=30,
                           late_from=0), 4, onset_step=20)
    assert (before.verdict, before.rank) == ("network", None), before.lines
    imbalance = interpret(job(four, per_host=1, late=1, late_ms=30, late_from=0), 4,
                          onset_step=20)
    assert (imbalance.verdict, imbalance.rank) == ("slow from the start", 1), imbalance.lines


def _recvs(per_step: list[list[tuple[int, int, str, str, float]]]) -> pl.DataFrame:
    """Receive rows: per step, (rank, peer, host, peer's host, duration ms) of 64 KiB each;
    each rank also sends once, so that every peer's host is known."""
    rows, idx = [], defaultdict(int)
    hosts = {}
    for step, recvs in enumerate(per_step):
        for rank, peer, host, peer_host, ms in recvs:
            hosts[rank], hosts[peer] = host, peer_host
            t0 = (step * 1000 + idx[rank]) * MS
            x = row(rank, idx[rank], None, "recv", is_p2p=True, peer=peer, step=step,
                    nbytes=65536, mono_start_ns=t0, mono_end_ns=t0 + int(ms * MS))
            x["host"] = host
            idx[rank] += 1
            rows.append(x)
    for rank, host in hosts.items():
        x = row(rank, idx[rank], None, "send", is_p2p=True, peer=rank, step=0, nbytes=0,
                mono_start_ns=0, mono_end_ns=1)
        x["host"] = host
        rows.append(x)
    return frame(rows)


def test_send_recv_between_hosts_read_by_its_fastest_receive_each_step():
    # stage 1 on host1 (ranks 2, 3) receives from stage 0 on host0 (ranks 0, 1); a receive
    # holds the wait for the sender: the fastest of the step is the transfer
    step = [(2, 0, "host1", "host0", 30.0), (2, 0, "host1", "host0", 1.0),
            (3, 1, "host1", "host0", 2.0), (3, 1, "host1", "host0", 25.0),
            (1, 0, "host0", "host0", 0.1)]  # inside one host: no link
    bw = compute_p2p_bandwidth(_recvs([step, step]))
    assert bw["pg"].to_list() == ["p2p host0>host1"] * 2
    assert bw.row(0, named=True) | {"MBps": 0} == {
        "pg": "p2p host0>host1", "pg_ranks": "0-3", "hosts": "host0,host1", "step": 0,
        "collectives": 4, "bytes": 2 * 65536, "transfer_ns": 2 * MS, "MBps": 0}
    assert bw["MBps"][0] == pytest.approx(65.536)  # 64 KiB in 1 ms


def test_a_slow_link_between_pipeline_stages_is_found_from_send_recv_alone():
    healthy = [(2, 0, "host1", "host0", 1.0), (2, 0, "host1", "host0", 20.0),
               (0, 2, "host0", "host1", 1.2)]
    slow = [(2, 0, "host1", "host0", 40.0), (2, 0, "host1", "host0", 60.0),
            (0, 2, "host0", "host1", 45.0)]
    (f,) = detect_slow_links(_recvs([healthy] * 20 + [slow] * 6))
    assert (f.kind, f.since_step, f.detected_step) == ("slow_link", 20, 23)
    assert f.hosts == ("host0", "host1") and f.pg.startswith("p2p ")
    assert f.evidence[0].startswith("send/recv host0 -> host1 (ranks 0,2")


def test_a_link_that_slows_within_the_baseline_steps_is_judged_against_the_steps_before():
    """A link 5x slower from step 10 of a noisy job: half its baseline steps are slow. They
    widened the spread until only a 10x fall counted, and a usual of half slow steps hid it;
    judged against its ten steps before, it is the slow link it is, live as post-mortem."""
    from ringwatch.analyzers._links import usual_bandwidth
    from ringwatch.analyzers._online import OnlineWindow

    for seed in range(3):
        ev = job(LAYERED, spread=0.3, onset=10, slow=5, slow_hosts=("host2",), seed=seed)
        (f,) = detect_slow_links(ev)
        assert f.hosts == ("host2",) and f.since_step == 10, f
        usual = usual_bandwidth(compute_group_bandwidth(ev))
        crossing = usual.filter(pl.col("pg").is_in(["tp1", "dp0", "dp1"]))  # host2's
        assert crossing["usual_MBps"].min() > 60 and crossing["spread_log"].max() < 0.6, usual
        w = OnlineWindow(keep_steps=30)
        for lo in range(0, 40, 5):
            w.add(ev.filter(pl.col("step").is_between(lo, lo + 4)))
        (g,) = [g for g in w.findings(now_ns=0) if g.kind == "slow_link"]
        assert (g.hosts, g.since_step) == (f.hosts, f.since_step)


def test_a_dip_that_recovers_within_the_baseline_steps_leaves_the_usual_whole():
    """Five slow steps that end within the baseline steps are no lasting fall: the usual and
    spread are those of all of them, as for a healthy group."""
    from ringwatch.analyzers._link_baseline import MAD_SCALE
    from ringwatch.analyzers._links import usual_bandwidth

    for seed in range(3):
        bw = compute_group_bandwidth(job(WORLD, spread=0.3, onset=8, until=13, slow=5,
                                         slow_hosts=("host2",), seed=seed))
        head = bw.filter(pl.col("step") < 20)
        y = head["MBps"].log()
        whole = ((y - y.median()).abs().median() * MAD_SCALE, head["MBps"].median())
        got = usual_bandwidth(bw).row(0, named=True)
        assert (got["spread_log"], got["usual_MBps"]) == pytest.approx(whole)
    # noisy and healthy: no fall found, no slow link
    for seed in range(5):
        assert detect_slow_links(job(LAYERED, spread=0.5, seed=seed)) == ()


def test_two_groups_of_a_testbed_run_whose_link_slowed_at_step_12():
    """The step bandwidths (MB/s) of the two groups across host1 in a 30-step run of the
    testbed (4 ranks on 4 emulated hosts; host1 limited to 100 Mbit/s from step 12). Over
    their first 20 steps, 8 slow, the spread of the second group was such that only a 12x
    fall counted: no finding. Judged against the steps before the
    fall, both are slow from it."""
    from ringwatch.analyzers._links import usual_bandwidth

    g1 = [30.4, 19.7, 15.8, 16.2, 15.4, 20.4, 16.8, 26.4, 26.9, 13.9, 18.3, 27.3, 14.6, 6.3,
          5.3, 4.6, 3.3, 3.5, 3.3, 3.0, 3.8, 3.8, 4.9, 4.3, 3.1, 3.5, 4.7, 3.4, 11.7, 3.2]
    g4 = [340.7, 28.8, 21.2, 13.4, 23.4, 78.4, 48.1, 18.4, 12.1, 33.6, 28.0, 38.0, 2.1, 2.2,
          3.0, 3.3, 5.3, 7.0, 5.6, 7.9, 4.3, 5.7, 2.5, 2.8, 5.2, 5.0, 2.4, 4.6, 2.0, 6.3]
    bw = pl.DataFrame({"pg": ["1"] * 30 + ["4"] * 30, "step": list(range(30)) * 2,
                       "MBps": g1 + g4, "pg_ranks": ["0-1"] * 30 + ["1,3"] * 30,
                       "hosts": ["host0,host1"] * 30 + ["host1,host3"] * 30})
    usual = usual_bandwidth(bw)
    assert usual["usual_MBps"].to_list() == pytest.approx([18.3, 28.4])
    slow = compute_slow_groups(bw)
    assert slow["slow"].to_list() == [True, True] and slow["since_step"].to_list() == [13, 12]
