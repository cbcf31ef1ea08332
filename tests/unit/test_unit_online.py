"""The online window: same verdicts as the whole log, with memory that does not grow."""

from __future__ import annotations

import polars as pl
import pytest
from test_unit_links import LAYERED
from test_unit_links import job as layered_job
from test_unit_stragglers import job

from ringwatch.analyzers import detect_stragglers
from ringwatch.analyzers._layout import Layout
from ringwatch.analyzers._online import OnlineWindow

S = 1_000_000_000


def stream(ev: pl.DataFrame, chunk_steps: int):
    """The rows in the order a live job produces them, ``chunk_steps`` steps at a time."""
    top = ev["step"].max()
    for lo in range(0, top + 1, chunk_steps):
        yield lo + chunk_steps - 1, ev.filter(pl.col("step").is_between(lo, lo + chunk_steps - 1))


def test_a_straggler_late_in_a_long_job_found_as_in_the_whole_log():
    ev = job(steps=200, onset=150, late=1, late_ms=15)
    (whole,) = detect_stragglers(ev)
    w = OnlineWindow(keep_steps=40)
    sizes, first_seen = [], None
    for last, rows in stream(ev, 5):
        w.add(rows)
        sizes.append(w.rows.height)
        got = [f for f in w.findings(now_ns=0) if f.kind == "straggler"]
        if got and first_seen is None:
            first_seen = (last, got[0])
    assert w.baseline_until == 21 and w.noise_ms is not None
    last, f = first_seen
    assert f.ranks == whole.ranks == (1,) and f.since_step == whole.since_step == 150
    assert f.detected_step == whole.detected_step and last - f.detected_step < 5
    # 4 ranks x 3 buckets x (40 kept + 5 new) steps at most, whatever the job's length
    assert max(sizes) <= 4 * 3 * 45 and sizes[-1] == sizes[-10]
    assert w.dropped_rows > 0


def test_healthy_stream_stays_quiet():
    w = OnlineWindow(keep_steps=30)
    for _last, rows in stream(job(steps=150, seed=3), 7):
        w.add(rows)
        assert w.findings(now_ns=0) == ()


def _from_start(stage):
    ev = job(steps=80, late=3, late_ms=30)
    whole = [(f.kind, f.ranks, f.since_step, f.detected_step)
             for f in detect_stragglers(ev, stage=stage)]
    w = OnlineWindow(keep_steps=30)
    w.layout = None if stage is None else Layout(stage=stage, pp=len(set(stage.values())))
    seen = []
    for _last, rows in stream(ev, 4):
        w.add(rows)
        seen.append(tuple((f.kind, f.ranks, f.since_step, f.detected_step)
                          for f in w.findings(now_ns=0)))
    return whole, seen


def test_a_rank_slow_from_the_start_among_its_peers_is_a_straggler_live_as_post_mortem():
    whole, seen = _from_start(None)  # no pipeline: every rank does the same work
    assert whole == [("straggler", (3,), 2, 9)]
    assert seen[-1] == tuple(whole)  # the onset the whole log gives, not the window's
    assert all(s in ((), tuple(whole)) for s in seen)  # never imbalance


def test_a_rank_alone_in_its_stage_and_slow_from_the_start_is_structural_live_too():
    whole, seen = _from_start({0: 0, 1: 0, 2: 0, 3: 1})  # a last stage of one rank
    assert [w[:2] for w in whole] == [("imbalance", (3,))]
    assert seen[-1] == tuple(whole)
    assert all(s in ((), tuple(whole)) for s in seen)  # never a straggler


def test_a_slow_link_against_the_job_start():
    ev = layered_job(LAYERED, steps=120, onset=90, slow_hosts=("host1",))
    w = OnlineWindow(keep_steps=30)
    for _last, rows in stream(ev, 10):
        w.add(rows)
    (f,) = [f for f in w.findings(now_ns=0) if f.kind == "slow_link"]
    assert f.hosts == ("host1",) and f.since_step == 90


def test_pending_rows_are_replaced_when_they_finish_and_a_hang_shows():
    ev = job(steps=30)
    w = OnlineWindow(keep_steps=25)
    w.add(ev.filter(pl.col("step") < 29))
    tail = ev.filter(pl.col("step") == 29)
    # step 29's first collective: ranks 0, 2, 3 inside, rank 1 never came
    first = tail.filter(pl.col("seq") == tail["seq"].min())
    pending = first.filter(pl.col("rank") != 1).with_columns(
        pl.lit("pending").alias("status"), pl.lit(None, pl.Int64).alias("duration_ns"),
        pl.lit(None, pl.Int64).alias("mono_end_ns"), pl.lit(None, pl.Int64).alias("t_end_ns"))
    w.add(pending)
    start = int(pending["t_start_ns"].min())
    (h,) = w.findings(now_ns=start + 30 * S, min_stall_s=10)
    assert (h.kind, h.cls, h.ranks) == ("hang", "never arrived", (1,))
    w.add(first)  # it finished after all: the pending copies are replaced
    assert w.rows.filter(pl.col("status") == "pending").is_empty()
    assert w.findings(now_ns=start + 30 * S, min_stall_s=10) == ()


def test_the_window_must_hold_the_baseline():
    with pytest.raises(ValueError, match="keep_steps"):
        OnlineWindow(keep_steps=10)
