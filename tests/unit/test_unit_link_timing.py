"""What a group's transfer time is made of: queued asynchronous collectives count once, a
device's durations as they are, and the job's warm-up steps are neither baseline nor judged."""

from __future__ import annotations

import polars as pl
import pytest

from ringwatch.analyzers import compute_group_bandwidth, detect_slow_links
from ringwatch.analyzers._timing import with_analysis_durations

from fakes import frame, row

MS = 1_000_000
MB = 1_000_000


def _buckets(step: int, t0_ms: float, xfer_ms: list[float], *, ranks=(0, 1), seq0=1,
             idx0=0, queued=True) -> list[dict]:
    """One step's gradient buckets (1 MB each). Queued: issued 1 ms apart on every rank, the
    backend runs them one after another, so the k-th ends when the k-1 before it and its
    own transfer are done (its host interval holds theirs). Else blocking: each issued when
    the one before it ended."""
    rows = []
    for r in ranks:
        end = t0_ms
        for k, x in enumerate(xfer_ms):
            start = t0_ms + k if queued else end
            end = max(end, start) + x
            rows.append(row(r, idx0 + k, seq0 + k, pg_ranks="0,1", nbytes=MB, step=step,
                            mono_start_ns=int(start * MS), mono_end_ns=int(end * MS)))
    return rows


def test_queued_buckets_count_their_transfers_once():
    """Four buckets of 10 ms each, issued 1 ms apart: their durations are 10, 19, 28 and 37 ms
    (each holds the ones before it); the group held the link for 40 ms, not 94, as it does
    for the same four issued one after another."""
    queued = frame(_buckets(0, 0.0, [10.0] * 4)).sort("rank", "idx")
    assert queued["duration_ns"].to_list()[:4] == [10 * MS, 19 * MS, 28 * MS, 37 * MS]
    alone = frame(_buckets(0, 0.0, [10.0] * 4, queued=False)).sort("rank", "idx")
    q, a = compute_group_bandwidth(queued).row(0, named=True), \
        compute_group_bandwidth(alone).row(0, named=True)
    assert q["transfer_ns"] == a["transfer_ns"] == 40 * MS
    assert q["MBps"] == pytest.approx(4 * MB / (40 * MS) * 1e3)
    # rows in any order (a converted trace, not a rank's log): the same
    shuffled = queued.sample(fraction=1.0, shuffle=True, seed=3)
    assert compute_group_bandwidth(shuffled)["transfer_ns"][0] == 40 * MS


def test_a_device_duration_is_its_own_time():
    """Device-timed rows (a kernel's time on its stream) are not cut by the host intervals:
    their host interval is when the host issued them, not when they ran."""
    rows = _buckets(0, 0.0, [10.0] * 4)
    for x in rows:  # the host saw the launches only; the device timed 10 ms each
        x["device_duration_ns"] = 10 * MS
        x["mono_end_ns"] = x["mono_start_ns"] + 50_000
        x["end_source"] = "wait"
    ev = with_analysis_durations(frame(rows).sort("rank", "idx"))
    assert compute_group_bandwidth(ev)["transfer_ns"][0] == 40 * MS


def _job(first_slow: int, *, steps=40, onset=None) -> pl.DataFrame:
    """Two ranks on two hosts, four buckets a step of 10 ms; the first ``first_slow`` steps
    transfer 5x slower (connections set up, buffers first touched); from ``onset`` the link
    is 4x slower."""
    rows = []
    for s in range(steps):
        x = 50.0 if s < first_slow else 40.0 if onset is not None and s >= onset else 10.0
        rows += _buckets(s, s * 1000.0, [x + (s % 3) * 0.3] * 4, seq0=1 + 4 * s, idx0=4 * s)
    ev = frame(rows)
    return ev.with_columns(pl.format("host{}", pl.col("rank")).alias("host")).sort("rank", "idx")


def test_the_warm_up_steps_are_neither_usual_nor_slow():
    # six slow first steps: with a warm-up of two (the default) four of them are judged,
    # and four slow steps in a row are a slow link
    (f,) = detect_slow_links(_job(6))
    assert (f.since_step, f.detected_step) == (2, 5)
    # as the job's own warm-up (the thresholds find it from its step times): left out
    assert detect_slow_links(_job(6), warmup_steps=6) == ()
    # and a fault after it found from its first step
    (f,) = detect_slow_links(_job(6, onset=30), warmup_steps=6)
    assert (f.since_step, f.detected_step) == (30, 33)


@pytest.mark.parametrize("name", ["early/link-at-10", "pipeline/link-p2p",
                                  "loaded/healthy-4-ranks"])
@pytest.mark.parametrize("shape", ["exact", "gpu"])
def test_own_time_by_whole_columns_is_the_windows_own_time(name, shape):
    """Rows in each (group, rank)'s start order take whole-column passes; the same rows in
    any other order take windows per (group, rank): the same own time for every row, with
    device-timed and watchdog-ended rows among them."""
    from pathlib import Path

    from ringwatch.analyzers._links import _own_ordered, own_ns
    from ringwatch.analyzers._timing import HOST_TIMED

    from fakes import gpu_shaped

    ev = pl.read_parquet(Path(__file__).resolve().parents[1] / "data" / f"{name}.parquet")
    if shape == "gpu":
        ev = gpu_shaped(ev, first_lead_ms=1)
    cols = ["pg", "rank", "idx", "mono_start_ns", "duration_ns"]
    ev = with_analysis_durations(ev).filter(~pl.col("is_p2p") & pl.col("duration_ns")
                                            .is_not_null())
    rows = ev.select(*cols, *([HOST_TIMED] if HOST_TIMED in ev.columns else [])) \
        .sort("pg", "rank", "mono_start_ns")
    if shape == "gpu":  # one op in three device-timed: both kinds on one rank and group
        rows = rows.with_columns((pl.col("idx") % 3 != 0).alias(HOST_TIMED))
    shuffled = rows.sample(fraction=1.0, shuffle=True, seed=3)
    host = pl.col(HOST_TIMED) if HOST_TIMED in rows.columns else pl.lit(True)
    assert _own_ordered(rows, host) is not None and _own_ordered(shuffled, host) is None
    ordered = own_ns(rows)
    assert ordered.height == rows.height
    assert ordered.sort("pg", "rank", "idx").equals(own_ns(shuffled).sort("pg", "rank", "idx"))
