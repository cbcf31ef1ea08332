"""Per-step collective time: overlapping collectives count once."""

from __future__ import annotations

from ringwatch.analyzers import compute_step_comm, compute_step_wait, pivot_step_comm

from fakes import frame, row


def iv(rank, idx, start, end, step=1, status="ok"):
    return row(rank, idx, idx + 1, step=step, mono_start_ns=start, mono_end_ns=end,
               status=status)


def by_key(df):
    return {(r["rank"], r["step"]): r for r in df.iter_rows(named=True)}


def test_overlapping_intervals_count_once_disjoint_ones_add_up():
    df = compute_step_comm(frame([iv(0, 0, 0, 100), iv(0, 1, 50, 150), iv(0, 2, 200, 250)]))
    (r,) = df.iter_rows(named=True)
    assert r["collectives"] == 3
    assert r["comm_ns"] == 150 + 50
    assert r["comm_sum_ns"] == 100 + 100 + 50
    assert r["span_ns"] == 250


def test_nested_and_touching_intervals():
    rows = [iv(0, 0, 0, 300), iv(0, 1, 10, 20), iv(0, 2, 30, 40),  # nested in the first
            iv(0, 3, 300, 350),  # starts exactly at the previous end: same busy run
            iv(0, 4, 400, 410)]
    (r,) = compute_step_comm(frame(rows)).iter_rows(named=True)
    assert r["comm_ns"] == 350 + 10
    assert r["span_ns"] == 410


def test_issue_order_does_not_matter():
    rows = [iv(0, 0, 200, 250), iv(0, 1, 50, 150), iv(0, 2, 0, 100)]
    (r,) = compute_step_comm(frame(rows)).iter_rows(named=True)
    assert r["comm_ns"] == 200


def test_ranks_and_steps_are_separate():
    rows = [iv(0, 0, 0, 100, step=1), iv(0, 1, 1_000, 1_300, step=2),
            iv(1, 0, 0, 40, step=1), iv(1, 1, 20, 60, step=1), iv(1, 2, 1_000, 1_010, step=2),
            # Overlap across steps must not merge them.
            iv(0, 2, 90, 500, step=2)]
    got = by_key(compute_step_comm(frame(rows)))
    assert got[(0, 1)]["comm_ns"] == 100
    assert got[(0, 2)]["comm_ns"] == 410 + 300
    assert got[(1, 1)]["comm_ns"] == 60
    assert got[(1, 2)]["comm_ns"] == 10
    out = compute_step_comm(frame(rows))
    assert out.select("step", "rank").rows() == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert out.columns == ["rank", "step", "collectives", "comm_ns", "comm_sum_ns", "span_ns"]


def test_rows_without_step_or_start_are_ignored_and_unfinished_count_as_instants():
    rows = [iv(0, 0, 0, 100), iv(0, 1, 500, 600, step=None),
            row(0, 2, 3, step=1, mono_start_ns=None, mono_end_ns=None),
            iv(0, 3, 700, None, status="pending")]
    (r,) = compute_step_comm(frame(rows)).iter_rows(named=True)
    assert r["collectives"] == 2
    assert r["comm_ns"] == 100
    assert r["comm_sum_ns"] == 100  # only finished, ok rows
    assert r["span_ns"] == 700


def test_pivot_by_rank():
    rows = [iv(0, 0, 0, 100), iv(1, 0, 0, 30), iv(0, 1, 1_000, 1_050, step=2),
            iv(1, 1, 1_000, 1_020, step=2)]
    wide = pivot_step_comm(compute_step_comm(frame(rows)))
    assert wide.columns == ["step", "rank0", "rank1"]
    assert wide.rows() == [(1, 100, 30), (2, 50, 20)]


def arr(rank, idx, seq, start, *, step=1, pg="0", pg_ranks="0-1", **kw):
    return row(rank, idx, seq, pg=pg, pg_ranks=pg_ranks, step=step, mono_start_ns=start,
               mono_end_ns=start + 1000, **kw)


def test_wait_is_time_until_the_last_member_arrives():
    rows = [arr(0, 0, 1, 0), arr(1, 0, 1, 30),  # rank 1 arrives 30 ns late
            arr(0, 1, 2, 100), arr(1, 1, 2, 120),  # and 20 ns late again
            arr(0, 2, 3, 500, step=2), arr(1, 2, 3, 490, step=2)]  # rank 0 late in step 2
    w = by_key(compute_step_wait(frame(rows)))
    assert w[(0, 1)]["wait_ns"] == 50 and w[(1, 1)]["wait_ns"] == 0
    assert w[(0, 1)]["last_arrivals"] == 0 and w[(1, 1)]["last_arrivals"] == 2
    assert w[(0, 2)]["wait_ns"] == 0 and w[(1, 2)]["wait_ns"] == 10
    assert w[(0, 1)]["collectives"] == 2
    # each lasts 1000 ns from its own start, so the late rank also leaves late: 30 and 20 ns
    assert w[(1, 1)]["exit_lag_ns"] == 25 and w[(0, 1)]["exit_lag_ns"] == 0


def test_overlapping_waits_count_once_and_groups_are_separate():
    # Two buckets in flight together: rank 0 waits for rank 1 from 0 to 40 and from 10 to 50.
    rows = [arr(0, 0, 1, 0), arr(0, 1, 2, 10), arr(1, 0, 1, 40), arr(1, 1, 2, 50),
            # a group of ranks {0, 2}: rank 2 waits 5 for rank 0
            arr(0, 2, 1, 60, pg="1", pg_ranks="0,2"), arr(2, 0, 1, 55, pg="1", pg_ranks="0,2")]
    w = by_key(compute_step_wait(frame(rows)))
    assert w[(0, 1)]["wait_ns"] == 50  # [0, 50], not 40 + 40
    assert w[(2, 1)]["wait_ns"] == 5 and w[(1, 1)]["wait_ns"] == 0
    assert w[(0, 1)]["last_arrivals"] == 1  # the {0, 2} collective


def test_wait_ignores_p2p_and_collectives_a_member_did_not_record():
    rows = [arr(0, 0, 1, 0), arr(1, 0, 1, 30),
            arr(0, 1, 2, 100),  # rank 1 never recorded seq 2 (hung or lost): no latest start
            arr(0, 2, 1, 200, is_p2p=True, op="send", peer=1),
            arr(1, 1, 1, 400, is_p2p=True, op="recv", peer=0)]
    w = by_key(compute_step_wait(frame(rows)))
    assert w[(0, 1)]["wait_ns"] == 30 and w[(0, 1)]["collectives"] == 1
    assert w[(1, 1)]["collectives"] == 1
