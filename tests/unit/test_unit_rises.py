"""A rank that slows within the job's first (baseline) steps is a straggler from then on, not
a rank late from the start, and its own late steps do not set its usual
(:mod:`ringwatch.analyzers._rises`)."""

from __future__ import annotations

import polars as pl
from test_unit_online import stream
from test_unit_stragglers import job

from ringwatch.analyzers import detect_stragglers
from ringwatch.analyzers._online import OnlineWindow
from ringwatch.analyzers._rises import lasting_rises


def _found(ev):
    return [(f.kind, f.cls, f.ranks, f.since_step) for f in detect_stragglers(ev)]


def test_a_rank_that_slows_at_the_eighth_step_is_a_straggler_from_it():
    """Warm-up 2, baseline steps 2-21: from step 8, 14 of them late by a few noise units.
    Judged with its late steps in its baseline it read as late from the first steps
    (structural imbalance since step 2)."""
    for seed in range(3):
        for onset, late_ms in ((8, 2.0), (12, 20.0)):
            ev = job(onset=onset, late=2, late_ms=late_ms, ranks=8, seed=seed)
            assert _found(ev) == [("straggler", "compute straggler", (2,), onset)], seed


def test_live_as_post_mortem():
    ev = job(onset=8, late=2, late_ms=2.0, ranks=8)
    w = OnlineWindow(keep_steps=30)
    for _last, rows in stream(ev, 5):  # judged every round, as the service does
        w.add(rows)
        got = [(f.kind, f.cls, f.ranks, f.since_step) for f in w.findings(now_ns=0)
               if f.kind in ("straggler", "imbalance")]
    assert got == _found(ev)


def test_late_from_the_start_stays_so_and_a_few_late_steps_are_no_rise():
    # late from the first step: no rise, judged by symmetry as before (a straggler from the
    # start, against its peers)
    ev = job(late=1, late_ms=20.0, ranks=8)
    assert [f.ranks for f in detect_stragglers(ev)] == [(1,)]
    # five late steps that end within the baseline: no rise (no second level to the end)
    ev = job(onset=8, late=1, late_ms=20.0, ranks=8, on_time=range(13, 60))
    head = _head(ev)
    assert lasting_rises(head, floor_ms=1.0).is_empty()
    # healthy: none
    assert lasting_rises(_head(job(ranks=8)), floor_ms=1.0).is_empty()


def _head(ev):
    from ringwatch.analyzers import compute_step_lateness, compute_straggler_scores

    sc = compute_straggler_scores(compute_step_lateness(ev))
    return sc.filter(pl.col("step").rank("dense") <= 20)
