"""A slow link's episode: it ends when the group recovers; one that ended within a few steps
is a hiccup (a burst of load on the hosts), not a finding; live holds one back while it may
still be one, so the service and the post-mortem show the same links."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from test_unit_links import WORLD, job
from test_unit_live_links import replay_live

from ringwatch._analyze import analyze_events, hiccup_lines
from ringwatch.analyzers import compute_group_bandwidth, compute_slow_groups, detect_slow_links
from ringwatch.analyzers._findings import Finding
from ringwatch.analyzers._link_episodes import TRANSIENT_LINK_CLASS
from ringwatch.analyzers._links import explain_by_links
from ringwatch.analyzers._policy import split_hiccups, split_undecided
from ringwatch.analyzers._thresholds import DEFAULT_THRESHOLDS as TH
from ringwatch.service._api import ServiceCollector


def _slow(hosts=("host2",), slow=3.0) -> dict:
    """3x slower on a quiet fabric: past the bar (2x), within its square (not severe)."""
    return {"slow_hosts": hosts, "slow": slow}


def test_a_few_slow_steps_that_recover_are_a_hiccup():
    (f,) = detect_slow_links(job(WORLD, steps=40, onset=30, until=35, **_slow()))
    assert (f.cls, f.since_step, f.detected_step, f.until_step) == (
        TRANSIENT_LINK_CLASS, 30, 33, 34)
    assert any("in steps 30-34, then as usual" in e for e in f.evidence), f.evidence
    findings, hiccups = split_hiccups((f,))
    assert findings == () and hiccups == (f,)
    lines = hiccup_lines(hiccups)
    assert lines[0].startswith("1 link hiccup(s)") and "pg 0" in lines[1] \
        and "steps 30-34" in lines[1], lines


def test_a_link_slow_for_longer_that_recovered_is_a_finding_with_its_end():
    (f,) = detect_slow_links(job(WORLD, steps=50, onset=20, until=32, **_slow()))
    assert (f.cls, f.since_step, f.until_step) == ("slow communication", 20, 31)
    assert split_hiccups((f,)) == ((f,), ())


def test_slow_steps_at_the_end_of_the_data_stay_a_finding():
    (f,) = detect_slow_links(job(WORLD, steps=40, onset=35, **_slow()))
    assert (f.cls, f.since_step, f.until_step) == ("slow communication", 35, None)


def test_steps_are_counted_as_seen_when_the_log_keeps_one_in_ten():
    """A log that keeps every 10th step: 5 slow steps seen (40 step numbers apart) that
    recover are a hiccup, as 5 slow steps in a row are; live, the same episode is held back
    only while it may still end within 8 of its steps."""
    sampled = pl.col("step") * 10 + 50_000
    bw = compute_group_bandwidth(job(WORLD, steps=40, onset=30, until=35, **_slow()))
    g = compute_slow_groups(bw.with_columns(sampled)).row(0, named=True)
    assert (g["transient"], g["since_step"], g["until_step"], g["on_steps"]) == (
        True, 50_300, 50_340, 10)
    # still on: held back while it may still end within 8 of its steps (slow in one of its
    # last 4: lasted at least 7 of 10 seen, 8 of 11)
    for steps, held in ((40, True), (41, False)):
        ev = job(WORLD, steps=steps, onset=30, **_slow()).with_columns(sampled)
        g = compute_slow_groups(compute_group_bandwidth(ev)).row(0, named=True)
        assert (g["since_step"], g["on_steps"]) == (50_300, steps - 30)
        assert (detect_slow_links(ev, hold_undecided=True) == ()) == held, steps


def test_a_link_that_flaps_is_one_episode():
    # slow 5 steps, as usual 2, slow 5 ...: the steps between do not end it
    bw = compute_group_bandwidth(job(WORLD, steps=60, onset=20, **_slow()))
    flap = (pl.col("step") >= 20) & (((pl.col("step") - 20) % 7) >= 5)
    bw = bw.with_columns(pl.when(flap).then(pl.col("MBps") * 4).otherwise(pl.col("MBps"))
                         .alias("MBps"))
    g = compute_slow_groups(bw).row(0, named=True)
    assert (g["slow"], g["transient"], g["since_step"], g["until_step"]) == (
        True, False, 20, None)


def test_a_lasting_fault_after_a_burst_is_the_finding():
    bw = compute_group_bandwidth(job(WORLD, steps=70, onset=45, **_slow()))
    burst = pl.col("step").is_between(25, 28)
    bw = bw.with_columns(pl.when(burst).then(pl.col("MBps") / 4).otherwise(pl.col("MBps"))
                         .alias("MBps"))
    g = compute_slow_groups(bw).row(0, named=True)
    assert (g["transient"], g["since_step"], g["until_step"]) == (False, 45, None)
    # without the fault, the burst alone is the group's (transient) episode
    bw = compute_group_bandwidth(job(WORLD, steps=70, onset=99, **_slow()))
    g = compute_slow_groups(bw.with_columns(
        pl.when(burst).then(pl.col("MBps") / 4).otherwise(pl.col("MBps")).alias("MBps"))
    ).row(0, named=True)
    assert (g["transient"], g["since_step"], g["until_step"]) == (True, 25, 28)


def test_no_straggler_is_folded_into_a_link_hiccup():
    (link,) = detect_slow_links(job(WORLD, steps=40, onset=30, until=35, **_slow()))
    one_host = Finding(**{**link.to_dict(), "hosts": ("host2",), "ranks": tuple(link.ranks),
                          "local_ranks": (), "evidence": tuple(link.evidence)})
    late = Finding(kind="straggler", cls="compute straggler", ranks=(4,), hosts=("host2",),
                   since_step=30)
    assert explain_by_links((late,), (one_host,)) == (late, one_host)


def _live(ev: pl.DataFrame, upto: int) -> tuple:
    """What the service would show with the job's rows up to step ``upto``."""
    found, _ = split_hiccups(detect_slow_links(ev.filter(pl.col("step") <= upto),
                                               hold_undecided=True))
    return split_undecided(found, newest_step=upto, transient_steps=TH.transient_steps,
                           persist_steps=TH.persist_steps)[0]


def test_live_holds_a_young_link_back_until_it_cannot_be_a_hiccup():
    burst = job(WORLD, steps=50, onset=30, until=35, **_slow())
    assert all(_live(burst, n) == () for n in range(25, 50))  # never shown
    fault = job(WORLD, steps=50, onset=30, **_slow())
    shown = [n for n in range(25, 50) if _live(fault, n)]
    # shown once it lasted transient_steps whatever comes next: 4 steps make it (33), and
    # it is on in one of its last 4 at step n, so it lasted n - 4 - 30 + 2 steps
    assert shown[0] == 30 + TH.transient_steps + TH.link_persist_steps - 2
    assert shown == list(range(shown[0], 50))
    (f,) = _live(fault, 49)
    (pm,) = detect_slow_links(fault)
    assert (f.kind, f.cls, f.ranks, f.since_step) == (pm.kind, pm.cls, pm.ranks, pm.since_step)


LOADED = Path(__file__).resolve().parents[1] / "data" / "loaded" / "healthy-4-ranks.parquet"


def test_a_healthy_run_on_a_loaded_machine_has_a_link_hiccup_not_a_finding():
    """A real healthy run (``tests/data/loaded/README.md``) whose transfers slowed 2.7x for
    steps 34-37 while the machine was busy, then went on in its noise."""
    ev = pl.read_parquet(LOADED)
    findings, hiccups = split_hiccups(analyze_events(ev, now_ns=int(ev["t_end_ns"].max())))
    assert findings == ()
    assert [(f.kind, f.cls, f.since_step, f.until_step) for f in hiccups] == [
        ("slow_link", TRANSIENT_LINK_CLASS, 34, 37)]


@pytest.mark.parametrize("push", [1, 5, 60])
def test_a_healthy_run_on_a_loaded_machine_shows_nothing_live(push, tmp_path):
    shown, want, refused, svc = replay_live(LOADED, push, None, tmp_path)
    assert shown == set() and want == [] and refused == 0
    # the service counts the link's hiccup, per suspect host
    reg = CollectorRegistry()
    reg.register(ServiceCollector(svc))
    text = generate_latest(reg).decode()
    for host in ("host0", "host1"):
        assert f'ringwatch_link_hiccups_total{{host="{host}",job="job"}} 1.0' in text, text


def test_a_link_that_collapses_for_a_few_steps_is_a_finding_shown_at_once():
    """A fall twice as far as the bar (here 10x against 2x: beyond its square) is no burst of
    load: a finding with its end, and live it is shown as soon as it is slow."""
    collapse = job(WORLD, steps=50, onset=30, until=35, **_slow(slow=10.0))
    (f,) = detect_slow_links(collapse)
    assert (f.cls, f.since_step, f.detected_step, f.until_step) == (
        "slow communication", 30, 33, 34)
    shown = [n for n in range(25, 50) if _live(collapse, n)]
    assert shown[0] == 33  # its 4th slow step
    (g,) = _live(collapse, 49)
    assert (g.kind, g.cls, g.ranks, g.since_step) == (f.kind, f.cls, f.ranks, f.since_step)


def test_a_send_recv_direction_that_collapses_for_a_few_steps_is_a_hiccup():
    """The same 10x fall for 5 steps, read from a pipeline's receives (a ``p2p`` direction):
    a receive's time holds the wait for its sender, and a stage with a few long batches
    makes its neighbour's fastest receive wait many times the transfer (a healthy run on
    the loaded test machine fell 19x for 6 steps so). How far it fell says nothing of the
    link there: transient, as any short episode."""
    bw = compute_group_bandwidth(job(WORLD, steps=50, onset=30, until=35,
                                     **_slow(slow=10.0)))
    group = compute_slow_groups(bw).row(0, named=True)
    p2p = compute_slow_groups(bw.with_columns(pl.lit("p2p host1>host0").alias("pg"))
                              ).row(0, named=True)
    assert (group["severe"], group["transient"]) == (True, False)
    assert (p2p["severe"], p2p["transient"], p2p["since_step"], p2p["until_step"]) == (
        False, True, 30, 34)
